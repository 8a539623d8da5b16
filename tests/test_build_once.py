"""models.embedded.build_once: the one "build a cache folder once, under a lock" rule the
dequantized checkpoint, the CTranslate2 model and the ONNX model share."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from a4ps.models.embedded import build_once

MARK = ".a4ps-complete"


def _builder(target: Path, calls: list[int], *, delay: float = 0.0):
    def build() -> None:
        calls.append(1)
        time.sleep(delay)            # long enough for the other callers to queue up
        target.mkdir(parents=True, exist_ok=True)
        (target / "weights.bin").write_bytes(b"x")
        (target / MARK).write_text("done\n")
    return build


def test_concurrent_callers_build_once_and_all_get_the_folder(tmp_path):
    target = tmp_path / "cache" / "ct2-model"
    calls: list[int] = []
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(
        build_once(target, MARK, _builder(target, calls, delay=0.3)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1
    assert got == [target] * 4 and (target / MARK).exists()
    build_once(target, MARK, _builder(target, calls))      # complete: not built again
    assert len(calls) == 1


def test_a_failed_build_raises_leaves_no_marker_and_is_tried_again(tmp_path):
    target = tmp_path / "ort-model"

    def broken() -> None:
        target.mkdir()
        raise RuntimeError("converter exited 1")

    with pytest.raises(RuntimeError, match="converter exited 1"):
        build_once(target, MARK, broken)
    assert not (target / MARK).exists()
    calls: list[int] = []
    assert build_once(target, MARK, _builder(target, calls)) == target
    assert calls == [1]


def test_keep_drops_the_least_recently_built_siblings_not_the_new_one(tmp_path):
    folder = tmp_path / "ct2-adapters"
    for i, name in enumerate(["a", "b", "c"]):
        d = folder / name
        d.mkdir(parents=True)
        (d / MARK).write_text("done\n")
        os.utime(d / MARK, (1000 + i, 1000 + i))            # a oldest, c newest
    (folder / "half-built").mkdir()                         # no marker: not counted
    target = folder / "d"
    build_once(target, MARK, _builder(target, []), keep=2)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["c", "d", "half-built"]
