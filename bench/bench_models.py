"""Benchmark the embedded engines against llama.cpp (what Ollama runs) on the same model.

    .venv/bin/python bench/bench_models.py [--tokens 128] [--threads N] [--skip-peer]
                                           [--skip-candidates] [--skip-ask]
                                           [--skip-decisions]

Measures, each engine in its own child process (so one's threads, OpenMP runtime and
memory never touch another's), same prompt, same threads, greedy:

* first conversion: GGUF -> dequantized safetensors (transformers, once) and
  safetensors -> CTranslate2 int8 (numpy, once), on a fresh cache;
* load from cache, time to first token, decode tokens/s (tokens after the first over
  the time after the first) for CTranslate2 int8 (the default engine), transformers
  fp32 (the fallback), llama.cpp (the peer) and, where installed in
  ``.peers/candidates``, ONNX Runtime GenAI int4;
* the same for CTranslate2 and llama.cpp with two busy processes competing for the
  cores (``contended``);
* accuracy of each ``choose`` method on the labelled set tests/decision_cases.py;
* ``a4ps ask "What is the capital of France?"`` end to end through a running daemon
  with the model resident: time to the first printed token and to the answer.

The peer is ``llama-cpp-python`` built from its sdist into ``.peers/llamacpp`` (never
the project's requirements) with ``CMAKE_ARGS=-DGGML_NATIVE=OFF -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON``: a native build picks up instructions this kind of VM
advertises but does not run, and dies with SIGILL on its first token. Prints one table
and the two ratio lines the issue asks for.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEERS = ROOT / ".peers"
PEER_PY = PEERS / "llamacpp" / "bin" / "python"
CANDIDATES_PY = PEERS / "candidates" / "bin" / "python"
PEER_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                   "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                   "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")
PEER_VERSION = "0.3.36"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper "
                                      "who finds a message in a bottle."}]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(msg: str) -> None:
    print(f"[bench_models] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- peer build

def ensure_peer() -> Path | None:
    """Build llama-cpp-python into .peers/llamacpp once; returns its python or None."""
    if PEER_PY.exists() and subprocess.run([str(PEER_PY), "-c", "import llama_cpp"],
                                           capture_output=True).returncode == 0:
        return PEER_PY
    log(f"building llama-cpp-python {PEER_VERSION} into {PEER_PY.parent.parent} "
        f"(first run only; 30+ min on 2 busy cores) with CMAKE_ARGS={PEER_CMAKE_ARGS}")
    PEER_PY.parent.parent.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(PEER_PY.parent.parent)],
                   check=True)
    env = dict(os.environ, CMAKE_ARGS=PEER_CMAKE_ARGS,
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    r = subprocess.run(["nice", "-n", "19", sys.executable, "-m", "pip", "--python",
                        str(PEER_PY), "install", "--no-cache-dir",
                        f"llama-cpp-python=={PEER_VERSION}"], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        log("llama-cpp-python build failed:\n" + r.stdout[-2000:] + r.stderr[-3000:])
        return None
    return PEER_PY


# --------------------------------------------------------------------------- workers
# Each runs in a child process and prints one JSON line.

def worker_decisions(args) -> dict:
    """Accuracy of each choose method on tests/decision_cases.py, default engine."""
    sys.path.insert(0, str(ROOT / "tests"))
    import decision_cases
    from a4ps.config import load_settings
    from a4ps.events import EventBus
    from a4ps.models.decide import METHODS
    from a4ps.models.embedded import BASE_ID, EmbeddedBackend
    from a4ps.models.manager import ModelManager
    s = load_settings(data_dir=Path(tempfile.mkdtemp(prefix="a4ps-bench-")))
    s.models.embedded.cache_dir = Path(args.cache)
    s.models.embedded.threads = args.threads
    mm = ModelManager(s, EventBus(), backend=EmbeddedBackend(s))
    mm.load(BASE_ID)
    d = mm.backend._decide()
    out = {}
    for m in METHODS:
        t0 = time.perf_counter()
        acc, per = decision_cases.accuracy(lambda msgs, o, mm_: d.choose(msgs, o, method=mm_).value, m)
        out[m] = {"accuracy": acc, "per_family": per,
                  "seconds_per_choice": (time.perf_counter() - t0) / len(decision_cases.cases())}
    return out


def worker_embedded(args) -> dict:
    from a4ps.config import load_settings
    from a4ps.events import EventBus
    from a4ps.models.embedded import BASE_ID, EmbeddedBackend
    from a4ps.models.manager import ModelManager
    s = load_settings(data_dir=Path(tempfile.mkdtemp(prefix="a4ps-bench-")))
    s.models.embedded.cache_dir = Path(args.cache)
    s.models.embedded.engine = args.engine
    s.models.embedded.threads = args.threads
    s.models.embedded.repetition_guard = False      # measure N tokens of decoding
    t0 = time.perf_counter()
    mm = ModelManager(s, EventBus(), backend=EmbeddedBackend(s))
    mm.load(BASE_ID)
    load = time.perf_counter() - t0
    mm.generate(BASE_ID, PROMPT, max_tokens=8)                  # warm-up
    g = mm.generate(BASE_ID, PROMPT, max_tokens=args.tokens, on_token=lambda piece: None)
    decode = (g.tokens - 1) / (g.seconds - g.ttft_s) if g.tokens > 1 else None
    return {"load_s": load, "ttft_s": g.ttft_s, "tokens": g.tokens, "decode_tok_s": decode,
            "rss_mb": _rss_mb(), "threads": mm.backend.threads}


PEER_SCRIPT = r"""
import json, sys, time
gguf, n_tokens, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
            verbose=False)
