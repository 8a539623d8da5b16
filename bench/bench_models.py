"""Benchmark the embedded model path against llama.cpp (what Ollama runs) on the same GGUF.

    .venv/bin/python bench/bench_models.py [--tokens 128] [--threads 2] [--skip-peer]

Measures: load time (cold from GGUF, cached safetensors), time to first token,
tokens/s for N greedy tokens in fp32 and bf16, peak RSS, MiniLM sentences/s, the
memory-bandwidth bound (weight bytes read per token vs a measured copy bandwidth),
and the llama.cpp peer. The peer is ``llama-cpp-python``, which has no wheel on PyPI:
on first use it is built from the sdist into a separate environment under
``.peers/llamacpp`` (never the project's own requirements; ~4 min on 2 cores). The
peer runs in its own subprocess so its numbers do not share a process with torch.
Prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEER_ENV = ROOT / ".peers" / "llamacpp"
PEER_PY = PEER_ENV / "bin" / "python"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper "
                                      "who finds a message in a bottle."}]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb(field: str = "VmHWM") -> float:
    """VmHWM (peak) or VmRSS (now) of this process; ru_maxrss would carry the
    parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- peer

def ensure_peer(log=print) -> Path | None:
    """Build llama-cpp-python into .peers/llamacpp once; returns its python or None."""
    if PEER_PY.exists() and subprocess.run([str(PEER_PY), "-c", "import llama_cpp"],
                                           capture_output=True).returncode == 0:
        return PEER_PY
    log(f"building llama-cpp-python into {PEER_ENV} (first run only, ~4 min) ...")
    PEER_ENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(PEER_ENV)], check=True)
    # reuse the project's pip to install into the peer env (no ensurepip download)
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF "
                                      "-DLLAMA_BUILD_EXAMPLES=OFF",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(PEER_PY), "install",
                        "--no-cache-dir", "llama-cpp-python"], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        log("llama-cpp-python build failed:\n" + r.stdout[-2000:] + r.stderr[-3000:])
        return None
    log(f"built llama-cpp-python in {time.perf_counter() - t0:.0f}s")
    return PEER_PY


PEER_SCRIPT = r"""
import json, sys, time
gguf, n_tokens, threads, messages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
load = time.perf_counter() - t0
def run():
    t0 = time.perf_counter(); first = None; n = 0
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=n_tokens, temperature=0.0,
                                            stream=True):
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            if first is None: first = time.perf_counter() - t0
            n += 1
    return first, n, time.perf_counter() - t0
run()  # warm-up
llm.reset()
first, n, total = run()
# tokens/s over decode only, counting tokens precisely with a non-streamed call
t1 = time.perf_counter()
out = llm.create_chat_completion(messages=messages, max_tokens=n_tokens, temperature=0.0)
t2 = time.perf_counter()
ntok = out["usage"]["completion_tokens"]
print(json.dumps({"load_s": load, "ttft_s": first, "tokens": ntok, "seconds": t2 - t1,
                  "tok_s": ntok / (t2 - t1),
                  "rss_mb": [int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                             if l.startswith("VmHWM:")][0]}))
"""


