"""Stopping running tasks: task.cancel within a node (and inside a generation), user
tasks preempting self-generated goals, and limits that survive a restart.

Real parts: System (graph with its SQLite checkpointer, task queue, LanceDB memory with
the hash embedder), the Daemon with its ZeroMQ server and worker, a real daemon
subprocess for the restart. The model is the scripted stand-in with a latency spread
over the streamed words, so a generation takes a known time and a cancel token can
stop it midway, as the embedded backend's StoppingCriteria does (the real-model test
is at the end, marked slow).
"""
from __future__ import annotations

import signal
import threading
import time

import pytest

from a4ps.config import load_settings
from a4ps.events import EventRecorder
from a4ps.models.base import Generation
from a4ps.models.scripted import ScriptedBackend, demo_decision, demo_reply
from a4ps.system import System
from a4ps.task_control import TaskStop, TaskSupervisor

SLOW = 6.0           # seconds per generation of a task marked slow
FAST = 0.15          # seconds per generation of any other task


class PacedBackend(ScriptedBackend):
    """The scripted stand-in, slow for tasks whose text says "slowly" (so a test can
    stop them midway) and quick for the rest."""

    slow_word: str | None = "slowly"

    def generate(self, messages, *, cancel=None, on_token=None, **kw) -> Generation:
        slow = self.slow_word is not None and self.slow_word in str(messages).lower()
        pace = SLOW if slow else FAST
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < pace:          # "thinking", token by token
            if cancel is not None and cancel.is_set():
                return Generation("", 0, time.perf_counter() - t0, None, "cancelled")
            time.sleep(0.02)
        return super().generate(messages, cancel=cancel, on_token=on_token, **kw)


def make_system(data_dir, backend=None, **settings_kw) -> System:
    settings = load_settings(data_dir=data_dir, models={"backend": "scripted",
                                                        "embedding_backend": "hash"},
                             **settings_kw)
    backend = backend or PacedBackend(demo_reply, decide=demo_decision)
    return System(settings, chat_backend=backend).start(services=False)


def steps_of(rec: EventRecorder, task_id: str) -> list[str]:
    return [e.payload["node"] for e in rec.of("task.step") if e.payload.get("task_id") == task_id]


def wait_running(system: System, task_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while system.tasks.get(task_id).status != "running":
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    time.sleep(0.5)                  # well inside its first (slow) generation


def run_in_thread(sup: TaskSupervisor, system: System, task) -> threading.Thread:
    th = threading.Thread(target=sup.run, args=(task, system.run_task), daemon=True)
    th.start()
    return th


def test_task_stop_keeps_the_first_reason():
    stop = TaskStop()
    assert not stop.is_set()
    assert stop.set("preempted", "preempted by user task u1", by="u1", requeue=True)
    assert not stop.set("cancelled", "later")
    assert stop.is_set() and stop.kind == "preempted" and stop.by == "u1" and stop.requeue



def test_a_user_task_found_by_reading_the_queue_is_named_as_the_cause(data_dir):
    """A user task another process queued (no bus event here) preempts a goal through
    the watcher's queue read; the reason and the event name it, as the bus path does."""
    from a4ps.tasks import SqliteTaskQueue
    system = make_system(data_dir)
    try:
        sup = TaskSupervisor(system.tasks, system.bus, poll_s=0.05)
        system.tasks.submit("Write slowly a checklist for proofs by induction.",
                            origin="motivator")
        goal = system.tasks.claim()
        seen: list[TaskStop] = []

        def until_stopped(task, stop):
            seen.append(stop)
            deadline = time.monotonic() + 10
            while not stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.02)
        th = threading.Thread(target=sup.run, args=(goal, until_stopped), daemon=True)
        th.start()
        time.sleep(0.2)
        other = SqliteTaskQueue(system.tasks.path)          # another process's queue
        user = other.submit("How many legs has a spider?")  # (no bus: no task.queued here)
        other.close()
        th.join(10)
        stop = seen[0]
        assert stop.kind == "preempted" and stop.by == user.id
        assert stop.reason == f"preempted by user task {user.id}"
    finally:
        system.stop()