load = time.perf_counter() - t0
def run(n):
    t0 = time.perf_counter(); stamps = []
    for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1,
                                       stream=True):
        stamps.append(time.perf_counter())
    return t0, stamps
run(8)
llm.reset()
t0, st = run(n_tokens)
n = len(st)
print(json.dumps({"load_s": load, "ttft_s": st[0] - t0, "tokens": n,
                  "decode_tok_s": (n - 1) / (st[-1] - st[0]) if n > 1 else None,
                  "threads": threads,
                  "rss_mb": [int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                             if l.startswith("VmRSS:")][0]}))
"""

ORT_SCRIPT = r"""
import json, sys, time
model_dir, n_tokens, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
import onnxruntime_genai as og
model = og.Model(model_dir)
tok = og.Tokenizer(model)
load = time.perf_counter() - t0
ids = tok.encode(prompt)
def run(n):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter(); stamps = []
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token(); stamps.append(time.perf_counter())
    return t0, stamps
run(8)
t0, st = run(n_tokens)
n = len(st)
print(json.dumps({"load_s": load, "ttft_s": st[0] - t0, "tokens": n,
                  "decode_tok_s": (n - 1) / (st[-1] - st[0]) if n > 1 else None,
                  "rss_mb": [int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                             if l.startswith("VmRSS:")][0]}))
