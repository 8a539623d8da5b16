"""Living-image benchmark: save/load time and size for 100, 1,000 and 10,000 protos,
and the longest a reader waits for the ProtoManager lock while a save runs.

Targets (issue 2): a save of 1,000 protos under 100 ms; readers never blocked more
than 10 ms during a save.
"""
from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

from a4ps.events import EventBus
from a4ps.image import ImageStore
from a4ps.proto import ProtoManager

METHOD = "def describe(self):\n    return f'{self.name} ({self.role}) t={self.temperature}'"


def build(n: int) -> ProtoManager:
    pm = ProtoManager(EventBus())
    pm.create("persona", {"temperature": 0.7, "status": "idle"}, methods={"describe": METHOD})
    for i in range(n - 1):
        pm.clone("persona", f"p{i}", role=f"role {i}", last_utterance="x" * 200,
                 morph_pos=[i % 800, i // 800], history=[{"round": r, "d": r / 10} for r in range(5)])
    return pm


def reader_block_during_save(pm: ProtoManager, store: ImageStore) -> float:
    """Longest single ProtoManager.get() while saves run back to back."""
    worst = 0.0
    stop = threading.Event()

    def saver():
        while not stop.is_set():
            store.save({"protos": pm.image_state()})
    t = threading.Thread(target=saver)
    t.start()
    end = time.perf_counter() + 1.5
    names = pm.names()
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        pm.get(names[i % len(names)]).get("temperature")
        worst = max(worst, time.perf_counter() - t0)
        i += 1
        time.sleep(0.0005)
    stop.set()
    t.join()
    return worst


def main() -> None:
    rows = []
    for n in (100, 1_000, 10_000):
        pm = build(n)
        with tempfile.TemporaryDirectory() as d:
            store = ImageStore(Path(d) / "live_image.dill", Path(d) / "snapshots", 5)
            saves, loads = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                info = store.save({"protos": pm.image_state()})
                saves.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                parts, _ = store.load()
                ProtoManager().restore_image(parts["protos"])
                loads.append(time.perf_counter() - t0)
            block = reader_block_during_save(pm, store)
        rows.append((n, statistics.median(saves) * 1e3, statistics.median(loads) * 1e3,
                     info.bytes / 1024, block * 1e3))
    print(f"{'protos':>8} {'save ms':>9} {'load ms':>9} {'size KiB':>10} {'max reader block ms':>20}")
    for n, s, l, kb, b in rows:
        print(f"{n:>8} {s:>9.1f} {l:>9.1f} {kb:>10.0f} {b:>20.2f}")
    s1000 = rows[1][1]
    print(f"target: save(1,000) < 100 ms -> {'PASS' if s1000 < 100 else 'FAIL'} ({s1000:.1f} ms); "
          f"reader block < 10 ms -> {'PASS' if max(r[4] for r in rows) < 10 else 'FAIL'}")


if __name__ == "__main__":
    main()