def test_cancel_during_a_generation_stops_it_within_a_bounded_time(data_dir):
    system = make_system(data_dir)
    try:
        rec = EventRecorder(system.bus)
        sup = TaskSupervisor(system.tasks, system.bus)
        task = system.tasks.submit("Explain slowly why the sky is blue.")
        th = run_in_thread(sup, system, system.tasks.claim())
        time.sleep(1.0)                                  # a persona is mid-generation
        t0 = time.monotonic()
        assert system.tasks.cancel(task.id)              # what task.cancel does
        assert sup.cancel(task.id)
        th.join(10)
        elapsed = time.monotonic() - t0
        assert not th.is_alive()
        assert elapsed < SLOW / 3, elapsed               # the generation itself was stopped
        t = system.tasks.get(task.id)
        assert t.status == "cancelled" and "cancelled" in t.error
        ev = rec.wait_for("task.cancelled", timeout=1)
        stopped_in = ev.payload.pop("node")
        assert ev.payload == {"task_id": task.id, "origin": "user", "reason": "cancelled by request",
                              "requeued": False}
        assert stopped_in in ("alfred_route", "brick")  # the node whose generation was cut
        assert stopped_in not in steps_of(rec, task.id)  # ... never finished
        assert not rec.of("task.done")
    finally:
        system.stop()


class DeafBackend(ScriptedBackend):
    """A backend whose generations cannot be interrupted (ignores the cancel token)."""

    def generate(self, messages, *, cancel=None, **kw) -> Generation:
        return super().generate(messages, cancel=None, **kw)


