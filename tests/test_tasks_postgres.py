"""The task queue on a real PostgreSQL server (``tasks.queue = "postgres://…"``).

First the queue contract both queues keep (run on SQLite and on PostgreSQL, so they
cannot drift apart), then what only a shared queue has: several queue objects (daemons)
claiming at once, requeueing the tasks of a daemon that died (closed, SIGKILLed, or cut
off from the database), self-generated tasks staying with the daemon that made them,
and an owner-only finish.
"""
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
from a4ps.task_queues import open_task_queue
from a4ps.tasks import SqliteTaskQueue, TaskNotFound, TaskQueue
from a4ps.tasks_postgres import PostgresTaskQueue, TaskQueueUnavailable

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgres"])
def make_queue(request, settings):
    """Queue objects on one store: ``make_queue(name)`` is another daemon's connection."""
    made = []

    def make(worker_name: str = "daemon-a", bus=None):
        if request.param == "sqlite":
            q = SqliteTaskQueue(settings.tasks_path, bus=bus)
        else:
            dsn = getattr(make, "dsn", None) or request.getfixturevalue("pg_dsn")
            make.dsn = dsn
            q = PostgresTaskQueue(dsn, bus=bus, worker_name=worker_name)
        made.append(q)
        return q
    make.kind = request.param
    yield make
    for q in made:
        q.close()


@pytest.fixture
def pg_queues(pg_dsn):
    made = []

    def make(worker_name: str, **kw) -> PostgresTaskQueue:
        q = PostgresTaskQueue(pg_dsn, worker_name=worker_name, **kw)
        made.append(q)
        return q
    make.dsn = pg_dsn
    yield make
    for q in made:
        q.close()


