"""Durable task queue: ordering, states, concurrency, and no task lost to SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from a4ps.events import EventRecorder
from a4ps.tasks import SqliteTaskQueue, TaskNotFound

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def queue(settings, bus):
    q = SqliteTaskQueue(settings.tasks_path, bus=bus)
    yield q
    q.close()


def test_submit_get_roundtrip_and_event(queue, bus, settings):
    rec = EventRecorder(bus)
    t = queue.submit("What is a living image?", meta={"client": "cli"})
    assert t.status == "queued" and t.origin == "user" and t.priority == 0
    got = queue.get(t.id)
    assert got.to_dict() == t.to_dict()
    assert got.meta == {"client": "cli"}
    ev = rec.wait_for("task.queued", timeout=1)
    assert ev.payload["task_id"] == t.id and ev.payload["origin"] == "user"
    assert settings.tasks_path.exists()


def test_default_priorities_and_validation(queue):
    assert queue.submit("goal", origin="motivator").priority == 10
    assert queue.submit("mine", priority=5).priority == 5
    for bad in (dict(text=""), dict(text="   "), dict(text="x", origin=""),
                dict(text="x", priority="high"), dict(text="x", priority=True),
                dict(text="x", meta=["no"])):
        with pytest.raises(ValueError):
            queue.submit(**bad)
    with pytest.raises(TaskNotFound, match="no task with id"):
        queue.get("nope")
    with pytest.raises(KeyError):
        queue.cancel("nope")


def test_user_tasks_always_before_self_generated(queue):
    g1 = queue.submit("goal urgent", origin="motivator", priority=-100)
    r1 = queue.submit("reflect", origin="reflection")
    u_low = queue.submit("user later", priority=50)
    u1 = queue.submit("user first")
    u2 = queue.submit("user second")
    order = [queue.claim().id for _ in range(5)]
    assert order == [u1.id, u2.id, u_low.id, g1.id, r1.id]
    assert queue.claim() is None


def test_allow_self_generated_false_only_hands_out_user_tasks(queue):
    queue.submit("goal", origin="motivator")
    assert queue.claim(allow_self_generated=False) is None
    u = queue.submit("user")
    assert queue.claim(allow_self_generated=False).id == u.id
    assert queue.claim(allow_self_generated=True).origin == "motivator"


def test_lifecycle_finish_fail_and_timestamps(queue):
    a, b = queue.submit("a"), queue.submit("b")
    ta = queue.claim()
    assert ta.id == a.id and ta.status == "running" and ta.started >= ta.created
    assert queue.finish(a.id, {"answer": 42, "dissonance": [0.5, 0.2]})
    done = queue.get(a.id)
    assert done.status == "done" and done.result == {"answer": 42, "dissonance": [0.5, 0.2]}
    assert done.finished >= done.started
    assert not queue.finish(a.id, {"again": True})       # already terminal
    assert queue.get(a.id).result == {"answer": 42, "dissonance": [0.5, 0.2]}
    queue.claim()
    assert queue.fail(b.id, "model returned empty text twice")
    fb = queue.get(b.id)
    assert fb.status == "failed" and fb.error == "model returned empty text twice"


def test_cancel_queued_and_running(queue):
    q1, r1 = queue.submit("q1"), queue.submit("r1")
    assert queue.cancel(q1.id)
    assert queue.get(q1.id).status == "cancelled"
    running = queue.claim()
    assert running.id == r1.id                           # cancelled one never handed out
    assert queue.cancel(r1.id)
    t = queue.get(r1.id)
    assert t.status == "running" and t.cancel_requested and queue.cancel_requested(r1.id)
    assert queue.cancel(r1.id, force=True)               # worker confirms it stopped
    assert queue.get(r1.id).status == "cancelled"
    assert not queue.cancel(r1.id)                       # already finished


def test_list_and_pending_count(queue):
    a = queue.submit("a")
    queue.submit("g", origin="motivator")
    queue.submit("r", origin="reflection")
    assert queue.pending_count() == 3
    assert queue.pending_count(origin="user") == 1
    assert queue.pending_count(origin="motivator") == 1
    queue.claim()
    assert [t.id for t in queue.list(status="running")] == [a.id]
    assert len(queue.list(status=["queued", "running"])) == 3
    assert [t.text for t in queue.list(limit=2)] == ["r", "g"]     # newest first
    with pytest.raises(ValueError, match="unknown task status"):
        queue.list(status="pending")


def test_persists_across_reopen(settings):
    q = SqliteTaskQueue(settings.tasks_path)
    t = q.submit("survive me", meta={"k": "v"})
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.get(t.id)
    q2 = SqliteTaskQueue(settings.tasks_path)
    assert q2.get(t.id).meta == {"k": "v"}
    assert q2.claim().id == t.id
    q2.close()


def test_recover_requeues_then_fails_after_max_attempts(settings):
    q = SqliteTaskQueue(settings.tasks_path)
    t = q.submit("fragile")
    c = q.submit("cancel me")
    q.claim(), q.claim()
    q.cancel(c.id)                                       # running, cancel requested
    for attempt in (1, 2):
        rec = {r.id: r for r in q.recover(max_attempts=3)}
        assert rec[t.id].status == "queued" and rec[t.id].attempts == attempt
        assert rec[t.id].started is None
        if attempt == 1:
            assert rec[c.id].status == "cancelled"
        assert q.claim().id == t.id
    rec = q.recover(max_attempts=3)
    assert rec[0].status == "failed" and rec[0].attempts == 3
    assert "interrupted by a daemon crash 3 times" in rec[0].error
    assert q.recover() == []
    q.close()


def test_claim_waits_for_a_task_and_times_out(queue):
    t0 = time.monotonic()
    assert queue.claim(timeout=0.3) is None
    assert time.monotonic() - t0 >= 0.28
    threading.Timer(0.2, lambda: queue.submit("late")).start()
    got = queue.claim(timeout=5)
    assert got is not None and got.text == "late"


def test_claim_sees_tasks_from_another_connection(settings, queue):
    other = SqliteTaskQueue(settings.tasks_path)
    threading.Timer(0.2, lambda: other.submit("from another process")).start()
    got = queue.claim(timeout=5)
    assert got is not None and got.text == "from another process"
    other.close()


def test_concurrent_claims_hand_each_task_out_once(settings):
    q = SqliteTaskQueue(settings.tasks_path)
    q2 = SqliteTaskQueue(settings.tasks_path)      # a second connection competes too
    ids = {q.submit(f"t{i}", origin="user" if i % 2 else "motivator").id for i in range(120)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(queue):
        while (t := queue.claim()) is not None:
            with lock:
                claimed.append(t.id)
            queue.finish(t.id, {"ok": True})

    threads = [threading.Thread(target=worker, args=(q if i % 2 else q2,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sorted(claimed) == sorted(ids)                 # every task exactly once
    assert q.pending_count() == 0
    assert len(q.list(status="done", limit=1000)) == 120
    q.close(), q2.close()


_CHILD = r"""
import sys, time
from a4ps.tasks import SqliteTaskQueue
q = SqliteTaskQueue(sys.argv[1])
mode = sys.argv[2]
if mode == "submit":
    i = 0
    while True:
        t = q.submit(f"task {i}", origin="user" if i % 3 else "motivator")
        print(t.id, flush=True)          # printed only after submit() returned
        i += 1
