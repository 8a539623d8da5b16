"""The client library against a tiny real ROUTER/PUB server on loopback."""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from a4ps import protocol as p
from a4ps.client import (DaemonClient, DaemonError, DaemonTimeout, DaemonUnavailable,
                         EventSubscriber, read_token)
from ports import free_addr


class MiniServer:
    """A ROUTER that answers ``echo``, delays ``slow`` and refuses everything else."""

    def __init__(self, addr: str, token: str = "tok") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(addr)
        self.token = token
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, empty, body = self.sock.recv_multipart()
            req = p.decode_request(body)
            if req.token != self.token:
                reply = p.Reply.failure(req.id, p.ErrorCode.UNAUTHORIZED, "bad token")
            elif req.cmd == "echo":
                reply = p.Reply.success(req.id, req.args)
            elif req.cmd == "slow":
                time.sleep(req.args["s"])
                reply = p.Reply.success(req.id, "late")
            else:
                reply = p.Reply.failure(req.id, p.ErrorCode.UNKNOWN_COMMAND, req.cmd)
            self.sock.send_multipart([ident, b"", p.encode_reply(reply)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.ctx.destroy(linger=0)


@pytest.fixture
def addr():
    return free_addr()


def test_request_reply_and_errors(addr):
    srv = MiniServer(addr)
    try:
        with DaemonClient(addr, token="tok", timeout=2) as c:
            assert c.request("echo", {"a": [1, 2]}) == {"a": [1, 2]}
            with pytest.raises(DaemonError) as e:
                c.request("what")
            assert e.value.code == "unknown_command"
        with DaemonClient(addr, token="wrong", timeout=2) as c:
            with pytest.raises(DaemonError) as e:
                c.request("echo")
            assert e.value.code == "unauthorized"
    finally:
        srv.close()


def test_timeout_does_not_wedge_and_late_reply_is_dropped(addr):
    srv = MiniServer(addr)
    try:
        with DaemonClient(addr, token="tok", timeout=2) as c:
            with pytest.raises(DaemonTimeout):
                c.request("slow", {"s": 0.5}, timeout=0.1)
            # the next request gets its own reply, not the late "late"
            assert c.request("echo", {"n": 1}) == {"n": 1}
    finally:
        srv.close()


def test_no_daemon_is_unavailable_fast(addr):
    with DaemonClient(addr, token="tok") as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable):
            c.request("echo", timeout=0.2)
        assert time.monotonic() - t0 < 1.0
        assert c.ping(timeout=0.1) is False


def test_request_queued_for_a_dead_daemon_is_not_replayed_later(addr):
    with DaemonClient(addr, token="tok") as c:
        with pytest.raises(DaemonTimeout):
            c.request("echo", {"first": True}, timeout=0.2)
        srv = MiniServer(addr)
        try:
            assert c.request("echo", {"second": True}, timeout=2) == {"second": True}
            # nothing else arrives at the server side: the first request was dropped
            time.sleep(0.2)
        finally:
            srv.close()


def test_read_token_missing_says_what_to_do(tmp_path):
    with pytest.raises(DaemonUnavailable, match="a4ps daemon"):
        read_token(tmp_path / "nope")
    (tmp_path / "t").write_text("abc\n")
    assert read_token(tmp_path / "t") == "abc"


def test_subscriber_alive_gaps_and_reconnect(addr):
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(addr)
    sub = EventSubscriber(addr, heartbeat_interval_s=0.1, dead_after_s=0.4)
    try:
        assert not sub.alive and sub.resync_needed
        seq = 0

        def send(topic, payload=None, skip=0):
            nonlocal seq
            seq += 1 + skip
            pub.send_multipart(p.encode_event(topic, seq, time.time(), payload or {}))

        got = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:  # slow joiner: resend
            send("heartbeat", {"boot_id": "A"})
            got = sub.poll(10, timeout_ms=50)
        assert sub.alive and got[0].topic == "heartbeat"
        sub.mark_synced()
        send("task.step", {"text": "x"})
        evs = sub.poll(10, timeout_ms=500)
        assert [e.topic for e in evs] == ["task.step"] and not sub.resync_needed
        send("task.done", skip=3)
        sub.poll(10, timeout_ms=500)
        assert sub.missed == 3 and sub.resync_needed
        sub.mark_synced()
        # a restarted daemon: new boot id
        send("heartbeat", {"boot_id": "B"})
        sub.poll(10, timeout_ms=500)
        assert sub.resync_needed
        # silence -> dead -> reconnect
        time.sleep(0.5)
        assert not sub.alive
        assert sub.poll(10) == [] and sub.reconnects == 1
        # the new socket receives again
        got = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            send("heartbeat", {"boot_id": "B"})
            got = sub.poll(10, timeout_ms=50)
        assert got and sub.alive
    finally:
        sub.close()
        ctx.destroy(linger=0)


def test_request_watching_hands_events_over_while_the_command_runs(addr):
    """A long command (curate, image restore) runs on a worker thread while its
    progress events reach ``on_event``; the daemon's refusal is raised to the caller."""
    event_addr = free_addr()
    server = MiniServer(addr)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(event_addr)
    stop = threading.Event()

    def publish() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            for topic in ("progress", "other"):
                pub.send_multipart(p.encode_event(topic, seq, time.time(), {"done": seq}))
            time.sleep(0.05)
    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    client = DaemonClient(addr, event_addr, "tok", timeout=5)
    try:
        seen: list[tuple[str, dict]] = []
        out = client.request_watching("slow", {"s": 1.0},
                                      lambda topic, payload: seen.append((topic, payload)),
                                      topics=["progress"])
        assert out == "late"
        assert seen and {t for t, _ in seen} == {"progress"}
        with pytest.raises(DaemonError) as e:
            client.request_watching("nope", {}, lambda *_: None)
        assert e.value.code == p.ErrorCode.UNKNOWN_COMMAND.value
        assert client.request_watching("echo", {"x": 1}) == {"x": 1}   # no events asked
    finally:
        stop.set()
        publisher.join()
        client.close()
        server.close()
        ctx.destroy(linger=0)