def swept(recover, timeout: float = 10.0) -> list:
    """``recover()`` until it finds something: a closed session's backend exits (and
    frees its lock) a moment after the client hangs up."""
    deadline = time.monotonic() + timeout
    while not (found := recover()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


# -- the contract both queues keep ---------------------------------------------------------

def test_settings_pick_the_queue(settings, pg_dsn):
    q = open_task_queue(settings)
    assert isinstance(q, SqliteTaskQueue) and isinstance(q, TaskQueue)
    q.close()
    settings.tasks.queue = pg_dsn
    q = open_task_queue(settings)
    assert isinstance(q, PostgresTaskQueue) and isinstance(q, TaskQueue)
    assert q.worker_name.endswith(f":{settings.data_dir}")
    q.close()


def test_submit_get_order_and_event(make_queue, bus):
    rec = EventRecorder(bus)
    q = make_queue(bus=bus)
    t = q.submit("What is a living image?", meta={"client": "cli", "n": [1, 2]})
    assert q.get(t.id).to_dict() == t.to_dict()
    assert rec.wait_for("task.queued", timeout=1).payload["task_id"] == t.id
    g1 = q.submit("goal urgent", origin="motivator", priority=-100)
    u_low = q.submit("user later", priority=50)
    u1 = q.submit("user first")
    assert q.claim(allow_self_generated=False).id == t.id
    assert [q.claim().id for _ in range(3)] == [u1.id, u_low.id, g1.id]
    assert q.claim() is None
    for bad in (dict(text=""), dict(text="x", origin=""), dict(text="x", priority=True),
                dict(text="x", meta=["no"])):
        with pytest.raises(ValueError):
            q.submit(**bad)
    with pytest.raises(TaskNotFound, match="no task with id"):
        q.get("nope")


def test_lifecycle_cancel_list_and_counts(make_queue):
    q = make_queue()
    a, b, c = q.submit("a"), q.submit("b"), q.submit("c")
    q.submit("g", origin="motivator")
    assert q.pending_count() == 4 and q.pending_count(origin="motivator") == 1
    assert q.cancel(c.id) and q.get(c.id).status == "cancelled"
    ta = q.claim()
    assert ta.id == a.id and ta.status == "running" and ta.started >= ta.created
    assert q.finish(a.id, {"answer": 42, "path": Path("/x")})
    done = q.get(a.id)
    assert done.status == "done" and done.result == {"answer": 42, "path": "/x"}
    assert not q.finish(a.id, {"again": True})
    assert q.claim().id == b.id
    assert q.cancel(b.id) and q.cancel_requested(b.id) and q.get(b.id).status == "running"
    assert q.cancel(b.id, force=True) and q.get(b.id).status == "cancelled"
    assert not q.cancel(b.id)
    assert q.fail(q.claim().id, "model returned empty text twice")
    assert [t.status for t in q.list(limit=4)] == ["failed", "cancelled", "cancelled", "done"]
    with pytest.raises(ValueError, match="unknown task status"):
        q.list(status="pending")


def test_a_graceful_stop_requeues_without_an_attempt_a_crash_counts_one(make_queue):
    """The daemon that stops gracefully marks its unfinished task (interrupt) and goes;
    the one that crashes just goes. The next recover (a restart, or another daemon)
    re-queues the first as it was and counts an attempt against the second."""
    a = make_queue("daemon-a")
    graceful, crashed = a.submit("graceful"), a.submit("crashed")
    assert a.claim().id == graceful.id and a.claim().id == crashed.id
    assert a.interrupt(graceful.id) and not a.interrupt("nope" * 8)
    a.close()
    b = make_queue("daemon-b")
    rec = {t.id: t for t in swept(b.recover)}
    assert set(rec) == {graceful.id, crashed.id}
    assert (rec[graceful.id].status, rec[graceful.id].attempts,
            rec[graceful.id].interruptions) == ("queued", 0, 1)
    assert (rec[crashed.id].status, rec[crashed.id].attempts,
            rec[crashed.id].interruptions) == ("queued", 1, 0)
    assert not any(t.interrupted for t in rec.values())


def test_claim_waits_and_sees_another_connections_task(make_queue):
    q, other = make_queue("daemon-a"), make_queue("daemon-b")
    t0 = time.monotonic()
    assert q.claim(timeout=0.3) is None and time.monotonic() - t0 >= 0.28
    threading.Timer(0.2, lambda: other.submit("from another daemon")).start()
    got = q.claim(timeout=5)
    assert got is not None and got.text == "from another daemon"


def test_concurrent_claims_hand_each_task_out_once(make_queue):
    queues = [make_queue("daemon-a"), make_queue("daemon-b")]
    ids = {queues[0].submit(f"t{i}").id for i in range(120)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(q):
        while (t := q.claim()) is not None:
            with lock:
                claimed.append(t.id)
            assert q.finish(t.id, {"ok": True})

    threads = [threading.Thread(target=worker, args=(queues[i % 2],)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(claimed) == sorted(ids)                 # every task exactly once
    assert len(queues[1].list(status="done", limit=1000)) == 120


# -- what only the shared queue has ---------------------------------------------------------

def test_a_closed_daemons_running_task_is_requeued_not_a_live_ones(pg_queues):
    a, b = pg_queues("daemon-a"), pg_queues("daemon-b")
    t1, t2 = a.submit("one"), a.submit("two")
    assert a.claim().id == t1.id and b.claim().id == t2.id
    assert a.recover() == [] and b.recover() == []       # both alive: nothing touched
    a.close()                                            # daemon a is gone
    back = swept(lambda: b.recover(max_attempts=3))
    assert [t.id for t in back] == [t1.id]
    assert back[0].status == "queued" and back[0].attempts == 1 and back[0].started is None
    assert b.get(t2.id).status == "running"              # b's own task is left alone
    assert b.claim().id == t1.id


def test_recover_rules_cancel_and_max_attempts(pg_queues):
    b = pg_queues("daemon-b")
    fragile = b.submit("fragile")
    doomed = b.submit("cancel me")
    for attempt in (1, 2, 3):
        a = pg_queues(f"daemon-a{attempt}")
        got = a.claim()
        assert got.id == fragile.id
        if attempt == 1:
            assert a.claim().id == doomed.id and a.cancel(doomed.id)
        a.close()
        rec = {t.id: t for t in swept(lambda: b.recover(max_attempts=3))}
        if attempt == 1:
            assert rec[doomed.id].status == "cancelled"
        if attempt < 3:
            assert rec[fragile.id].status == "queued" and rec[fragile.id].attempts == attempt
    assert rec[fragile.id].status == "failed" and rec[fragile.id].attempts == 3
    assert "interrupted by a daemon crash 3 times" in rec[fragile.id].error


_CLAIMER = r"""
import sys, time
from a4ps.tasks_postgres import PostgresTaskQueue
q = PostgresTaskQueue(sys.argv[1], worker_name="doomed")
t = q.claim(timeout=30)
print("claimed", t.id, flush=True)
time.sleep(120)
"""


def test_sigkilled_daemons_task_goes_to_a_waiting_one(pg_queues):
    survivor = pg_queues("survivor", sweep_interval_s=0.2)
    t = survivor.submit("run me exactly once")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _CLAIMER, pg_queues.dsn],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline().split()
        assert line == ["claimed", t.id], line
        assert survivor.claim() is None                  # it runs on the other daemon
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    got = survivor.claim(timeout=10)                     # the sweep finds the orphan
    assert got is not None and got.id == t.id and got.attempts == 1
    assert survivor.finish(t.id, {"ok": True}) and survivor.get(t.id).status == "done"


def test_self_generated_tasks_stay_with_their_daemon(pg_queues):
    a, b = pg_queues("host1:/data/a"), pg_queues("host2:/data/b")
    goal = a.submit("reflect on your codex", origin="motivator")
    user = a.submit("a user task")
    assert a.pending_count(origin="motivator") == 1 and b.pending_count(origin="motivator") == 0
    assert b.pending_count() == 1
    assert b.claim().id == user.id and b.claim() is None  # not a's goal
    assert a.claim().id == goal.id and a.finish(goal.id, {"ok": True})
    # a restarted daemon (same name, new connection) finds its pinned goals again
    g2 = a.submit("another goal", origin="reflection")
    a.close()
    assert pg_queues("host1:/data/a").claim().id == g2.id


def test_a_daemon_cut_off_loses_its_task_and_cannot_overwrite_it(pg_queues):
    import psycopg
    a, b = pg_queues("daemon-a"), pg_queues("daemon-b")
    t = a.submit("contended")
    assert a.claim().id == t.id
    with psycopg.connect(pg_queues.dsn, autocommit=True) as admin:   # a network blip
        admin.execute("SELECT pg_terminate_backend(%s)", (a._live.info.backend_pid,))
    assert [x.id for x in swept(b.recover)] == [t.id]
    assert b.claim().id == t.id
    assert not a.finish(t.id, {"from": "a"})              # it is b's now
    assert b.finish(t.id, {"from": "b"})
    assert a.get(t.id).result == {"from": "b"}
    # a's next claim notices its lost liveness session and takes its lock again, so
    # what it claims now is not mistaken for a dead daemon's task
    later = a.submit("a still works")
    assert a.claim().id == later.id
    assert b.recover() == [] and a.get(later.id).status == "running"
    assert a.finish(later.id, {"from": "a"})


def test_unreachable_database_and_bad_settings_are_explained(tmp_path):
    from a4ps.config import SettingsError, load_settings
    from ports import free_port
    with pytest.raises(SettingsError, match=r"tasks.queue.*PostgreSQL URL"):
        load_settings(data_dir=tmp_path, tasks={"queue": "redis://localhost/0"})
    with pytest.raises(TaskQueueUnavailable, match=r"cannot reach the PostgreSQL task queue "
                                                   r"at postgres://u:\*\*\*@"):
        PostgresTaskQueue(f"postgres://u:pw@127.0.0.1:{free_port()}/x", connect_timeout_s=2)


def test_system_status_names_the_shared_stores_without_passwords(data_dir, pg_dsn):
    from a4ps.config import load_settings
    from a4ps.system import System
    secret_dsn = pg_dsn.replace("a4ps@", "a4ps:hunter2@")     # trust auth ignores it
    s = load_settings(data_dir=data_dir, models={"backend": "scripted",
                                                 "embedding_backend": "hash"},
                      tasks={"queue": secret_dsn}, cognition={"checkpointer": secret_dsn})
    with System(s).start(services=False) as system:
        assert isinstance(system.tasks, PostgresTaskQueue)
        stores = system.status()["stores"]
        assert stores["tasks"] == stores["checkpoints"] == pg_dsn.replace("a4ps@", "a4ps:***@")
        assert stores["memory"] == str(s.memory_dir)
        t = system.tasks.submit("hello")
        system.run_task(system.tasks.claim())
        assert system.tasks.get(t.id).status == "done"


def test_graceful_interrupt_preemption_requeue_and_cancel_reason(pg_queues):
    """The stop semantics the daemon's graceful stop (interrupt) and goal preemption
    (requeue) use: neither counts an attempt; only the owner may do either."""
    a, b = pg_queues("daemon-a"), pg_queues("daemon-b")
    slow, goal, doomed = a.submit("slow"), a.submit("goal"), a.submit("doomed")
    assert a.claim().id == slow.id and b.claim().id == goal.id
    assert [t.id for t in a.running()] == [slow.id]
    assert {t.id for t in a.running(all_daemons=True)} == {slow.id, goal.id}
    # preemption: back to the queue as it was, by its owner only
    assert not a.requeue(goal.id, reason="a user task came", by="u1")
    assert b.requeue(goal.id, reason="a user task came", by="u1")
    g = b.get(goal.id)
    assert g.status == "queued" and g.attempts == 0 and g.meta["preempted"] == 1
    assert g.meta["last_stop"]["by"] == "u1"
    # a graceful stop marks the task it could not finish, then the daemon goes away
    assert not b.interrupt(slow.id) and a.interrupt(slow.id)
    a.close()
    back = swept(b.recover)
    assert [t.id for t in back] == [slow.id]
    assert back[0].status == "queued" and back[0].attempts == 0       # no attempt counted
    assert not back[0].interrupted and back[0].interruptions == 1
    assert b.cancel(doomed.id, reason="not needed any more")
    assert b.get(doomed.id).error == "not needed any more"
