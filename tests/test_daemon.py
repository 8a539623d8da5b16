"""The daemon over real sockets.

Two layers: the server (commands, events, bad input, lock, token, shutdown) in this
process against a small System stand-in built from the real parts that don't load
models (EventBus, ProtoManager, TaskQueue, Codex); then the real ``a4ps daemon`` in a
subprocess on temp data with the scripted chat backend.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from a4ps import protocol as P
from a4ps.client import DaemonClient, DaemonError, EventSubscriber
from a4ps.config import PROJECT_ROOT, load_settings
from a4ps.daemon import Daemon, DaemonLock, DaemonLockError, ensure_token
from daemon_process import DaemonProcess
from ports import free_addr


# -- a System stand-in made of the real light parts -----------------------------------

class _State:
    value = "created"


class StandInSystem:
    """What Daemon needs from System; run_task publishes steps like the graph does."""

    def __init__(self, settings, step_delay: float = 0.0) -> None:
        from a4ps.codex import Codex
        from a4ps.events import EventBus
        from a4ps.proto import ProtoManager
        from a4ps.tasks import SqliteTaskQueue
        self.settings = settings
        self.bus = EventBus()
        self.protos = ProtoManager(self.bus)
        self.tasks = SqliteTaskQueue(settings.tasks_path, bus=self.bus)
        self.codex = Codex.from_toml(PROJECT_ROOT / "config" / "codex.toml", self.bus)
        self.tools = type("Tools", (), {"list": staticmethod(lambda: [{"name": "add"}])})()
        self.state = _State()
        self.step_delay = step_delay
        self.saves = 0
        self.stopped = False

    def start(self, lock=None, skip_newer_image=False):
        self.protos.create("persona", {"temperature": 0.7},
                           methods={"greet": "def greet(self):\n    return 'hi'\n"})
        self.protos.clone("persona", "BRICK", role="logician")
        self.state.value = "started"

    def stop(self):
        self.save()
        self.stopped = True
        self.tasks.close()

    def save(self):
        self.saves += 1
        (self.settings.data_dir / "saved.json").write_text(
            json.dumps({n: p.to_dict() for n, p in ((p.name, p) for p in self.protos)}))
        return {"saves": self.saves}

    def status(self):
        return {"state": self.state.value, "queue": {"pending": self.tasks.pending_count()}}

    def snapshot(self):
        return {"protos": [p.to_dict() for p in self.protos], "tools": self.tools.list(),
                "codex": self.codex.to_dict(), "status": self.status()}

    def run_task(self, task, cancel=None):
        for i, persona in enumerate(("BRICK", "ROBIN", "ALFRED")):
            time.sleep(self.step_delay)
            self.bus.publish("task.step", {"task_id": task.id, "node": persona.lower(),
                                           "persona": persona, "text": f"step {i}",
                                           "round": 1, "dissonance": 0.1})
        self.tasks.finish(task.id, {"answer": "42"})
        self.bus.publish("task.done", {"task_id": task.id, "answer": "42"})


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A started in-process daemon, a client and a subscriber."""
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free_addr())
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", free_addr())
    monkeypatch.setenv("A4PS_BUS__HEARTBEAT_INTERVAL_S", "0.2")
    monkeypatch.setenv("A4PS_BUS__MAX_MESSAGE_BYTES", "65536")
    settings = load_settings(data_dir=tmp_path / "data")
    system = StandInSystem(settings)
    daemon = Daemon(system, shutdown_grace_s=5).start()
    client = DaemonClient.from_settings(settings, timeout=5)
    sub = EventSubscriber.from_settings(settings)
    wait_alive(sub)
    yield settings, system, daemon, client, sub
    sub.close()
    client.close()
    daemon.stop()


