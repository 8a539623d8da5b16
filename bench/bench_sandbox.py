"""Sandbox and forge latency: `.venv/bin/python bench/bench_sandbox.py [--runs 20] [--no-model]`.

Rows: start-to-result latency of a trivial script in the runsc sandbox (p50/p95 over
--runs), a registry tool call (the overhead every forged-tool call pays), a bare
`runsc do` for reference, and one whole forge cycle: scripted writer (gate + sandboxed
tests + register) and, unless --no-model, the embedded SmolLM2-135M as BRICK.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOOD = '''```python
import statistics

def median_of(values: list[float]) -> float:
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


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def row(name: str, xs: list[float], note: str = "") -> tuple:
    return (name, len(xs), statistics.median(xs), pct(xs, 0.95), min(xs), note)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-model", action="store_true", help="skip the embedded-model forge cycle")
    args = ap.parse_args()

    from a4ps.config import load_settings
    from a4ps.events import EventBus
    from a4ps.proto import ProtoManager
    from a4ps.tools.registry import ToolRegistry
    from a4ps.tools.sandbox import make_sandbox
    from a4ps.tools.tool_forge import ToolForge, ToolSpec, build_prompt

    tmp = Path(tempfile.mkdtemp(prefix="a4ps-bench-"))
    settings = load_settings(data_dir=tmp / "data")
    sb = make_sandbox(settings)
    if not sb.available:
        print(f"sandbox unavailable: {sb.reason}")
        return 1
    rows = []

    sb.run("print(1)")     # warm the page cache
    lat, inner = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        res = sb.run("print('ok')")
        lat.append(time.perf_counter() - t0)
        inner.append(res.wall_s)
        assert res.stdout == "ok\n", res
    rows.append(row("sandbox.run trivial script", lat, f"interpreter {sb.python}"))

    runsc = shutil.which(settings.sandbox.runsc_path)
    bare = []
    for _ in range(min(args.runs, 10)):
        t0 = time.perf_counter()
        subprocess.run([runsc, "--rootless", "--network=none", "do", "/bin/true"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        bare.append(time.perf_counter() - t0)
    rows.append(row("bare `runsc do /bin/true`", bare, "reference: no bundle, no python"))

    bus = EventBus()
    reg = ToolRegistry(ProtoManager(bus), settings, bus, sandbox=sb, tools_dir=tmp / "tools")
    forge = ToolForge(reg, sb, lambda spec, fb: GOOD, settings, bus)
    spec = ToolSpec(name="median_of", description="median of numbers",
                    examples=[{"args": {"values": [1, 5, 2]}, "result": 2}])
    t0 = time.perf_counter()
    out = forge.forge(spec)
    rows.append(row("forge cycle, scripted writer", [time.perf_counter() - t0],
                    f"ok={out.ok} attempts={out.attempts}"))

    calls = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        assert reg.call("median_of", {"values": [i, 1, 2]}) is not None
        calls.append(time.perf_counter() - t0)
    rows.append(row("registry.call (tool call)", calls, "tool file + args in, result.json out"))

    if not args.no_model:
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
        why = "created" if out.ok else f"rejected: {(out.reason or '')[:60]}"
        rows.append(row("forge cycle, embedded SmolLM2-135M", [time.perf_counter() - t0],
                        f"1 attempt, {why}; model load {load_s:.1f}s not counted"))
        mm.release()

    sb.close()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'what':38} {'n':>3} {'p50 s':>7} {'p95 s':>7} {'min s':>7}  note")
    for name, n, p50, p95, mn, note in rows:
        print(f"{name:38} {n:>3} {p50:7.3f} {p95:7.3f} {mn:7.3f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