else:
    t = q.claim()
    print("claimed", t.id, flush=True)
    time.sleep(60)
"""


def _spawn(path: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def test_sigkill_never_loses_a_submitted_task(settings):
    path = settings.tasks_path
    proc = _spawn(path, "submit")
    acked: list[str] = []
    try:
        while len(acked) < 60:
            line = proc.stdout.readline()
            assert line, "child exited early"
            acked.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)                 # mid-stream, no cleanup
        proc.wait(10)
        acked += [ln.strip() for ln in proc.stdout.read().splitlines() if ln.strip()]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    q = SqliteTaskQueue(path)
    for task_id in acked:
        assert q.get(task_id).status == "queued"
    assert q.pending_count() >= len(acked)

    # Now a worker is killed while running a task: recover() puts it back.
    proc = _spawn(path, "claim")
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "claimed"
        running_id = line[1]
        assert q.get(running_id).status == "running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    recovered = q.recover()
    assert [t.id for t in recovered] == [running_id]
    assert q.get(running_id).status == "queued" and q.get(running_id).attempts == 1
    q.close()


def test_a_graceful_interruption_is_not_a_crash(settings):
    """Failure 1: every restart counted an attempt, so two graceful stops of a task
    that was making progress got it failed as 'what crashes the daemon'."""
    q = SqliteTaskQueue(settings.tasks_path)
    t = q.submit("long but fine")
    for stop in range(5):                       # five graceful stops mid-task
        assert q.claim().id == t.id
        assert q.interrupt(t.id) is True
        assert q.get(t.id).status == "running" and q.get(t.id).interrupted
        (rec,) = q.recover(max_attempts=3)
        assert rec.status == "queued" and rec.attempts == 0 and not rec.interrupted
        assert rec.interruptions == stop + 1
    # the crash cap still holds for unclean deaths
    for attempt in (1, 2, 3):
        assert q.claim().id == t.id
        (rec,) = q.recover(max_attempts=3)
        assert rec.attempts == attempt
    assert rec.status == "failed" and "crash 3 times" in rec.error
    assert q.interrupt(t.id) is False            # not running: nothing to mark
    q.close()


def test_an_older_queue_file_gains_the_new_columns(settings):
    import sqlite3
    db = sqlite3.connect(settings.tasks_path)
    db.executescript("""CREATE TABLE tasks (seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE, text TEXT NOT NULL, origin TEXT NOT NULL,
        priority INTEGER NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,
        started REAL, finished REAL, result TEXT, error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0, meta TEXT NOT NULL DEFAULT '{}',
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        is_self INTEGER GENERATED ALWAYS AS (origin != 'user') VIRTUAL);
        INSERT INTO tasks (id, text, origin, priority, status, created)
        VALUES ('old', 'from before', 'user', 0, 'running', 1.0);""")
    db.close()
    q = SqliteTaskQueue(settings.tasks_path)
    (rec,) = q.recover()
    assert rec.id == "old" and rec.attempts == 1 and rec.interruptions == 0
    q.close()


def test_queue_files_are_private(settings):
    import stat
    old = os.umask(0o022)
    try:
        q = SqliteTaskQueue(settings.tasks_path)
        q.submit("secret plans")
    finally:
        os.umask(old)
    for p in settings.tasks_path.parent.glob(settings.tasks_path.name + "*"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    q.close()
    os.chmod(settings.tasks_path, 0o644)          # a file from before: tightened
    SqliteTaskQueue(settings.tasks_path).close()
    assert stat.S_IMODE(settings.tasks_path.stat().st_mode) == 0o600