def wait_alive(sub: EventSubscriber, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not sub.alive and time.monotonic() < deadline:
        sub.poll(100, timeout_ms=100)
    assert sub.alive, "no heartbeat from the daemon"


def collect(sub: EventSubscriber, until, timeout: float = 10) -> list[P.EventMessage]:
    out: list[P.EventMessage] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out.extend(sub.poll(500, timeout_ms=50))
        if until(out):
            return out
    raise AssertionError(f"timed out; got {[(e.topic, e.payload) for e in out][-20:]}")


def test_task_submit_streams_steps_and_done(env):
    settings, system, daemon, client, sub = env
    task = client.request("task.submit", {"text": "what is 6*7?"})
    evs = collect(sub, lambda es: any(e.topic == "task.done" for e in es))
    mine = [e for e in evs if e.payload.get("task_id") == task["id"]]
    assert [e.topic for e in mine] == ["task.queued", "task.step", "task.step", "task.step",
                                       "task.done"]
    assert mine[-1].payload["answer"] == "42"
    seqs = [e.seq for e in evs]
    assert seqs == sorted(seqs) and sub.missed == 0
    assert client.request("task.get", {"id": task["id"]})["status"] == "done"
    assert [t["id"] for t in client.request("task.list", {"status": "done"})] == [task["id"]]


def test_proto_update_publishes_and_bad_updates_change_nothing(env):
    settings, system, daemon, client, sub = env
    before = client.request("proto.get", {"name": "BRICK"})
    out = client.request("proto.update", {"name": "BRICK", "slots": {"mood": "stern"},
                                          "expected_version": before["version"]})
    assert out["slots"]["mood"] == "stern" and out["version"] == before["version"] + 1
    evs = collect(sub, lambda es: any(e.topic == "proto.changed" for e in es))
    changed = [e for e in evs if e.topic == "proto.changed"][-1]
    assert changed.payload["name"] == "BRICK" and changed.payload["keys"] == ["mood"]

    good = client.request("proto.get", {"name": "BRICK"})
    bad = [
        ({"name": "BRICK", "slots": {"x": 1}, "methods": {"greet": "def greet(self):\n  return ("}},
         "invalid_args"),                                 # method does not compile
        ({"name": "BRICK", "slots": {"_hidden": 1}}, "invalid_args"),
        ({"name": "BRICK", "delete": ["nope"]}, "invalid_args"),
        ({"name": "BRICK", "slots": {"x": 1}, "expected_version": 1}, "conflict"),
        ({"name": "NOBODY", "slots": {"x": 1}}, "not_found"),
        ({"name": "BRICK", "slots": "notadict"}, "invalid_args"),
    ]
    for args, code in bad:
        with pytest.raises(DaemonError) as e:
            client.request("proto.update", args)
        assert e.value.code == code, (args, e.value)
    assert client.request("proto.get", {"name": "BRICK"}) == good
    assert system.protos.get("BRICK").greet() == "hi"

    # a method edit that compiles goes live
    client.request("proto.update", {"name": "BRICK",
                                    "methods": {"greet": "def greet(self):\n    return 'yo'\n"}})
    assert system.protos.get("BRICK").greet() == "yo"


def test_other_commands(env):
    settings, system, daemon, client, sub = env
    assert client.request("system.ping")["pong"] is True
    names = [p["name"] for p in client.request("proto.list")]
    assert names == ["persona", "BRICK"]
    assert client.request("tool.list") == [{"name": "add"}]
    codex = client.request("codex.get")
    assert codex["version"] == 1 and "BRICK" in codex["personas"]
    prop = client.request("codex.propose", {"persona": "BRICK", "principle_id": "rigour",
                                            "proposed_text": "Be rigorous and brief.",
                                            "rationale": "tests"})
    with pytest.raises(DaemonError) as e:
        client.request("codex.decide", {"proposal_id": prop["id"], "version": 99,
                                        "approve": True})
    assert e.value.code == "conflict"
    with pytest.raises(DaemonError) as e:
        client.request("codex.decide", {"proposal_id": "nope", "version": 1, "approve": True})
    assert e.value.code == "not_found"
    out = client.request("codex.decide", {"proposal_id": prop["id"], "version": 1,
                                          "approve": True, "reason": "ok"})
    assert out["status"] == "approved" and out["codex_version"] == 2
    snap = client.request("system.snapshot")
    assert {"protos", "tools", "codex", "status", "daemon"} <= set(snap)
    assert snap["daemon"]["boot_id"] == daemon.boot_id and snap["daemon"]["seq"] > 0
    status = client.request("system.status")
    assert status["daemon"]["threads"]["a4ps-bus"] and status["daemon"]["threads"]["a4ps-worker"]
    assert client.request("system.save") == {"saves": 1}
    with pytest.raises(DaemonError) as e:
        client.request("task.get", {"id": "missing"})
    assert e.value.code == "not_found"
    system.step_delay = 0.3  # the worker is busy with t1 while t2 waits in the queue
    client.request("task.submit", {"text": "first"})
    t2 = client.request("task.submit", {"text": "later", "priority": 5})
    assert client.request("task.cancel", {"id": t2["id"]})["status"] == "cancelled"
    with pytest.raises(DaemonError) as e:
        client.request("task.cancel", {"id": t2["id"]})
    assert e.value.code == "conflict"


def test_register_adds_a_command(env):
    settings, system, daemon, client, sub = env
    seen = []
    daemon.register("motivator.pause", lambda a: seen.append(a.paused) or {"paused": a.paused},
                    P.PauseArgs)
    assert client.request("motivator.pause", {"paused": True}) == {"paused": True}
    assert seen == [True]
    with pytest.raises(DaemonError) as e:
        client.request("motivator.pause", {"paused": "very"})
    assert e.value.code == "invalid_args"


def test_token_refused_and_file_mode(env):
    settings, system, daemon, client, sub = env
    assert stat.S_IMODE(settings.token_path.stat().st_mode) == 0o600
    for token in ("", "wrong", client.token + "x"):
        with DaemonClient(settings.bus.command_addr, token=token, timeout=5) as c:
            with pytest.raises(DaemonError) as e:
                c.request("system.status")
            assert e.value.code == "unauthorized"
    # a request with no token key at all
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.connect(settings.bus.command_addr)
        s.send_multipart([b"", msgpack.packb({"v": 1, "id": "n", "cmd": "system.status"})])
        assert s.poll(5000)
        reply = P.decode_reply(s.recv_multipart()[1])
        assert not reply.ok and reply.error.code == "unauthorized" and reply.id == "n"
    finally:
        ctx.destroy(linger=0)


def _fuzz_messages(rng: random.Random, token: str, limit: int) -> list[list[bytes]]:
    def rand_obj(depth=0):
        kinds = [lambda: rng.randint(-2**40, 2**40), lambda: rng.random(), lambda: None,
                 lambda: rng.choice([True, False]), lambda: rng.randbytes(rng.randint(0, 8)),
                 lambda: "".join(rng.choice("ab.c_\u00e9") for _ in range(rng.randint(0, 8)))]
        if depth < 3:
            kinds += [lambda: [rand_obj(depth + 1) for _ in range(rng.randint(0, 3))],
                      lambda: {rng.choice(["id", "v", "cmd", "token", "args", "x"]):
                               rand_obj(depth + 1) for _ in range(rng.randint(0, 5))}]
        return rng.choice(kinds)()

    cmds = list(P.COMMANDS) + ["nope", "", "task", "proto.update.x"]
    msgs = []
    for i in range(3000):
        kind = i % 8
        if kind == 0:
            body = rng.randbytes(rng.randint(0, 200))
        elif kind == 1:
            body = msgpack.packb(rand_obj(), use_bin_type=True)
        elif kind == 2:  # valid envelope, random args
            body = msgpack.packb({"v": 1, "id": str(i), "token": token, "cmd": rng.choice(cmds),
                                  "args": {k: rand_obj() for k in
                                           rng.sample(["text", "name", "id", "slots", "methods",
                                                       "priority", "limit", "status", "approve",
                                                       "version", "delete"], 3)}})
        elif kind == 3:  # wrong token
            body = P.encode_request("system.status", {}, "bad" + str(i), str(i))
        elif kind == 4:  # wrong version / wrong types in the envelope
            body = msgpack.packb({"v": rand_obj(), "id": rand_obj(), "token": token,
                                  "cmd": rand_obj(), "args": rand_obj()})
        elif kind == 5:  # truncated valid message
            full = P.encode_request("proto.get", {"name": "BRICK"}, token, str(i))
            body = full[:rng.randint(0, len(full) - 1)]
        elif kind == 6:  # bad framing
            msgs.append(rng.choice([[b"x", b"y", b"z"], [b""], [b"", b"", b""],
                                    [b"", P.encode_request("system.ping", {}, token, "f"), b"x"]]))
            continue
        else:  # too large
            body = P.encode_request("task.submit", {"text": "x" * (limit + rng.randint(1, 500))},
                                    token, str(i))
        msgs.append([b"", body])
    return msgs


def test_fuzz_then_a_normal_command_succeeds(env):
    settings, system, daemon, client, sub = env
    rng = random.Random(1234)
    limit = settings.bus.max_message_bytes
    msgs = _fuzz_messages(rng, client.token, limit)
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.connect(settings.bus.command_addr)
        codes: dict[str, int] = {}
        replies = 0
        for m in msgs:
            s.send_multipart(m)
        deadline = time.monotonic() + 60
        while replies < len(msgs) and time.monotonic() < deadline:
            if not s.poll(2000):
                break
            frames = s.recv_multipart()
            body = frames[-1]
            reply = P.decode_reply(body)
            replies += 1
            key = "ok" if reply.ok else reply.error.code
            codes[key] = codes.get(key, 0) + 1
        # every message got exactly one reply, each with a code
        assert replies == len(msgs), codes
        for code in ("bad_msgpack", "bad_request", "unauthorized", "too_large", "bad_frame",
                     "invalid_args", "unknown_command"):
            assert codes.get(code), (code, codes)
        # a huge message (past zmq's cut-off) is dropped without killing the daemon
        s.send_multipart([b"", b"\x00" * (3 * limit + 70_000)])
    finally:
        ctx.destroy(linger=0)
    assert client.request("system.ping")["pong"] is True
    assert client.request("proto.get", {"name": "BRICK"})["name"] == "BRICK"
    assert daemon.daemon_status()["threads"]["a4ps-bus"]


def test_second_daemon_refused_and_stale_lock_taken_over(tmp_path):
    lock_path = tmp_path / "daemon.lock"
    first = DaemonLock(lock_path).acquire()
    with pytest.raises(DaemonLockError, match=str(os.getpid())):
        DaemonLock(lock_path).acquire()
    first.release()
    # a stale lock file (pid of a process that is gone, no flock held) is taken over
    lock_path.write_text("999999\n")
    again = DaemonLock(lock_path).acquire()
    assert lock_path.read_text().splitlines()[0] == str(os.getpid())
    again.release()


def test_token_created_0600_and_reused(tmp_path):
    path = tmp_path / "daemon.token"
    old = os.umask(0)
    try:
        tok = ensure_token(path)
    finally:
        os.umask(old)
    assert len(tok) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    assert ensure_token(path) == tok and stat.S_IMODE(path.stat().st_mode) == 0o600


def _daemon_running_a_task(tmp_path, monkeypatch, text: str, step_delay: float,
                           shutdown_grace_s: float):
    """A started Daemon over a StandInSystem whose worker has (within 5 s) claimed
    a task submitted with ``text``."""
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free_addr())
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", free_addr())
    settings = load_settings(data_dir=tmp_path / "data")
    system = StandInSystem(settings, step_delay=step_delay)
    daemon = Daemon(system, shutdown_grace_s=shutdown_grace_s).start()
    task = system.tasks.submit(text)
    deadline = time.monotonic() + 5
    while daemon.current_task is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return settings, system, daemon, task