def test_cancel_stops_at_the_next_node_boundary_when_a_generation_cannot_be_stopped(data_dir):
    system = make_system(data_dir, DeafBackend(demo_reply, latency_s=0.6, decide=demo_decision))
    try:
        rec = EventRecorder(system.bus)
        sup = TaskSupervisor(system.tasks, system.bus)
        task = system.tasks.submit("Why do cats purr?")
        th = run_in_thread(sup, system, system.tasks.claim())
        rec.wait_for("task.step", timeout=20, where=lambda e: e.payload["node"] == "recall")
        time.sleep(0.2)                                  # inside BRICK's (deaf) generation
        system.tasks.cancel(task.id)                     # only the flag: as another process would
        th.join(10)
        assert not th.is_alive()
        # BRICK's deaf turn ran out, and the boundary after it stopped the task: its
        # turn is not kept (a resumed run says it again) and no later node ran
        assert steps_of(rec, task.id) == ["alfred_route", "recall"]
        assert system.tasks.get(task.id).status == "cancelled"
        assert rec.of("task.cancelled")[-1].payload["node"] == "brick"
    finally:
        system.stop()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A real Daemon (ZeroMQ, worker, supervisor) over a real System."""
    from a4ps.client import DaemonClient
    from a4ps.daemon import Daemon
    from test_daemon import free_addr
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free_addr())
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", free_addr())
    made = []

    def start(**settings_kw):
        # services not started: the motivator only lets the worker claim goals
        system = make_system(tmp_path / "data", motivator=settings_kw)
        rec = EventRecorder(system.bus)
        daemon = Daemon(system, shutdown_grace_s=5).start()
        client = DaemonClient.from_settings(system.settings, timeout=10)
        made.append((daemon, client))
        return system, daemon, client, rec
    yield start
    for daemon, client in made:
        client.close()
        daemon.stop()


def test_a_user_task_preempts_a_running_goal_which_resumes_later(served):
    system, daemon, client, rec = served()
    goal = system.tasks.submit("Practise slowly summarising a long article in two sentences.",
                               origin="motivator", meta={"kind": "goal"})
    rec.wait_for("task.step", timeout=60, where=lambda e: e.payload["task_id"] == goal.id
                 and e.payload["node"] == "recall")
    time.sleep(0.5)                                      # BRICK is mid-generation
    user = client.request("task.submit", {"text": "What is the capital of France?"})
    first = rec.wait_for("task.step", timeout=30, where=lambda e: e.payload["task_id"] == user["id"])
    # the user task started within one node's time: well before BRICK's turn would end
    started = system.tasks.get(user["id"]).started
    assert started - user["created"] < SLOW / 3, started - user["created"]
    assert first.payload["node"] == "alfred_route"
    assert "brick" not in steps_of(rec, goal.id)[:3]    # the goal's turn was cut short
    pre = rec.wait_for("task.preempted", timeout=1)
    assert pre.payload["task_id"] == goal.id and pre.payload["by"] == user["id"]
    assert pre.payload["requeued"] is True
    cancelled = [e.payload for e in rec.of("task.cancelled") if e.payload["task_id"] == goal.id]
    assert cancelled == [{"task_id": goal.id, "origin": "motivator",
                          "reason": f"preempted by user task {user['id']}", "requeued": True,
                          "node": "brick"}]
    # the user's task finishes, then the goal resumes from its checkpoint and finishes
    rec.wait_for("task.done", timeout=60, where=lambda e: e.payload["task_id"] == user["id"])
    system.models.backend.slow_word = None           # (the rest of the goal at full speed)
    rec.wait_for("task.done", timeout=60, where=lambda e: e.payload["task_id"] == goal.id)
    done = system.tasks.get(goal.id)
    assert done.status == "done" and done.meta["preempted"] == 1 and done.attempts == 0
    assert steps_of(rec, goal.id).count("alfred_route") == 1      # resumed, not restarted
    order = [e.payload["task_id"] for e in rec.of("task.done")]
    assert order == [user["id"], goal.id]


def test_a_preempted_goal_can_be_dropped_instead(served):
    system, daemon, client, rec = served(preempted_goals="drop")
    goal = system.tasks.submit("Write slowly a checklist for proofs by induction.",
                               origin="motivator")
    wait_running(system, goal.id)
    user = client.request("task.submit", {"text": "How many legs has a spider?"})
    rec.wait_for("task.done", timeout=60, where=lambda e: e.payload["task_id"] == user["id"])
    t = system.tasks.get(goal.id)
    assert t.status == "cancelled" and "preempted by user task" in t.error
    ev = [e.payload for e in rec.of("task.cancelled") if e.payload["task_id"] == goal.id][0]
    assert ev["requeued"] is False
    assert not any(e.payload["task_id"] == goal.id for e in rec.of("task.done"))


def test_user_tasks_are_never_preempted(served):
    system, daemon, client, rec = served()
    first = client.request("task.submit", {"text": "Name a prime number."})
    rec.wait_for("task.step", timeout=30, where=lambda e: e.payload["task_id"] == first["id"])
    second = client.request("task.submit", {"text": "Name a colour."})
    rec.wait_for("task.done", timeout=60, where=lambda e: e.payload["task_id"] == second["id"])
    assert system.tasks.get(first["id"]).status == "done"
    assert not rec.of("task.preempted") and not rec.of("task.cancelled")


def test_task_cancel_command_on_a_running_task(served):
    from a4ps.client import DaemonError
    system, daemon, client, rec = served()
    task = client.request("task.submit", {"text": "Explain tides slowly."})
    wait_running(system, task["id"])
    t0 = time.monotonic()
    assert client.request("task.cancel", {"id": task["id"]})["cancel_requested"] is True
    ev = rec.wait_for("task.cancelled", timeout=10)
    assert time.monotonic() - t0 < SLOW / 3             # stopped inside the generation
    assert ev.payload["task_id"] == task["id"] and ev.payload["requeued"] is False
    assert client.request("task.get", {"id": task["id"]})["status"] == "cancelled"
    with pytest.raises(DaemonError):
        client.request("task.cancel", {"id": task["id"]})          # already finished
    # the worker carries on with the next task
    nxt = client.request("task.submit", {"text": "Name a river."})
    rec.wait_for("task.done", timeout=60, where=lambda e: e.payload["task_id"] == nxt["id"])


@pytest.mark.slow
def test_task_cancel_stops_a_real_embedded_generation(data_dir, embedded_models):
    """SmolLM2 generating a long turn: the cancel token stops it within a few tokens."""
    settings = load_settings(data_dir=data_dir, models={"embedding_backend": "hash"})
    system = System(settings, chat_backend=embedded_models.backend).start(services=False)
    try:
        rec = EventRecorder(system.bus)
        sup = TaskSupervisor(system.tasks, system.bus)
        task = system.tasks.submit("Write a long story about a lighthouse keeper and the sea.",
                                   meta={"route": "direct"})
        th = run_in_thread(sup, system, system.tasks.claim())
        rec.wait_for("task.step", timeout=120, where=lambda e: e.payload["node"] == "recall")
        time.sleep(1.0)                                  # ALFRED is generating the answer
        t0 = time.monotonic()
        system.tasks.cancel(task.id)
        sup.cancel(task.id)
        th.join(60)
        elapsed = time.monotonic() - t0
        assert system.tasks.get(task.id).status == "cancelled"
        assert "alfred_synthesize" not in steps_of(rec, task.id)
        stats = system.models.stats()
        # the only generation was the cancelled one: a full answer is up to
        # max_new_tokens; it stopped within a few (the prompt's prefill, which a
        # stopping criterion cannot interrupt, bounds the wait on a busy CPU)
        limit = settings.models.embedded.max_new_tokens
        assert stats["generations"] == 1 and stats["tokens"] < limit / 3, stats
        assert elapsed < 15.0, (elapsed, stats)
    finally:
        system.stop()


# -- durable limits ----------------------------------------------------------------------

def test_counters_and_pause_survive_a_system_restart(data_dir):
    kw = {"motivator": {"goals_per_hour": 1, "daily_budget": 5}}
    system = make_system(data_dir, ScriptedBackend(
        ["GOAL: Compare three ways of estimating a restaurant bill in your head."]), **kw)
    try:
        assert system.motivator.generate_goal() is not None
        about = system.tasks.submit("a diverging user task")
        assert system.motivator.reflect({"task_id": about.id, "text": "x", "dissonance": 0.9})
        system.motivator.pause()
    finally:
        system.stop()
    again = make_system(data_dir, ScriptedBackend(["GOAL: Something else entirely new today."]), **kw)
    try:
        st = again.motivator.status()
        assert st["paused"] is True and st["durable"] is True
        assert st["goals_last_hour"] == 1 and st["self_tasks_today"] == 2
        again.motivator.resume()
        assert again.motivator.generate_goal() is None          # the hour's one goal is spent
        assert again.motivator.status()["skipped"] == {"rate_limit": 1}
        # the reflection already queued for that task is not queued twice
        assert again.motivator.reflect({"task_id": about.id, "text": "x", "dissonance": 0.9}) is None
    finally:
        again.stop()
    third = make_system(data_dir, ScriptedBackend(["GOAL: x"]), **kw)
    try:
        assert third.motivator.paused is False                  # the resume held too
    finally:
        third.stop()


@pytest.mark.slow
def test_real_daemon_restart_keeps_counters_and_pause(tmp_path):
    """A daemon process sets itself a goal when idle; the pause and the hour's count
    survive SIGTERM and a new process (which then sets no second goal)."""
    from test_daemon import DaemonProc, free_addr
    data = tmp_path / "data"
    data.mkdir()
    addrs = (free_addr(), free_addr())
    env = {"A4PS_MOTIVATOR__ENABLED": "true", "A4PS_MOTIVATOR__IDLE_AFTER_S": "0.5",
           "A4PS_MOTIVATOR__GOALS_PER_HOUR": "1"}
    procs: list[DaemonProc] = []

    def start() -> DaemonProc:
        p = DaemonProc(data, *addrs, grace=5, env=env)
        procs.append(p)
        p.wait_ready()
        return p
    try:
        a = start()
        with a.client() as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                st = c.request("system.status")["motivator"]
                if st["goals_last_hour"] == 1:
                    break
                time.sleep(0.3)
            assert st["goals_last_hour"] == 1, (st, a.output()[-2000:])
            assert c.request("motivator.pause", {"paused": True})["paused"] is True
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(60) == 0, a.output()[-3000:]

        b = start()
        with b.client() as c:
            st = c.request("system.status")["motivator"]
            assert st["paused"] is True and st["goals_last_hour"] == 1, st
            c.request("motivator.pause", {"paused": False})
            time.sleep(3)                                   # several idle periods
            st = c.request("system.status")["motivator"]
            assert st["goals_last_hour"] == 1 and st["skipped"].get("rate_limit", 0) >= 1, st
            goals = [t for t in c.request("task.list", {"limit": 100}) if t["origin"] == "motivator"]
            assert len(goals) == 1
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(60) == 0
    finally:
        for p in procs:
            p.kill()
            p.log.close()
