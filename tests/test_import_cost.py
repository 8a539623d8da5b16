"""Starting a command is cheap: the entry modules pull no heavy library at import.

``a4ps status`` or the UI's client must not wait for torch or LanceDB to load. Each
heavy library is imported only inside the seam that needs it (the embedded engine,
the memory store, the Kivy app, the PostgreSQL queue, the S3 store, …).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULES = ("a4ps.daemon", "a4ps.cli", "a4ps.client", "a4ps.protocol")
HEAVY = ("torch", "transformers", "lancedb", "kivy", "ctranslate2", "psycopg", "boto3")
BUDGET_S = 0.5

_PROBE = """
import json, sys, time
t0 = time.process_time()
import {module}
took = time.process_time() - t0
print(json.dumps({{"took": took, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def _run(code: str) -> tuple[float, dict[str, object]]:
    """Wall time of a fresh interpreter running ``code``, and what it printed (JSON)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t0
    return wall, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes():
    """``probes(module, n)``: the first ``n`` reports of the import probe for ``module``,
    each a fresh interpreter, run once per module and shared by the two tests below (the
    first run, which writes __pycache__, says what was loaded; the next three time it)."""
    runs: dict[str, list[dict[str, object]]] = {}

    def get(module: str, n: int) -> list[dict[str, object]]:
        got = runs.setdefault(module, [])
        while len(got) < n:
            got.append(_run(_PROBE.format(module=module, heavy=HEAVY))[1])
        return got[:n]
    return get


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_entry_module_imports_no_heavy_library(module: str, probes) -> None:
    report = probes(module, 1)[0]
    assert report["heavy"] == [], (
        f"importing {module} loaded {report['heavy']}: import them inside the "
        "function (seam) that needs them, not at module top")


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_entry_module_imports_fast(module: str, probes) -> None:
    """Best of 3 fresh interpreters, timing the import alone inside each: the
    interpreter's own start is left out (as wall time minus a bare start would), and it
    is the process's CPU time, which other processes on a busy machine do not inflate
    (on an idle machine it is the wall time). Bytecode is cached first, as installed
    (by the first probe run, the one the test above reads)."""
    cost = min(float(r["took"]) for r in probes(module, 4)[1:])
    assert cost < BUDGET_S, (
        f"importing {module} costs {cost:.2f} s (> {BUDGET_S} s); run "
        f"`python -X importtime -c 'import {module}'` to see what is slow")


# The daemon catches these parts' errors at its wire boundary; it builds the parts
# through System (imported when it starts one), so importing it must not load them.
CAUGHT_NOT_LOADED = ("a4ps.fine_tuning.unsloth_forge", "a4ps.persona_file", "a4ps.snapshots",
                     "a4ps.config")

_LOADED = """
import json, sys
import a4ps.daemon
print(json.dumps({{"loaded": [m for m in {mods!r} if m in sys.modules]}}))
"""


def test_daemon_catches_errors_without_importing_their_parts() -> None:
    _, report = _run(_LOADED.format(mods=CAUGHT_NOT_LOADED))
    assert report["loaded"] == [], (
        f"importing a4ps.daemon loaded {report['loaded']}: import the part's error "
        "module (a4ps/fine_tuning/errors.py, a4ps/persona_file_errors.py, "
        "a4ps/snapshot_errors.py) instead of the part")