def test_stop_waits_for_the_running_task_then_saves(tmp_path, monkeypatch):
    settings, system, daemon, task = _daemon_running_a_task(
        tmp_path, monkeypatch, "slow one", step_delay=0.3, shutdown_grace_s=10)
    assert daemon.current_task is not None
    t0 = time.monotonic()
    assert daemon.stop() is True
    assert time.monotonic() - t0 < 5
    assert system.stopped and (settings.data_dir / "saved.json").exists()
    from a4ps.tasks import SqliteTaskQueue
    with SqliteTaskQueue(settings.tasks_path) as q:
        assert q.get(task.id).status == "done"
    assert not (settings.data_dir / "daemon.lock").read_text().strip()  # released


def test_stop_after_grace_leaves_the_task_to_resume(tmp_path, monkeypatch):
    _, system, daemon, task = _daemon_running_a_task(
        tmp_path, monkeypatch, "very slow", step_delay=0.6, shutdown_grace_s=0.3)
    t0 = time.monotonic()
    assert daemon.stop() is False
    assert time.monotonic() - t0 < 2
    assert system.saves == 1 and not system.stopped
    assert system.tasks.get(task.id).status == "running"  # recover() re-queues it
    daemon._worker.join(5)


# -- the real daemon in a subprocess ----------------------------------------------------

