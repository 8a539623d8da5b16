"""`a4ps ask` in-process and through a daemon, and `a4ps memory search`."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

import graph_parts
from a4ps import cli
from ports import free_port as _free_port

LOGIC = ["apples divide into equal integer shares by arithmetic",
         "two each and one apple left, cut the last apple in three"]
FEEL = ["friendship matters more than fairness between people",
        "two each and one apple left, cut the last apple in three"]


@pytest.fixture
def local_system(monkeypatch, bus):
    """Stands in for System in `ask --local`: the real graph on scripted models."""
    import a4ps.system
    made = {}

    class ScriptedSystem:
        def __init__(self, settings, **kw):
            self.bus = bus
            self.parts = graph_parts.build(settings, bus, made["replies"], memory=False,
                                           dissonance_threshold=0.2, max_rounds=3)
            self.graph = self.parts.graph
            made["system"] = self

        def start(self, services=True):
            made["services"] = services
            return self

        def stop(self):
            made["stopped"] = True
            self.graph.close()
    monkeypatch.setattr(a4ps.system, "System", ScriptedSystem)
    return made


def test_ask_local_prints_the_dialogue_and_the_answer(local_system, data_dir, capsys):
    local_system["replies"] = graph_parts.script(
        brick=lambda n: LOGIC[n - 1], robin=lambda n: FEEL[n - 1],
        answer="Give two apples each and share the last one.")
    rc = cli.main(["--data-dir", str(data_dir), "ask", "--local",
                   "How", "should", "three", "friends", "share", "seven", "apples?"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert local_system["services"] is False and local_system["stopped"]
    assert "route: contrapunto" in out
    assert "BRICK [round 1]" in out and "ROBIN [round 1]" in out and "BRICK [round 2]" in out
    assert LOGIC[0] in out and FEEL[0] in out
    assert "dissonance [1]" in out and "dissonance [2]" in out and "converged" in out
    assert "ALFRED's answer (2 round(s), final dissonance 0.000)" in out
    # they agreed on the last round's answer, so that is the answer
    assert out.rstrip().endswith(LOGIC[1])


def test_ask_local_json_and_route(local_system, data_dir, capsys):
    local_system["replies"] = graph_parts.script(route="contrapunto", answer="Hi there.")
    rc = cli.main(["--data-dir", str(data_dir), "ask", "--local", "--json",
                   "--route", "direct", "hello"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert result["route"] == "direct" and result["answer"] == "Hi there."
    assert result["rounds"] == []


def test_ask_local_failure_is_reported_with_its_reason(local_system, data_dir, capsys):
    local_system["replies"] = lambda m: "talk" if graph_parts.is_route(m) else ""   # contrapunto
    rc = cli.main(["--data-dir", str(data_dir), "ask", "--local", "anything"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "! problem" in out and "BRICK: empty reply (after one retry)" in out
    assert "failed: no usable reply from BRICK or ROBIN" in out


def test_ask_with_empty_text_says_what_to_do(data_dir, capsys):
    assert cli.main(["--data-dir", str(data_dir), "ask", "  "]) == 2
    assert "say what you want" in capsys.readouterr().err


# -- through a daemon ----------------------------------------------------------------------

class FakeDaemon:
    """Just enough of the daemon's wire behaviour: ping, task.submit, task.get, events."""

    def __init__(self, cmd_addr: str, ev_addr: str, token: str) -> None:
        import zmq
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(cmd_addr)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(ev_addr)
        self.token = token
        self.submitted: list[dict] = []
        self._stop = threading.Event()
        self._seq = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _event(self, topic: str, payload: dict) -> None:
        from a4ps.protocol import encode_event
        self._seq += 1
        self.pub.send_multipart(encode_event(topic, self._seq, time.time(), payload))

    def _loop(self) -> None:
        import zmq
        from a4ps.protocol import Reply, decode_request, encode_reply
        while not self._stop.is_set():
            if not self.router.poll(50, zmq.POLLIN):
                continue
            ident, empty, body = self.router.recv_multipart()
            req = decode_request(body)
            if req.token != self.token:
                reply = Reply.failure(req.id, "unauthorized", "bad token")
            elif req.cmd == "system.ping":
                reply = Reply.success(req.id, {"pong": True})
            elif req.cmd == "task.submit":
                self.submitted.append(req.args)
                reply = Reply.success(req.id, {"id": "t-d1", "status": "queued"})
            elif req.cmd == "task.get":
                reply = Reply.success(req.id, {"id": req.args["id"], "status": "running"})
            else:
                reply = Reply.failure(req.id, "unknown_command", req.cmd)
            self.router.send_multipart([ident, b"", encode_reply(reply)])
            if req.cmd == "task.submit":
                self._after_submit()

    def _after_submit(self) -> None:
        self._event("task.step", {"task_id": "other", "node": "brick", "persona": "BRICK",
                                  "text": "NOT MINE", "round": 1, "dissonance": None})
        for step in ({"node": "brick", "persona": "BRICK", "text": "Logic.", "round": 1},
                     {"node": "robin", "persona": "ROBIN", "text": "Feeling.", "round": 1},
                     {"node": "measure", "persona": None, "text": "", "round": 1,
                      "dissonance": 0.123, "stop": "converged"}):
            self._event("task.step", {"task_id": "t-d1", "dissonance": None, **step})
        self._event("task.done", {"task_id": "t-d1", "result": {
            "task_id": "t-d1", "status": "ok", "error": None, "answer": "Daemon answer.",
            "rounds": [{"round": 1, "dissonance": 0.123}], "final_dissonance": 0.123}})

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()


