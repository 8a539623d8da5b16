"""Memory writes when other writers win the commit (several daemons on one memory).

LanceDB retries a lost commit itself for ~30 s, then raises "Too many concurrent
writers" / "Commit conflict". MemoryManager must then store the row exactly once or
say it could not: never drop it silently (the graph would log and move on), never store
it twice (a commit can land although the store reported it failed).

The fast tests here put a stand-in in front of the real LanceDB table that raises
LanceDB's own error text (the real message, captured from a 4-writer run on S3) a given
number of times; the real contention runs in tests/test_memory_s3.py (slow) and in the
local-disk race tests below.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from a4ps.config import load_settings
from a4ps.memory import MemoryManager, MemoryStoreError, is_commit_conflict
from a4ps.models.embeddings import HashEmbedder

ROOT = Path(__file__).resolve().parent.parent
# what lancedb 0.40 raised in a worker that lost six commits in a row (S3, 4 writers)
CONTENTION = RuntimeError(
    "lance error: Too many concurrent writers. Attempted 6 times, but failed on "
    "retry_timeout of 30.000 seconds., /root/.cargo/registry/src/index.crates.io-"
    "1949cf8c6b5b557f/lance-13.0.0/src/io/commit.rs:128:5")
CONFLICT = RuntimeError(
    "lance error: Commit conflict for version 12: This Update transaction is incompatible "
    "with concurrent transaction Rewrite at version 12.")


class LosingTable:
    """Stand-in for contention: the real table, except that the next ``lose`` writes
    raise LanceDB's conflict error; ``land_anyway`` commits the write before raising
    (a commit whose success the store failed to report)."""

    def __init__(self, table, lose: int, error: Exception = CONTENTION,
                 land_anyway: bool = False) -> None:
        self._table, self.lose, self.error, self.land_anyway = table, lose, error, land_anyway
        self.calls = 0

    def _write(self, name: str, *a, **kw):
        self.calls += 1
        if self.lose > 0:
            self.lose -= 1
            if self.land_anyway:
                getattr(self._table, name)(*a, **kw)
            raise self.error
        return getattr(self._table, name)(*a, **kw)

    def add(self, *a, **kw):
        return self._write("add", *a, **kw)

    def update(self, *a, **kw):
        return self._write("update", *a, **kw)

    def __getattr__(self, name):
        return getattr(self._table, name)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    import a4ps.memory as memory_mod
    monkeypatch.setattr(memory_mod, "_RETRY_FIRST_S", 0.01)


@pytest.fixture
def mem(data_dir):
    m = MemoryManager(load_settings(data_dir=data_dir, memory={"commit_retry_s": 10}),
                      HashEmbedder(dim=64), auto_maintain=False)
    yield m
    m.close()


def test_lancedbs_conflict_errors_are_recognised():
    assert is_commit_conflict(CONTENTION) and is_commit_conflict(CONFLICT)
    assert not is_commit_conflict(RuntimeError("lance error: Not found: s3://b/x"))
    assert not is_commit_conflict(ValueError("memory text must be a non-empty string"))


def test_a_write_that_lost_the_commit_is_run_again_and_lands_once(mem):
    mem.table = LosingTable(mem.table, lose=2)
    rid = mem.add("the row that lost twice")
    assert mem.table.calls == 3 and mem.commit_retries == 2
    assert mem.count() == 1 and mem.get(rid).text == "the row that lost twice"


def test_a_commit_that_landed_although_reported_failed_is_not_stored_twice(mem):
    mem.table = LosingTable(mem.table, lose=1, land_anyway=True)
    ids = mem.add_many([{"text": "one"}, {"text": "two"}])
    assert mem.table.calls == 1 and mem.commit_retries == 0     # checked, not rerun
    assert mem.count() == 2 and {r.id for r in mem.recent(5)} == set(ids)


def test_endless_contention_fails_loudly_and_stores_nothing(data_dir):
    mem = MemoryManager(load_settings(data_dir=data_dir, memory={"commit_retry_s": 0.3}),
                        HashEmbedder(dim=64), auto_maintain=False)
    mem.table = LosingTable(mem.table, lose=10_000)
    with pytest.raises(MemoryStoreError, match=r"other writers won the commit.*nothing was "
                                               r"stored.*memory.commit_retry_s"):
        mem.add("never lands")
    assert mem.table.calls >= 2 and mem.count() == 0


def test_other_errors_are_not_retried(mem):
    mem.table = LosingTable(mem.table, lose=1, error=OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        mem.add("no room")
    assert mem.table.calls == 1 and mem.commit_retries == 0


def test_marking_curated_is_rerun_after_a_conflict_with_compaction(mem):
    ids = [mem.add(f"note {i}") for i in range(3)]
    mem.table = LosingTable(mem.table, lose=1, error=CONFLICT)
    assert mem.mark_curated(ids[:2]) == 2
    assert [mem.get(i).curated for i in ids] == [True, True, False]


# -- real contention on local disk ---------------------------------------------------

def race_appends_curation_and_compaction(s) -> None:
    """Two managers (two LanceDB connections, like two daemons) on one memory,
    appending, marking curated and compacting at once: every row lands once and
    every curated flag sticks."""
    a, b = (MemoryManager(s, HashEmbedder(dim=64), auto_maintain=False) for _ in "ab")
    seed = [a.add(f"seed {i}") for i in range(12)]
    errors: list[BaseException] = []

    def run(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    jobs = [lambda: [a.add(f"a-{i} note") for i in range(20)],
            lambda: [b.add(f"b-{i} note") for i in range(20)],
            lambda: [b.mark_curated(seed[i:i + 2]) for i in range(0, 12, 2)],
            lambda: [a.maintain() for _ in range(3)]]
    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    rows = a.recent(100)
    assert sorted(r.text.split()[0] for r in rows if not r.text.startswith("seed")) == \
        sorted(f"{w}-{i}" for w in "ab" for i in range(20))
    assert len(rows) == 52 and len({r.id for r in rows}) == 52
    assert all(a.get(i).curated for i in seed)
    a.close()
    b.close()


def test_two_connections_racing_on_local_disk_lose_nothing(tmp_path):
    race_appends_curation_and_compaction(
        load_settings(data_dir=tmp_path / "d", memory={"uri": str(tmp_path / "shared")}))


@pytest.mark.slow   # three interpreters appending to one local memory at once
def test_three_processes_on_one_local_memory_lose_nothing(tmp_path):
    shared = tmp_path / "shared"
    MemoryManager(load_settings(data_dir=tmp_path / "x", memory={"uri": str(shared)}),
                  HashEmbedder(dim=384), auto_maintain=False).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "A4PS_MEMORY__URI": str(shared)}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "memory_worker.py"),
                               str(tmp_path / w), w, "20"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for w in "abc"]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    mem = MemoryManager(load_settings(data_dir=tmp_path / "x", memory={"uri": str(shared)}),
                        HashEmbedder(dim=384), auto_maintain=False)
    got = sorted(r.text.split()[0] for r in mem.recent(1000))
    assert got == sorted(f"{w}-{i}" for w in "abc" for i in range(20))
    mem.close()


def test_an_undo_delete_is_rerun_after_a_conflict(mem):
    keep = mem.add("kept")
    gone = mem.add_many([{"text": f"imported {i}"} for i in range(3)])

    class LosingDeletes(LosingTable):
        def delete(self, *a, **kw):
            return self._write("delete", *a, **kw)
    mem.table = LosingDeletes(mem.table, lose=1, error=CONFLICT)
    mem.delete(gone)
    assert mem.table.calls == 2 and [r.id for r in mem.recent(10)] == [keep]


def test_a_commit_landing_just_after_lancedb_gave_up_is_not_stored_twice(mem, monkeypatch):
    """LanceDB's retry budget can expire while its last manifest put is still in
    flight; the put then lands a moment later. The retry waits before it looks."""
    import a4ps.memory as memory_mod

    monkeypatch.setattr(memory_mod, "_RETRY_FIRST_S", 0.6)
    real = mem.table

    class LateLanding(LosingTable):
        def add(self, *a, **kw):
            self.calls += 1
            if self.calls == 1:
                threading.Timer(0.1, lambda: real.add(*a, **kw)).start()
                raise CONTENTION
            return real.add(*a, **kw)
    mem.table = LateLanding(real, lose=0)
    mem.add("landed late")
    assert mem.table.calls == 1 and mem.count() == 1