def DaemonProc(data_dir: Path, cmd_addr: str, ev_addr: str, grace: float = 20,
               env: dict[str, str] | None = None, preexec_fn=None) -> DaemonProcess:
    """A daemon subprocess, spawned (call ``wait_ready``): the one shared helper."""
    return DaemonProcess(data_dir, cmd_addr, ev_addr, grace=grace, env=env,
                         preexec_fn=preexec_fn).spawn()


@pytest.fixture
def procs(tmp_path):
    started: list[DaemonProc] = []
    data = tmp_path / "data"
    data.mkdir()
    addrs = (free_addr(), free_addr())

    def start(**kw) -> DaemonProc:
        d = DaemonProc(data, *addrs, **kw)
        started.append(d)
        return d
    yield start
    for d in started:
        d.kill()
        d.log.close()


@pytest.mark.slow
def test_real_daemon_task_events_over_the_socket(procs):
    d = procs()
    d.wait_ready()
    sub = EventSubscriber.from_settings(d.settings)
    try:
        wait_alive(sub)
        with d.client() as c:
            task = c.request("task.submit", {"text": "Name one prime number."})
            evs = collect(sub, lambda es: any(e.topic in ("task.done", "task.failed")
                                              and e.payload.get("task_id") == task["id"]
                                              for e in es), timeout=120)
            mine = [e for e in evs if e.payload.get("task_id") == task["id"]]
            topics = [e.topic for e in mine]
            assert topics[-1] == "task.done", (topics, mine[-1].payload, d.output()[-3000:])
            steps = [e.payload for e in mine if e.topic == "task.step"]
            assert steps and all({"persona", "text", "node"} <= set(s) for s in steps)
            assert c.request("task.get", {"id": task["id"]})["status"] == "done"
            snap = c.request("system.snapshot")
            assert {"ALFRED", "BRICK", "ROBIN"} <= {p["name"] for p in snap["protos"]}
            assert c.request("motivator.pause", {"paused": True})["paused"] is True
            assert c.request("system.status")["motivator"]["paused"] is True
    finally:
        sub.close()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(60) == 0, d.output()[-3000:]