def run_peer(py: Path, gguf: Path, n_tokens: int, threads: int) -> dict | None:
    r = subprocess.run([str(py), "-c", PEER_SCRIPT, str(gguf), str(n_tokens), str(threads),
                        json.dumps(PROMPT)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        print("peer run failed:", r.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- ours

def copy_bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """Measured memory bandwidth: bytes read + written by a large copy, best of reps."""
    import numpy as np
    a = np.ones(mb * 2**20 // 8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        dt = time.perf_counter() - t0
        best = max(best, 2 * a.nbytes / dt / 1e9)
    return best


def weight_bytes(model) -> int:
    """Bytes of distinct weights read per decoded token (tied embeddings counted once;
    the input embedding lookup reads one row, the LM head reads the whole matrix)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def bench_ours(settings, dtype: str, n_tokens: int) -> dict:
    from a4ps.events import EventBus
    from a4ps.models.embedded import BASE_ID, EmbeddedBackend
    from a4ps.models.manager import ModelManager
    s = settings.model_copy(deep=True)
    s.models.embedded.dtype = dtype
    backend = EmbeddedBackend(s)
    mm = ModelManager(s, EventBus(), backend=backend)
    t0 = time.perf_counter()
    mm.load(BASE_ID)
    load = time.perf_counter() - t0
    mm.chat(BASE_ID, PROMPT, max_tokens=8)                     # warm-up
    before = mm.stats()["tokens"]
    mm.chat(BASE_ID, PROMPT, max_tokens=n_tokens, on_token=lambda piece: None)
    st = mm.stats()
    rss = peak_rss_mb("VmRSS")
    wb = weight_bytes(backend._model)
    mm.release()
    return {"load_s": load, "ttft_s": st["last_ttft_s"], "tokens": st["tokens"] - before, "rss_mb": rss,
            "tok_s": st["last_tokens_per_s"], "weight_bytes": wb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--build-peer-only", action="store_true")
    args = ap.parse_args()
    if args.build_peer_only:
        sys.exit(0 if ensure_peer() else 1)

    import torch
    torch.set_num_threads(args.threads)
    from a4ps.config import load_settings
    from a4ps.models.embedded import ensure_base_checkpoint, gguf_path
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="a4ps-bench-"))
    settings = load_settings(data_dir=tmp)
    settings.models.embedded.threads = args.threads
    gguf = gguf_path(settings)
    rows: list[tuple[str, str, str]] = []

    def row(what, value, note=""):
        rows.append((what, value, note))

    # cold: dequantize the GGUF into a fresh cache (what a first start costs)
    t0 = time.perf_counter()
    ensure_base_checkpoint(settings)
    row("load: cold from GGUF (dequantize + write cache)", f"{time.perf_counter() - t0:.2f} s",
        f"GGUF {gguf.stat().st_size / 1e6:.0f} MB")

    bw = copy_bandwidth_gbs()
    row("memory copy bandwidth (numpy, read+write)", f"{bw:.1f} GB/s")

    ours = {}
    for dtype in ("float32", "bfloat16"):
        r = bench_ours(settings, dtype, args.tokens)
        ours[dtype] = r
        bound = bw * 1e9 / r["weight_bytes"]
        row(f"embedded {dtype}: load from cache", f"{r['load_s']:.2f} s",
            f"process RSS with it resident {r['rss_mb']:.0f} MB")
        row(f"embedded {dtype}: time to first token", f"{r['ttft_s'] * 1000:.0f} ms")
        row(f"embedded {dtype}: generate {r['tokens']} tokens", f"{r['tok_s']:.1f} tok/s",
            f"{r['tok_s'] / bound:.0%} of bandwidth bound {bound:.0f} tok/s "
            f"({r['weight_bytes'] / 1e6:.0f} MB weights/token)")
    row("embedded: peak RSS (fp32 + bf16 runs, incl. dequantize)", f"{peak_rss_mb():.0f} MB")

    from a4ps.models.embeddings import MiniLMEmbedder
    emb = MiniLMEmbedder(batch_size=64)
    emb.embed(["warm up"])
    sents = [f"Sentence number {i} about lighthouses, bottles and the sea." for i in range(512)]
    t0 = time.perf_counter()
    emb.embed(sents)
    row("MiniLM embeddings (batch 64)", f"{len(sents) / (time.perf_counter() - t0):.0f} sent/s")

    if not args.skip_peer:
        py = ensure_peer(log=lambda m: print(m, file=sys.stderr))
        peer = run_peer(py, gguf, args.tokens, args.threads) if py else None
        if peer:
            q4_bytes = gguf.stat().st_size
            pbound = bw * 1e9 / q4_bytes
            row("llama.cpp (Q4_1 GGUF): load", f"{peer['load_s']:.2f} s")
            row("llama.cpp: time to first token", f"{peer['ttft_s'] * 1000:.0f} ms")
            row(f"llama.cpp: generate {peer['tokens']} tokens", f"{peer['tok_s']:.1f} tok/s",
                f"{peer['tok_s'] / pbound:.0%} of bound {pbound:.0f} tok/s "
                f"({q4_bytes / 1e6:.0f} MB/token)")
            row("llama.cpp: peak RSS", f"{peer['rss_mb']:.0f} MB")
            for dtype in ("float32", "bfloat16"):
                row(f"ratio llama.cpp / embedded {dtype}",
                    f"{peer['tok_s'] / ours[dtype]['tok_s']:.1f}x")
        else:
            row("llama.cpp peer", "unavailable", "build or run failed (see stderr)")

    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    print(f"\nModels benchmark ({args.threads} torch/llama threads, {args.tokens} tokens, "
          f"greedy; torch {torch.__version__}; {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end: other work on the "
          f"machine slows every row)")
    print(f"{'measure'.ljust(w)}  {'value'.rjust(v)}  note")
    print(f"{'-' * w}  {'-' * v}  ----")
    for a, b, c in rows:
        print(f"{a.ljust(w)}  {b.rjust(v)}  {c}")


if __name__ == "__main__":
    main()