"""


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")      # what the CLI does first thing
    return env


def run_json(cmd: list[str], threads: int, timeout: int = 900,
             env: dict[str, str] | None = None) -> dict | None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**_child_env(threads), **(env or {})}, cwd=ROOT)
    if r.returncode != 0:
        log(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-2500:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def ours(engine: str, cache: Path, args, env: dict[str, str] | None = None) -> dict | None:
    return run_json([sys.executable, __file__, "--worker", engine, "--cache", str(cache),
                     "--tokens", str(args.tokens), "--threads", str(args.threads)], args.threads,
                    env=env)


def peer(py: Path, gguf: Path, prompt: str, args) -> dict | None:
    return run_json([str(py), "-c", PEER_SCRIPT, str(gguf), str(args.tokens),
                     str(args.threads), prompt], args.threads)


def ort_candidate(hf_dir: Path, work: Path, prompt: str, args) -> tuple[dict | None, str]:
    """ONNX Runtime GenAI int4, built once with its model builder (needs torch)."""
    if not CANDIDATES_PY.exists() or subprocess.run(
            [str(CANDIDATES_PY), "-c", "import onnxruntime_genai"],
            capture_output=True).returncode != 0:
        return None, "not installed (.peers/candidates: pip install onnxruntime-genai onnx onnx-ir)"
    out = work / "ort-int4"
    t0 = time.perf_counter()
    r = subprocess.run([str(CANDIDATES_PY), "-m", "onnxruntime_genai.models.builder",
                        "-i", str(hf_dir), "-o", str(out), "-p", "int4", "-e", "cpu",
                        "-c", str(work / "ort-cache")], capture_output=True, text=True,
                       env=_child_env(args.threads), timeout=1800)
    if r.returncode != 0:
        return None, f"model builder failed: {r.stderr.strip().splitlines()[-1:]}"
    build_s = time.perf_counter() - t0
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = args.threads
    cfg_path.write_text(json.dumps(cfg))
    res = run_json([str(CANDIDATES_PY), "-c", ORT_SCRIPT, str(out), str(args.tokens), prompt],
                   args.threads)
    return res, f"converted in {build_s:.1f} s"


class Busy:
    """Two busy processes competing for the cores while a measurement runs."""

    def __init__(self, n: int = 2) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(self.n)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------- ask

def ask_end_to_end(cache: Path, threads: int) -> dict | None:
    """A daemon on the embedded default, model resident (one warm-up ask), then the timed
    ``a4ps ask``: seconds to its first printed token and to its exit."""
    import socket

    def port() -> int:
        with socket.socket() as s_:
            s_.bind(("127.0.0.1", 0))
            return s_.getsockname()[1]
    data = Path(tempfile.mkdtemp(prefix="a4ps-bench-ask-"))
    env = dict(_child_env(threads), A4PS_MODELS__EMBEDDED__CACHE_DIR=str(cache),
               A4PS_MOTIVATOR__ENABLED="false",
               A4PS_BUS__COMMAND_ADDR=f"tcp://127.0.0.1:{port()}",
               A4PS_BUS__EVENT_ADDR=f"tcp://127.0.0.1:{port()}")
    base = [sys.executable, "-m", "a4ps", "--data-dir", str(data)]
    daemon = subprocess.Popen(base + ["daemon"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (data / "daemon.token").exists() and subprocess.run(
                    base + ["status", "--timeout", "1"], env=env, cwd=ROOT,
                    capture_output=True).returncode == 0:
                break
            if daemon.poll() is not None:
                log("the daemon exited during start-up")
                return None
            time.sleep(0.5)
        subprocess.run(base + ["ask", "Hello!"], env=env, cwd=ROOT, capture_output=True,
                       timeout=600)                        # loads the model: now resident
        t0 = time.perf_counter()
        p = subprocess.Popen(base + ["ask", "What is the capital of France?"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             bufsize=1)
        first = None
        out = []
        assert p.stdout is not None
        while True:
            ch = p.stdout.read(1)
            if not ch:
                break
            if first is None and ch.strip():
                first = time.perf_counter() - t0
            out.append(ch)
        p.wait(timeout=600)
        total = time.perf_counter() - t0
        text = "".join(out)
        return {"first_output_s": first, "total_s": total, "rc": p.returncode,
                "answer": text.split("ALFRED's answer")[-1].strip().splitlines()[-1:]
                if "ALFRED's answer" in text else None}
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(data, ignore_errors=True)


# --------------------------------------------------------------------------- main

def main() -> None:
    from a4ps.models.threads import resolve_threads
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="0 = the thread policy's choice")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-candidates", action="store_true")
    ap.add_argument("--skip-ask", action="store_true")
    ap.add_argument("--skip-decisions", action="store_true")
    ap.add_argument("--build-peer-only", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = resolve_threads(args.threads)
    if args.worker == "decisions":
        print(json.dumps(worker_decisions(args)))
        return
    if args.worker:
        print(json.dumps(worker_embedded(argparse.Namespace(**{**vars(args),
                                                               "engine": args.worker}))))
        return
    if args.build_peer_only:
        sys.exit(0 if ensure_peer() else 1)

    from a4ps.config import load_settings
    from a4ps.models.embedded import (ensure_base_checkpoint, ensure_ct2_model, gguf_path)
    from a4ps.models.tokens import ChatTokenizer
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="a4ps-bench-models-"))
    rows: list[tuple[str, str, str]] = []

    def row(what, value, note=""):
        rows.append((what, value, note))
        log(f"{what}: {value} {note}")

    try:
        settings = load_settings(data_dir=work / "data")
        settings.models.embedded.cache_dir = work / "cache"
        gguf = gguf_path(settings)
        t0 = time.perf_counter()
        hf_dir = ensure_base_checkpoint(settings)
        deq = time.perf_counter() - t0
        t0 = time.perf_counter()
        ensure_ct2_model(settings)
        conv = time.perf_counter() - t0
        row("first conversion: GGUF -> safetensors (dequantize)", f"{deq:.2f} s",
            f"GGUF {gguf.stat().st_size / 1e6:.0f} MB, transformers")
        row("first conversion: safetensors -> CTranslate2 int8", f"{conv:.2f} s",
            "numpy converter in a child process")
        row("first conversion: total", f"{deq + conv:.2f} s", "target < 20 s on 2 idle cores")
        prompt = ChatTokenizer(hf_dir).render(PROMPT)
        cache = work / "cache"

        res: dict[str, dict | None] = {}
        res["ct2"] = ours("ctranslate2", cache, args)
        res["torch"] = ours("transformers", cache, args)
        # the thread policy's cost when the cores are free: the same engine spinning
        res["ct2-spin"] = ours("ctranslate2", cache, args, env={"OMP_WAIT_POLICY": "ACTIVE"})
        py = None if args.skip_peer else ensure_peer()
        res["llama"] = peer(py, gguf, prompt, args) if py else None
        ort_note = "skipped"
        if not args.skip_candidates:
            res["ort"], ort_note = ort_candidate(hf_dir, work, prompt, args)

        names = {"ct2": "CTranslate2 int8 (embedded default)",
                 "ct2-spin": "CTranslate2 int8 with OMP_WAIT_POLICY=ACTIVE (spinning)",
                 "torch": "transformers fp32 (fallback, training stack)",
                 "llama": "llama.cpp Q4_1 GGUF (peer)", "ort": "ONNX Runtime GenAI int4"}
        for key, label in names.items():
            r = res.get(key)
            if r is None:
                why = {"ort": ort_note, "llama": "--skip-peer" if args.skip_peer
                       else "build or run failed (see stderr)"}.get(key, "see stderr")
                row(label, "unavailable", why)
                continue
            row(f"{label}: load", f"{r['load_s']:.2f} s", f"RSS {r['rss_mb']:.0f} MB" +
                (f"; {ort_note}" if key == "ort" else ""))
            row(f"{label}: time to first token", f"{r['ttft_s'] * 1000:.0f} ms")
            row(f"{label}: decode", f"{r['decode_tok_s']:.1f} tok/s", f"{r['tokens']} tokens")

        contended: dict[str, dict | None] = {}
        with Busy(2):
            contended["ct2"] = ours("ctranslate2", cache, args)
            contended["llama"] = peer(py, gguf, prompt, args) if py else None
            # what the thread policy avoids: the same engine with spinning OpenMP waits
            contended["ct2-spin"] = ours("ctranslate2", cache, args,
                                         env={"OMP_WAIT_POLICY": "ACTIVE"})
        for key in ("ct2", "llama", "ct2-spin"):
            r = contended.get(key)
            if r:
                row(f"{names[key]}: decode, 2 busy processes", f"{r['decode_tok_s']:.1f} tok/s",
                    f"TTFT {r['ttft_s'] * 1000:.0f} ms")

        if not args.skip_decisions:
            dec = ours("decisions", cache, args)
            for m, r in (dec or {}).items():
                fam = ", ".join(f"{k} {v:.0%}" for k, v in r["per_family"].items())
                row(f"choose on tests/decision_cases.py, method {m}", f"{r['accuracy']:.0%}",
                    f"{fam}; {r['seconds_per_choice']:.2f} s per choice")

        if not args.skip_ask:
            a = ask_end_to_end(cache, args.threads)
            if a:
                row('a4ps ask "What is the capital of France?": first output',
                    f"{a['first_output_s']:.2f} s", "daemon running, model resident")
                row('a4ps ask "What is the capital of France?": whole task',
                    f"{a['total_s']:.2f} s", f"exit {a['rc']}; answer {a['answer']}")
            else:
                row("a4ps ask end to end", "unavailable", "see stderr")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    print(f"\nModels benchmark ({args.threads} threads for every engine, {args.tokens} greedy "
          f"tokens, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}; "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end: other work on the machine slows every row)")
    print(f"llama.cpp peer: llama-cpp-python {PEER_VERSION} from the sdist, "
          f"CMAKE_ARGS={PEER_CMAKE_ARGS}")
    print(f"{'measure'.ljust(w)}  {'value'.rjust(v)}  note")
    print(f"{'-' * w}  {'-' * v}  ----")
    for a_, b_, c_ in rows:
        print(f"{a_.ljust(w)}  {b_.rjust(v)}  {c_}")
    ct2, llama = res.get("ct2"), res.get("llama")
    if ct2 and llama:
        print(f"embedded/llama.cpp decode ratio: {ct2['decode_tok_s'] / llama['decode_tok_s']:.2f}")
    else:
        print("embedded/llama.cpp decode ratio: unavailable (peer or engine failed)")
    c_ct2, c_llama = contended.get("ct2"), contended.get("llama")
    if c_ct2 and c_llama:
        print(f"contended embedded/llama.cpp ratio: "
              f"{c_ct2['decode_tok_s'] / c_llama['decode_tok_s']:.2f}")
    else:
        print("contended embedded/llama.cpp ratio: unavailable (peer or engine failed)")
    if c_ct2 and ct2:
        print(f"contended/idle embedded: {c_ct2['decode_tok_s'] / ct2['decode_tok_s']:.2f}")


if __name__ == "__main__":
    main()