@pytest.mark.slow
def test_real_daemon_restart_lock_sigkill_and_sigterm(procs):
    d = procs()
    d.wait_ready()
    # this subscriber lives across the SIGKILL and the restart below
    sub = EventSubscriber(d.settings.bus.event_addr, heartbeat_interval_s=0.5, dead_after_s=2)
    wait_alive(sub)
    sub.mark_synced()
    first_boot = sub.last_heartbeat["boot_id"]
    with d.client() as c:
        c.request("proto.update", {"name": "BRICK", "slots": {"mood": "stern"}})
        evs = collect(sub, lambda es: any(e.topic == "proto.changed"
                                          and e.payload.get("name") == "BRICK" for e in es))
        assert any("mood" in e.payload["keys"] for e in evs if e.topic == "proto.changed")
        assert stat.S_IMODE(d.settings.token_path.stat().st_mode) == 0o600
        c.request("system.save")

    # a second daemon on the same data dir refuses, naming the first one's pid
    second = procs()
    assert second.proc.wait(120) == 1
    assert f"pid {d.proc.pid}" in second.output()

    # SIGKILL the first: the lock is stale, a new daemon takes over and loads the image
    d.proc.kill()
    d.proc.wait(10)
    deadline = time.monotonic() + 10
    while sub.alive and time.monotonic() < deadline:
        sub.poll(100, timeout_ms=100)
    assert not sub.alive  # missing heartbeats: the daemon is gone
    third = procs()
    third.wait_ready()
    try:  # the same subscriber reconnects to the new daemon and asks for a resync
        # wait for the new daemon's *heartbeat*: any event (its "daemon started" log)
        # makes the subscriber alive, and under load that one can arrive first while
        # last_heartbeat is still the old daemon's
        deadline = time.monotonic() + 20
        while sub.last_heartbeat["boot_id"] == first_boot and time.monotonic() < deadline:
            sub.poll(100, timeout_ms=100)
        assert sub.last_heartbeat["boot_id"] != first_boot, "no heartbeat from the new daemon"
        assert sub.alive and sub.resync_needed
    finally:
        sub.close()
    with third.client() as c:
        assert c.request("proto.get", {"name": "BRICK"})["slots"]["mood"] == "stern"
        c.request("proto.update", {"name": "BRICK", "slots": {"mood": "mellow"}})
    image = third.settings.image_path
    before = image.stat().st_mtime_ns
    third.proc.send_signal(signal.SIGTERM)
    assert third.proc.wait(60) == 0, third.output()[-3000:]
    assert image.stat().st_mtime_ns > before  # saved on the way out

    fourth = procs()
    fourth.wait_ready()
    with fourth.client() as c:
        assert c.request("proto.get", {"name": "BRICK"})["slots"]["mood"] == "mellow"
    fourth.proc.send_signal(signal.SIGINT)
    assert fourth.proc.wait(60) == 0


