"""Sandbox, forge and registry costs: `.venv/bin/python bench/bench_sandbox.py [--runs 20] [--no-model]`.

One table, every row measured in the same run, latencies as p50/p95 over --runs:

* reference: `python -c 'print(1)'` as a plain host subprocess (what starting the
  interpreter costs without any sandbox); the `x ref` column divides by its p50; and
  `a4ps --help`, the CLI's own start-up (imports, settings) without a sandbox;
* a trivial tool call (`Sandbox.call`, one output), a test run of 10 cases
  (`ToolForge.verify`: 10 calls judged on the host), a `sandbox.run` of a one-line script,
  and `a4ps sandbox run FILE` end to end (a new CLI process: imports, settings, one
  container start, output);
* one forge cycle with a scripted writer (gate + sandboxed tests + register) and, unless
  --no-model, with the embedded SmolLM2-135M writing (model load not counted);
* registry lookup (`ToolRegistry.match`: name, then description) at 1,000 tools, with
  the hash stand-in embedder and, unless --no-model, MiniLM (vectors cached after the
  first lookup, as in the daemon).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOOD = '''```python
import statistics

def median_of(values: list) -> float:
    return statistics.median(values)
```

```python
from tool import median_of

def test_odd():
    assert median_of([3, 1, 2]) == 2

def test_even():
    assert median_of([4, 1, 2, 3]) == 2.5
```
'''
MEDIAN = "import statistics\n\ndef median_of(values: list) -> float:\n    return statistics.median(values)\n"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-model", action="store_true", help="skip the embedded model and MiniLM rows")
    args = ap.parse_args()

    from a4ps.config import load_settings
    from a4ps.events import EventBus
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.proto import ProtoManager
    from a4ps.tools.registry import ToolRegistry, ToolSpec
    from a4ps.tools.sandbox import make_sandbox
    from a4ps.tools.tool_forge import ToolForge, build_prompt

    tmp = Path(tempfile.mkdtemp(prefix="a4ps-bench-"))
    settings = load_settings(data_dir=tmp / "data")
    sb = make_sandbox(settings)
    if not sb.available:
        print(f"sandbox unavailable: {sb.reason}")
        return 1
    rows: list[tuple[str, list[float], str]] = []
    runs = max(3, args.runs)

    ref = timed(lambda: subprocess.run([sys.executable, "-c", "print(1)"], check=True,
                                       stdout=subprocess.DEVNULL), runs)
    rows.append(("python -c 'print(1)' (reference)", ref, "host subprocess, no sandbox"))

    sb.run("print(1)")     # warm the page cache
    res = sb.call(MEDIAN, "median_of", [{"values": [1, 2, 3]}])
    assert res.outputs[0] and res.outputs[0].value == 2, res
    rows.append(("Sandbox.call, trivial tool", timed(
        lambda: sb.call(MEDIAN, "median_of", [{"values": [1, 2, 3]}]), runs), "one output"))

    bus = EventBus()
    reg = ToolRegistry(ProtoManager(bus), settings, bus, sandbox=sb, tools_dir=tmp / "tools")
    forge = ToolForge(reg, sb, lambda spec, fb: GOOD, settings, bus)
    spec10 = ToolSpec(name="median_of", description="median of numbers", examples=[
        {"args": {"values": list(range(i + 1))}, "result": statistics.median(range(i + 1))}
        for i in range(10)])
    verdict = forge.verify(spec10, MEDIAN)
    assert verdict["ok"] and verdict["total"] == 10, verdict["summary"]
    rows.append(("test run, 10 cases (verify)", timed(lambda: forge.verify(spec10, MEDIAN), runs),
                 "10 calls in one sandbox, judged on the host"))

    rows.append(("Sandbox.run, print(1)", timed(lambda: sb.run("print(1)"), runs), "script mode"))

    script = tmp / "one.py"
    script.write_text("print(1)\n")
    cli = [sys.executable, "-m", "a4ps", "--data-dir", str(tmp / "cli-data"), "sandbox", "run", str(script)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows.append(("`a4ps --help` (CLI start, no sandbox)", timed(
        lambda: subprocess.run([sys.executable, "-m", "a4ps", "--help"], check=True,
                               stdout=subprocess.DEVNULL, env=env, cwd=ROOT),
        max(3, runs // 2)), "reference: the CLI's own start-up"))
    rows.append(("`a4ps sandbox run` end to end", timed(
        lambda: subprocess.run(cli, check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT),
        max(3, runs // 2)), "new process: imports + one container"))

    t0 = time.perf_counter()
    out = forge.forge(ToolSpec(name="median_of", description="median of numbers",
                               examples=[{"args": {"values": [1, 5, 2]}, "result": 2}]))
    rows.append(("forge cycle, scripted writer", [time.perf_counter() - t0],
                 f"ok={out.ok} attempts={out.attempts}: gate + tests + register"))

    def lookup_rows(embedder, label: str) -> None:
        protos = ProtoManager(EventBus())
        big = ToolRegistry(protos, settings, None, embedder=embedder, sandbox=sb,
                           tools_dir=tmp / f"tools-{label}")
        words = ["sum", "mean", "median", "date", "days", "prime", "string", "reverse", "sort",
                 "count", "vowels", "celsius", "fahrenheit", "interest", "loan", "area", "circle"]
        big._mirror = lambda *a, **k: None            # 1,000 files are not what is measured
        for i in range(1000):
            name = f"{words[i % len(words)]}_{words[(i * 7) % len(words)]}_{i}"
            big.register(ToolSpec(name=name, description=f"{name.replace('_', ' ')} of the input"),
                         f"def {name}(x):\n    return x\n", "", "BRICK")
        t0 = time.perf_counter()
        big.match(None, "the mean of some numbers", {"x": 1})
        first = time.perf_counter() - t0
        queries = ["average of numbers", "days between dates", "reverse a string", "area of a circle"]
        lat = timed(lambda: [big.match(None, q, {"x": 1}) for q in queries], max(3, runs // 4))
        rows.append((f"registry.match at 1,000 tools, {label}", [x / len(queries) for x in lat],
                     f"first lookup (embeds all) {first:.2f}s"))

    lookup_rows(HashEmbedder(), "hash embedder")
    if not args.no_model:
        from a4ps.models.embeddings import MiniLMEmbedder
        lookup_rows(MiniLMEmbedder(), "MiniLM")

        from a4ps.models.manager import ModelManager
        mm = ModelManager.from_settings(settings, bus)
        t0 = time.perf_counter()
        mm.chat("smollm2-135m", "hi", max_tokens=1)
        load_s = time.perf_counter() - t0

        def writer(spec, feedback):
            return mm.chat("smollm2-135m", build_prompt(spec, feedback), max_tokens=160)
        s1 = settings.model_copy(update={"forge": settings.forge.model_copy(update={"max_attempts": 1})})
        model_forge = ToolForge(reg, sb, writer, s1, bus)
        t0 = time.perf_counter()
        out = model_forge.forge(ToolSpec(name="square", description="the square of a number",
                                         examples=[{"args": {"x": 3}, "result": 9}]))
        why = "created" if out.ok else f"rejected: {(out.reason or '')[:50]}"
        rows.append(("forge cycle, embedded SmolLM2-135M", [time.perf_counter() - t0],
                     f"1 attempt, {why}; model load {load_s:.1f}s not counted"))
        mm.release()

    sb.close()
    shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(ref)
    print(f"{'what':42} {'n':>3} {'p50 s':>7} {'p95 s':>7} {'x ref':>6}  note")
    for name, xs, note in rows:
        p50 = statistics.median(xs)
        print(f"{name:42} {len(xs):>3} {p50:7.3f} {pct(xs, 0.95):7.3f} {p50 / base:6.1f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
