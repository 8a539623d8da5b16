"""Memory writes when other writers win the commit (several daemons on one memory).

LanceDB retries a lost commit itself for ~30 s, then raises "Too many concurrent
writers" / "Commit conflict". MemoryManager must then store the row or say it could
not: never drop it silently (the graph would log and move on), and not store it twice
when a commit lands although the store reported it failed (the retry waits, looks, and
an add's rerun inserts only ids not yet present). The window that stays open (a commit
visible only after the rerun read the table) is described in a4ps/memory.py.

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
        self.merge_timeouts: list[float] = []   # the timeout each insert-missing rerun got

    def _write(self, name: str, *a, **kw):
        return self._run(lambda: getattr(self._table, name)(*a, **kw))

    def _run(self, do):
        self.calls += 1
        if self.lose > 0:
            self.lose -= 1
            if self.land_anyway:
                do()
            raise self.error
        return do()

    def add(self, *a, **kw):
        return self._write("add", *a, **kw)

    def merge_insert(self, on):
        """An add's rerun: ``merge_insert(on).when_not_matched_insert_all().execute()``,
        counted and lost like any other write."""
        outer, builder = self, self._table.merge_insert(on)

        class Builder:
            def when_not_matched_insert_all(self):
                builder.when_not_matched_insert_all()
                return self

            def execute(self, data, **kw):
                outer.merge_timeouts.append(kw["timeout"].total_seconds())
                return outer._run(lambda: builder.execute(data, **kw))
        return Builder()

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
    with pytest.raises(MemoryStoreError, match=r"other writers won the commit.*had not taken "
                                               r"effect.*may yet land.*memory.commit_retry_s"):
        mem.add("never lands")
    assert mem.table.calls >= 2 and mem.count() == 0
    # the reruns were bounded by the time left (at least the 1 s minimum), not LanceDB's 30 s
    assert mem.table.merge_timeouts and max(mem.table.merge_timeouts) <= 1.0


def test_an_adds_reruns_get_the_time_left_as_their_timeout(mem):
    mem.table = LosingTable(mem.table, lose=3)
    mem.add("lost three times")
    t = mem.table.merge_timeouts
    assert mem.table.calls == 4 and len(t) == 3 and mem.count() == 1
    assert all(0 < x <= 10 for x in t) and t == sorted(t, reverse=True)


def test_a_rerun_that_hit_its_timeout_is_checked_and_run_again(mem):
    class TimingOut(LosingTable):
        def add(self, *a, **kw):
            self.calls += 1
            raise CONTENTION

        def merge_insert(self, on):
            if len(self.merge_timeouts) == 0:
                self.error, self.lose = RuntimeError("Runtime error: merge insert timed out"), 1
            return super().merge_insert(on)
    mem.table = TimingOut(mem.table, lose=0)
    mem.add("the rerun timed out once")
    assert mem.table.calls == 3 and mem.count() == 1


def test_a_rerun_does_not_insert_a_row_that_landed_after_the_check(mem, monkeypatch):
    """The first attempt's commit becomes visible only after the retry looked (a
    manifest put whose response was lost, or a slow store): the rerun inserts only the
    ids not yet present, so the row is not stored twice."""
    real, pending = mem.table, []

    class LandsAfterTheCheck(LosingTable):
        def add(self, *a, **kw):
            self.calls += 1
            pending.append(lambda: real.add(*a, **kw))
            raise CONTENTION
    has_id = mem._has_id

    def check_then_land(memory_id):
        seen = has_id(memory_id)
        while pending:          # the late landing becomes visible just after the check
            pending.pop()()
        return seen
    monkeypatch.setattr(mem, "_has_id", check_then_land)
    mem.table = LandsAfterTheCheck(real, lose=0)
    rid = mem.add("landed after the check")
    assert mem.table.calls == 2 and mem.commit_retries == 1     # it was rerun ...
    assert mem.count() == 1 and mem.get(rid).text == "landed after the check"  # ... once


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
    flight; the put then lands a moment later. The retry waits before it looks: the
    landing is made to happen during that wait (the backoff sleep joins it), so a check
    made before the wait would miss it and rerun (calls == 2)."""
    import a4ps.memory as memory_mod

    real, landings, put_answered = mem.table, [], threading.Event()

    def sleep_until_landed(_seconds):
        put_answered.set()
        for t in landings:
            t.join(30)
    monkeypatch.setattr(memory_mod, "_sleep", sleep_until_landed)

    def land_late(*a, **kw):
        put_answered.wait(30)       # the store answers the put only once the retry waits
        real.add(*a, **kw)

    class LateLanding(LosingTable):
        def add(self, *a, **kw):
            self.calls += 1
            if self.calls == 1:
                landings.append(threading.Thread(target=land_late, args=a, kwargs=kw))
                landings[-1].start()    # in flight; lands during the backoff sleep
                raise CONTENTION
            return real.add(*a, **kw)
    mem.table = LateLanding(real, lose=0)
    mem.add("landed late")
    assert mem.table.calls == 1 and mem.commit_retries == 0 and mem.count() == 1