def test_ask_submits_to_a_running_daemon_and_prints_its_steps(monkeypatch, data_dir, capsys):
    cmd_addr = f"tcp://127.0.0.1:{_free_port()}"
    ev_addr = f"tcp://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", cmd_addr)
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", ev_addr)
    (data_dir / "daemon.token").write_text("sekrit")
    import a4ps.system

    def no_local(*a, **k):
        raise AssertionError("a daemon answered: ask must not run in-process")
    monkeypatch.setattr(a4ps.system, "System", no_local)
    daemon = FakeDaemon(cmd_addr, ev_addr, "sekrit")
    try:
        rc = cli.main(["--data-dir", str(data_dir), "ask", "--timeout", "20", "what", "now?"])
    finally:
        daemon.close()
    captured = capsys.readouterr()
    assert rc == 0, captured
    assert daemon.submitted == [{"text": "what now?"}]
    assert "submitted task t-d1" in captured.err
    assert "BRICK [round 1]   Logic." in captured.out and "ROBIN [round 1]   Feeling." in captured.out
    assert "0.123  -> converged" in captured.out
    assert "NOT MINE" not in captured.out
    assert captured.out.rstrip().endswith("Daemon answer.")


class StreamingFakeDaemon(FakeDaemon):
    """Publishes BRICK's turn as ``task.token`` deltas (seq out of order once, another
    task's tokens between), pausing between them, before the step and the result."""

    PIECES = ["Seven ", "apples ", "for ", "three ", "friends."]
    PAUSE_S = 0.4

    def __init__(self, *a, **kw) -> None:
        self.published_at: dict[str, float] = {}
        super().__init__(*a, **kw)

    def _after_submit(self) -> None:
        tok = {"task_id": "t-d1", "node": "brick", "persona": "BRICK", "round": 1}
        order = [1, 3, 2, 4, 5]                    # seq 3 arrives before seq 2
        for seq in order:
            self._event("task.token", {**tok, "text": self.PIECES[seq - 1], "seq": seq})
            self._event("task.token", {**tok, "task_id": "other", "text": "NOT MINE", "seq": seq})
            self.published_at.setdefault("first", time.monotonic())
            time.sleep(self.PAUSE_S)
        self.published_at["last"] = time.monotonic()
        self._event("task.step", {"task_id": "t-d1", "node": "brick", "persona": "BRICK",
                                  "text": "".join(self.PIECES), "round": 1, "dissonance": None})
        self._event("task.step", {"task_id": "t-d1", "node": "robin", "persona": "ROBIN",
                                  "text": "Share them.", "round": 1, "dissonance": None})
        self._event("task.done", {"task_id": "t-d1", "result": {
            "task_id": "t-d1", "status": "ok", "error": None, "answer": "Daemon answer.",
            "rounds": [{"round": 1, "dissonance": 0.1}], "final_dissonance": 0.1}})