def test_cli_status_talks_to_the_daemon(env, capsys):
    from a4ps.cli import main
    settings, system, daemon, client, sub = env
    assert main(["--data-dir", str(settings.data_dir), "status", "--timeout", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["daemon"]["boot_id"] == daemon.boot_id


def test_cli_status_without_a_daemon(tmp_path, monkeypatch, capsys):
    from a4ps.cli import main
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free_addr())
    assert main(["--data-dir", str(tmp_path), "status", "--timeout", "0.3"]) == 1
    assert "not running" in capsys.readouterr().out


class _MotivatorStandIn:
    """Only what the worker asks of the motivator: may it claim self-generated work?"""

    def __init__(self, allow: bool) -> None:
        self.allow_self_generated = allow


def test_idle_worker_publishes_system_idle_and_honours_the_motivator(tmp_path, monkeypatch):
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free_addr())
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", free_addr())
    settings = load_settings(data_dir=tmp_path / "data", motivator={"idle_after_s": 0.3})
    system = StandInSystem(settings)
    system.motivator = _MotivatorStandIn(allow=False)
    from a4ps.events import EventRecorder
    rec = EventRecorder(system.bus)
    goal = system.tasks.submit("self-set goal", origin="motivator")
    daemon = Daemon(system, shutdown_grace_s=5).start()
    try:
        rec.wait_for("system.idle", timeout=10)
        assert system.tasks.get(goal.id).status == "queued"   # paused: not claimed
        system.motivator.allow_self_generated = True
        rec.wait_for("task.done", timeout=10, where=lambda e: e.payload["task_id"] == goal.id)
        assert system.tasks.get(goal.id).status == "done"
    finally:
        daemon.stop()


# -- issue 13: the bus thread only frames, size-checks and authenticates ---------------

def _raw_dealer(settings):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(settings.bus.command_addr)
    return ctx, s


def _raw_reply(s, timeout_ms=5000) -> P.Reply:
    assert s.poll(timeout_ms), "no reply"
    return P.decode_reply(s.recv_multipart()[-1])


def test_wire_strictness_through_the_daemon(env):
    """Failure 10: requests without v or args, a missing token, a bare [body] frame,
    and coerced values (v "1", priority "5"/true, limit true) were accepted."""
    settings, system, daemon, client, sub = env
    token = client.token
    before = [t.to_dict() for t in system.tasks.list(limit=1000)]
    ctx, s = _raw_dealer(settings)
    try:
        s.send_multipart([P.encode_request("system.ping", {}, token, "bare")])  # no b""
        r = _raw_reply(s)
        assert not r.ok and r.error.code == "bad_frame"
        cases = [
            ({"id": "1", "token": token, "cmd": "task.submit", "args": {"text": "a"}},
             "bad_request"),
            ({"v": 1, "id": "2", "token": token, "cmd": "task.submit"}, "bad_request"),
            ({"v": 1, "id": "3", "cmd": "task.submit", "args": {"text": "a"}}, "unauthorized"),
            ({"v": "1", "id": "4", "token": token, "cmd": "task.submit",
              "args": {"text": "a"}}, "bad_request"),
            ({"v": 1, "id": "5", "token": token, "cmd": "task.submit",
              "args": {"text": "a", "priority": "5"}}, "invalid_args"),
            ({"v": 1, "id": "6", "token": token, "cmd": "task.submit",
              "args": {"text": "a", "priority": True}}, "invalid_args"),
            ({"v": 1, "id": "7", "token": token, "cmd": "task.list",
              "args": {"limit": True}}, "invalid_args"),
        ]
        for msg, code in cases:
            s.send_multipart([b"", msgpack.packb(msg)])
            r = _raw_reply(s)
            assert not r.ok and r.error.code == code, (msg, r)
            assert r.id == msg["id"]
    finally:
        ctx.destroy(linger=0)
    assert [t.to_dict() for t in system.tasks.list(limit=1000)] == before