class TimedOut:
    """stdout that remembers when each piece was written."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(t for _, t in self.writes)


def test_ask_prints_tokens_from_the_daemon_as_they_arrive(monkeypatch, data_dir):
    cmd_addr = f"tcp://127.0.0.1:{_free_port()}"
    ev_addr = f"tcp://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", cmd_addr)
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", ev_addr)
    (data_dir / "daemon.token").write_text("sekrit")
    out = TimedOut()
    monkeypatch.setattr("sys.stdout", out)
    daemon = StreamingFakeDaemon(cmd_addr, ev_addr, "sekrit")
    try:
        rc = cli.main(["--data-dir", str(data_dir), "ask", "--timeout", "20", "share", "apples"])
    finally:
        daemon.close()
    text = out.text()
    assert rc == 0, text
    # in seq order, once (the step that follows does not print the turn again)
    assert "BRICK [round 1]   Seven apples for three friends.\n" in text
    assert text.count("Seven apples") == 1 and "NOT MINE" not in text
    assert "ROBIN [round 1]   Share them." in text
    # as they arrive: the first piece was on the terminal long before the last was sent
    first_write = next(t for t, piece in out.writes if "Seven" in piece)
    assert first_write < daemon.published_at["last"] - StreamingFakeDaemon.PAUSE_S
    assert text.rstrip().endswith("Daemon answer.")


class StreamingGraphStandIn:
    """Stands in for the cognitive graph in `ask --local`: ``run`` publishes BRICK's
    turn as ``task.token`` deltas with pauses, then its ``task.step``, and returns a
    result (the graph's own publishing is tested with the graph)."""

    PIECES = ["Two ", "each, ", "one ", "left."]

    def __init__(self, bus) -> None:
        self.bus = bus
        self.turn_end: float | None = None

    def run(self, task_id, text, route=None):
        where = {"task_id": task_id, "node": "brick", "persona": "BRICK", "round": 1}
        for seq, piece in enumerate(self.PIECES, start=1):
            self.bus.publish("task.token", {**where, "text": piece, "seq": seq})
            time.sleep(0.2)
        self.turn_end = time.monotonic()
        self.bus.publish("task.step", {**where, "text": "".join(self.PIECES),
                                       "dissonance": None})
        return {"task_id": task_id, "status": "ok", "error": None, "answer": "Give two each.",
                "rounds": [{"round": 1, "dissonance": 0.0}], "final_dissonance": 0.0}

    def close(self) -> None:
        pass


def test_ask_in_process_prints_task_token_events_as_they_are_published(
        monkeypatch, bus, data_dir):
    import a4ps.system
    graph = StreamingGraphStandIn(bus)

    class GraphOnlySystem:
        def __init__(self, settings, **kw):
            self.bus, self.graph = bus, graph

        def start(self, services=True):
            return self

        def stop(self):
            pass
    monkeypatch.setattr(a4ps.system, "System", GraphOnlySystem)
    out = TimedOut()
    monkeypatch.setattr("sys.stdout", out)
    rc = cli.main(["--data-dir", str(data_dir), "ask", "--local", "share", "seven", "apples"])
    text = out.text()
    assert rc == 0, text
    assert "BRICK [round 1]   Two each, one left.\n" in text
    assert text.count("Two each, one left.") == 1          # the step did not reprint it
    first = next(t for t, piece in out.writes if "Two " in piece)
    assert first < graph.turn_end - 0.3                     # on screen before the turn ended
    assert text.rstrip().endswith("Give two each.")


def test_ask_without_daemon_runs_in_process(local_system, monkeypatch, data_dir, capsys):
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", f"tcp://127.0.0.1:{_free_port()}")
    (data_dir / "daemon.token").write_text("stale")        # a token but nobody listening
    local_system["replies"] = graph_parts.script(brick="Same.", robin="Same.", answer="Local.")
    t0 = time.monotonic()
    rc = cli.main(["--data-dir", str(data_dir), "ask", "hi", "there"])
    assert rc == 0 and "system" in local_system
    assert capsys.readouterr().out.rstrip().endswith("Same.")
    assert time.monotonic() - t0 < 15


# -- memory search ------------------------------------------------------------------------

@pytest.fixture
def hash_embedder(monkeypatch):
    """The CLI's embedder is the cheap hashing one (MiniLM takes seconds to load)."""
    from a4ps.models import embeddings
    monkeypatch.setattr(embeddings, "make_embedder",
                        lambda settings, backend=None: embeddings.HashEmbedder())


def test_memory_search_shows_what_is_remembered(hash_embedder, settings, data_dir, capsys):
    from a4ps.memory import MemoryManager
    from a4ps.models.embeddings import HashEmbedder
    mem = MemoryManager(settings, HashEmbedder())
    mem.add("Task: share seven apples\nAnswer: two each, cut the last one", persona="ALFRED",
            task_id="t-apples", dissonance=0.25)
    mem.add("Task: why is the sky blue\nAnswer: Rayleigh scattering", persona="ALFRED",
            task_id="t-sky", dissonance=0.1)
    mem.close()
    rc = cli.main(["--data-dir", str(data_dir), "memory", "search", "-k", "1", "share", "apples"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "task t-apples" in out and "dissonance 0.25" in out and "cut the last one" in out
    assert "Rayleigh" not in out

    assert cli.main(["--data-dir", str(data_dir), "memory", "search", "--kind", "dreams",
                     "apples"]) == 2
    assert "kind must be one of" in capsys.readouterr().err


def test_memory_search_on_an_empty_memory(hash_embedder, data_dir, capsys):
    assert cli.main(["--data-dir", str(data_dir), "memory", "search", "anything"]) == 0
    assert "nothing remembered about 'anything'" in capsys.readouterr().out


# -- the real thing: System(settings) in a subprocess ------------------------------------------

@pytest.mark.slow   # two fresh interpreters building a whole System
def test_ask_then_memory_search_through_the_real_system(data_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "A4PS_MODELS__BACKEND": "scripted",
           "A4PS_MODELS__EMBEDDING_BACKEND": "hash",
           "A4PS_BUS__COMMAND_ADDR": f"tcp://127.0.0.1:{_free_port()}"}
    base = [sys.executable, "-m", "a4ps", "--data-dir", str(data_dir)]
    ask = subprocess.run(base + ["ask", "How should three friends share seven apples?"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert ask.returncode == 0, ask.stdout + ask.stderr
    out = ask.stdout
    assert "BRICK [round 1]" in out and "ROBIN [round 1]" in out and "dissonance [1]" in out
    assert "ALFRED's answer" in out and "seven apples" in out.split("ALFRED's answer")[1]
    search = subprocess.run(base + ["memory", "search", "friends share apples"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=root)
    assert search.returncode == 0, search.stdout + search.stderr
    assert "ALFRED  task ask-" in search.stdout and "seven apples" in search.stdout


@pytest.mark.slow   # a real daemon process (scripted model) and a CLI process
def test_ask_through_a_real_daemon(data_dir):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "A4PS_MODELS__BACKEND": "scripted",
           "A4PS_MODELS__EMBEDDING_BACKEND": "hash", "A4PS_MOTIVATOR__ENABLED": "false",
           "A4PS_BUS__COMMAND_ADDR": f"tcp://127.0.0.1:{_free_port()}",
           "A4PS_BUS__EVENT_ADDR": f"tcp://127.0.0.1:{_free_port()}"}
    base = [sys.executable, "-m", "a4ps", "--data-dir", str(data_dir)]
    daemon = subprocess.Popen(base + ["daemon"], env=env, cwd=root, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (data_dir / "daemon.token").exists() and subprocess.run(
                    base + ["status", "--timeout", "1"], env=env, cwd=root,
                    capture_output=True).returncode == 0:
                break
            assert daemon.poll() is None, "the daemon exited during start-up"
            time.sleep(0.5)
        ask = subprocess.run(base + ["ask", "Why is the sky blue?"], env=env, cwd=root,
                             capture_output=True, text=True, timeout=180)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
    assert ask.returncode == 0, ask.stdout + ask.stderr
    assert "submitted task" in ask.stderr
    assert "BRICK [round 1]" in ask.stdout and "dissonance [1]" in ask.stdout
    assert "Why is the sky blue?" in ask.stdout.split("ALFRED's answer")[1]


# -- one writer per image (issue 13) -------------------------------------------------------

def test_ask_refuses_to_be_a_second_writer(monkeypatch, data_dir, capsys):
    """Failure 3 in-process: with the daemon's lock held and its address unreachable,
    `ask` used to run in-process anyway and overwrite the daemon's image."""
    from a4ps.lock import DataLock
    daemon_addr = f"tcp://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", f"tcp://127.0.0.1:{_free_port()}")  # wrong
    monkeypatch.setenv("A4PS_MODELS__BACKEND", "scripted")
    monkeypatch.setenv("A4PS_MODELS__EMBEDDING_BACKEND", "hash")
    (data_dir / "daemon.token").write_text("tok")
    held = DataLock.for_data_dir(data_dir).acquire(kind="daemon", command_addr=daemon_addr)
    try:
        rc = cli.main(["--data-dir", str(data_dir), "ask", "hello"])
        err = capsys.readouterr().err
        assert rc == 1, err
        assert f"pid {os.getpid()}" in err and daemon_addr in err and "second writer" in err
        rc = cli.main(["--data-dir", str(data_dir), "ask", "--local", "hello"])
        assert rc == 1 and "second writer" in capsys.readouterr().err
        assert not (data_dir / "live_image.dill").exists()      # nothing written
    finally:
        held.release()