def compact_map(n: int) -> dict:
    """``n`` short identifier keys ("k" + base-62) with 1-byte values: 150k keys fit
    in a 1 MiB message."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = {}
    for i in range(n):
        k, j = "", i
        while True:
            k, j = digits[j % 62] + k, j // 62
            if not j:
                break
        out["k" + k] = i % 100
    return out


def _pings_while(settings, token, send_hostile, seconds=2.0):
    """Ping latencies (s) measured while ``send_hostile(socket)`` runs on a thread."""
    import threading
    ctx, hostile = _raw_dealer(settings)
    replies: list = []

    def attack():
        n = send_hostile(hostile)
        while len(replies) < n and hostile.poll(30_000):
            replies.append(P.decode_reply(hostile.recv_multipart()[-1]))
    t = threading.Thread(target=attack)
    latencies = []
    with DaemonClient(settings.bus.command_addr, token=token, timeout=10) as c:
        c.request("system.ping")
        t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            c.request("system.ping")
            latencies.append(time.perf_counter() - t0)
    t.join(30)
    ctx.destroy(linger=0)
    return latencies, replies


def test_a_hostile_1mib_message_does_not_stall_the_bus(tmp_path, monkeypatch):
    """Failure 9: a 1 MiB message with 150k keys stalled every client for 3.5 s (0.9 s
    with a wrong token) because the bus thread decoded and validated it."""
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free_addr())
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", free_addr())
    settings = load_settings(data_dir=tmp_path / "data")
    system = StandInSystem(settings)
    daemon = Daemon(system, shutdown_grace_s=5).start()
    try:
        token = daemon.token
        big = compact_map(150_000)
        for tok, code in ((token, "invalid_args"), ("wrong", "unauthorized")):
            body = P.encode_request("proto.update", {"name": "BRICK", "slots": big}, tok, "big")
            pad = settings.bus.max_message_bytes - len(body) - 64
            body = P.encode_request("proto.update", {"name": "BRICK",
                                                     "slots": {**big, "pad": "p" * pad}},
                                    tok, "big")
            assert 1_040_000 < len(body) <= settings.bus.max_message_bytes

            def send(s, body=body):
                for _ in range(3):
                    s.send_multipart([b"", body])
                return 3
            lat, replies = _pings_while(settings, token, send)
            lat.sort()
            assert lat[-1] < 0.5, (tok, lat[-5:])       # was 3.5 s (0.9 s unauthorised)
            assert [r.error.code if r.error else "ok" for r in replies] == [code] * 3
        assert "k1" not in system.protos.get("BRICK").own_slots()
    finally:
        daemon.stop()


def test_graceful_stop_records_a_clean_interruption(tmp_path, monkeypatch):
    """Failure 1 (in-process): the task a stop could not wait for is marked, so the
    next start re-queues it without counting an attempt."""
    settings, system, daemon, task = _daemon_running_a_task(
        tmp_path, monkeypatch, "very slow", step_delay=0.6, shutdown_grace_s=0.3)
    assert daemon.stop() is False
    row = system.tasks.get(task.id)
    assert row.status == "running" and row.interrupted
    daemon._worker.join(5)
    from a4ps.tasks import SqliteTaskQueue
    with SqliteTaskQueue(settings.tasks_path) as q:
        t = q.get(task.id)
        if t.status == "running":                       # the worker did not finish it
            (rec,) = q.recover()
            assert rec.status == "queued" and rec.attempts == 0 and rec.interruptions == 1


# -- the fuzz: every command, wrong types, extreme depth and size; state unchanged -----

@pytest.fixture
def real_env(tmp_path, monkeypatch):
    """A Daemon over the real System (scripted models, hash embedder, services off)."""
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free_addr())
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", free_addr())
    from a4ps.system import System
    settings = load_settings(data_dir=tmp_path / "data",
                             models={"backend": "scripted", "embedding_backend": "hash"},
                             curator={"enabled": False}, motivator={"enabled": False},
                             philosopher={"enabled": False})
    system = System(settings)
    daemon = Daemon(system, shutdown_grace_s=5).start()
    client = DaemonClient.from_settings(settings, timeout=30)
    yield settings, system, daemon, client
    client.close()
    daemon.stop()


def _state(system) -> bytes:
    import pickle
    tasks = [t.to_dict() for t in system.tasks.list(limit=10_000)]
    return pickle.dumps((system.image_parts(), tasks, [(p.name, p.version) for p in system.protos]))


def _bad_values(limit: int) -> tuple[list, list]:
    """(small wrong-type and deep values for every field, big ones for one field)."""
    deep: list = []
    node = deep
    for _ in range(200):
        node.append([])
        node = node[0]
    deep_map: dict = {}
    node = deep_map
    for _ in range(200):
        node["k"] = {}
        node = node["k"]
    small = [None, True, -1, 2**63, 1.5, float("nan"), "", "x" * 300, b"\xff\x00",
             [1, "a"], {"k": "v"}, {"": None}, deep, deep_map]
    big = ["y" * (limit - 4096),                        # just under the wire limit
           list(range(30_000)),                         # too many values
           compact_map(150_000) | {"pad": "p" * 200_000}]   # over the wire limit
    return small, big


# args that are valid except for the field being fuzzed, so the fuzzed value is what
# gets checked (commands other teams add are fuzzed with {} plus the bad field)
_BASE = {"task.submit": {"text": "fuzz"}, "task.get": {"id": "nope"},
         "task.cancel": {"id": "nope"}, "proto.get": {"name": "BRICK"},
         "proto.update": {"name": "BRICK"}, "proto.revert_method": {"name": "BRICK",
                                                                    "method": "invoke_llm"},
         "codex.propose": {"persona": "BRICK", "principle_id": "x", "proposed_text": "t",
                           "rationale": "r"},
         "codex.decide": {"proposal_id": "p", "version": 1, "approve": False},
         "finetune.run": {"persona": "BRICK"}, "models.lineage": {"persona": "BRICK"},
         "models.rollback": {"persona": "BRICK"}}


def _deep(n: int) -> list:
    deep: list = []
    node = deep
    for _ in range(n):
        node.append([])
        node = node[0]
    return deep


# values that pass the wire's types (slots are Any) but that the handler must refuse
_HANDLER_REFUSES = {
    "proto.update": [
        {"slots": {"x": _deep(40)}}, {"slots": {"x": "z" * 300_000}},
        {"slots": {"x": [[[[1]]]] * 20_000}}, {"slots": {"temperature": "hot"}},
        {"slots": {"model_name": None}}, {"slots": {"role": 5}}, {"slots": {"_x": 1}},
        {"slots": {"stop": "END"}}, {"slots": {"max_tokens": 0}},
        {"delete": ["role"]}, {"delete": ["model_name"]}, {"delete": ["no_such"]},
        {"methods": {"m": "@print\ndef m(self):\n    pass\n"}},
        {"methods": {"m": "def m(self, x=__import__('os').getcwd()):\n    pass\n"}},
        {"methods": {"m": "def m(self):\n" + "    x = (" * 200}},
        {"methods": {"m": "def m(self):\n    pass\n" * 10_000}},
        {"expected_version": 10**9, "slots": {"ok": 1}},
    ],
    "proto.revert_method": [{"method": "no_such_method"}],
}


def test_fuzz_every_command_leaves_state_byte_identical(real_env):
    settings, system, daemon, client = real_env
    limit = settings.bus.max_message_bytes
    before = _state(system)
    seen: dict[str, set] = {}
    sent = 0

    def send(cmd: str, args: dict) -> None:
        nonlocal sent
        sent += 1
        try:
            result = client.request(cmd, args)
        except DaemonError as e:
            seen.setdefault(cmd, set()).add(e.code)
            return
        raise AssertionError(f"{cmd} accepted {repr(args)[:200]}: {repr(result)[:200]}")

    small, big = _bad_values(limit)
    for cmd in daemon.commands:
        model = daemon._commands[cmd].args_model
        base = _BASE.get(cmd, {})
        fields = [*model.model_fields, "unexpected"]
        for field in fields:
            for bad in small + (big if field == fields[0] else []):
                args = {**base, field: bad}
                try:
                    P.validate_args(cmd, args, {cmd: model})
                    continue        # a valid value for this field: not what we fuzz here
                except P.ProtocolError:
                    pass
                except Exception:
                    pass            # unencodable locally: the daemon must still cope
                send(cmd, args)
        for extra in _HANDLER_REFUSES.get(cmd, []):
            send(cmd, {**base, **extra})
    assert _state(system) == before
    assert client.request("system.ping")["pong"] is True
    codes = set().union(*seen.values())
    assert {"invalid_args", "too_large"} <= codes, seen
    assert set(seen) == set(daemon.commands), set(daemon.commands) - set(seen)
    assert sent > 300
