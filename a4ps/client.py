"""Talking to a running daemon: commands (DaemonClient) and events (EventSubscriber).

The CLI and the Kivy UI both use this module; it imports only :mod:`a4ps.protocol`
and pyzmq. Commands go over a DEALER socket with REQ framing (an empty delimiter,
then the body): unlike REQ, a request that timed out doesn't wedge the socket. On a
timeout the socket is rebuilt, so a command queued for a dead daemon is never
delivered to a later one. Events come over SUB; a daemon that stops sending
heartbeats is reported dead (``alive`` is False) and the socket is rebuilt.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import zmq

from .protocol import (HEARTBEAT, ErrorCode, EventMessage, ProtocolError, decode_event,
                       decode_reply, encode_request)

if TYPE_CHECKING:
    from .config import Settings

# ZMTP heartbeats: a hung or vanished peer is noticed in about a second.
_ZMTP_HEARTBEAT_IVL_MS = 500
_ZMTP_HEARTBEAT_TIMEOUT_MS = 1500


class DaemonError(Exception):
    """The daemon answered with an error: ``code`` is an ErrorCode value."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonUnavailable(Exception):
    """No daemon answered (not running, wrong address, or no token file)."""


class DaemonTimeout(DaemonUnavailable):
    """The daemon did not reply in time."""


def read_token(path: Path | str) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise DaemonUnavailable(
            f"no token file at {path}: start the daemon with `a4ps daemon` "
            "(it creates the token on first start)") from None
    except PermissionError:
        raise DaemonUnavailable(f"cannot read the token file {path}: run as the user "
                                "that owns the daemon") from None


def _configure(sock: zmq.Socket[bytes]) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, _ZMTP_HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMTP_HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, _ZMTP_HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)


class DaemonClient:
    """Send commands to the daemon. Thread-safe: requests are serialised by a lock.

    >>> with DaemonClient.from_settings(settings) as c:
    ...     c.request("task.submit", {"text": "hello"})
    """

    def __init__(self, command_addr: str, event_addr: str | None = None, token: str = "",
                 timeout: float = 10.0, *, max_message_bytes: int | None = None,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.command_addr = command_addr
        self.event_addr = event_addr
        self.token = token
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket[bytes] | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{id(self) & 0xffffff:x}-"
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float | None = None,
                      **kw: Any) -> DaemonClient:
        """A client for the daemon configured by ``settings`` (reads settings.token_path)."""
        return cls(settings.bus.command_addr, settings.bus.event_addr,
                   read_token(settings.token_path),
                   timeout=settings.bus.request_timeout_s if timeout is None else timeout,
                   **kw)

    # -- lifecycle -------------------------------------------------------------------
    def _socket(self) -> zmq.Socket[bytes]:
        if self._closed:
            raise DaemonUnavailable("this client is closed")
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            _configure(sock)
            if self.max_message_bytes:
                sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
            sock.connect(self.command_addr)
            self._sock = sock
        return self._sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_socket()
            if self._own_ctx:
                self._ctx.destroy(linger=0)

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def subscriber(self, **kw: Any) -> EventSubscriber:
        """An EventSubscriber on this daemon's event address (shares the context)."""
        if not self.event_addr:
            raise DaemonUnavailable("this client was made without an event address")
        return EventSubscriber(self.event_addr, context=self._ctx, **kw)

    # -- commands --------------------------------------------------------------------
    def request(self, cmd: str, args: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Send ``cmd`` and return its result.

        Raises DaemonError(code, message) when the daemon refuses or fails the
        command, DaemonTimeout/DaemonUnavailable when no reply arrives in time.
        """
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            sock = self._socket()
            rid = f"{self._prefix}{next(self._ids)}"
            body = encode_request(cmd, args, self.token, rid)
            try:
                sock.send_multipart([b"", body], flags=zmq.NOBLOCK)
            except zmq.Again:
                self._drop_socket()
                raise DaemonUnavailable(f"cannot send to the daemon at {self.command_addr}"
                                        " (send queue full): is it running?") from None
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    # rebuild: the queued request must not reach a daemon started later
                    self._drop_socket()
                    raise DaemonTimeout(
                        f"no reply to {cmd!r} from the daemon at {self.command_addr} within "
                        f"{timeout:g}s: is `a4ps daemon` running?")
                frames = sock.recv_multipart()
                if len(frames) != 2 or frames[0] != b"":
                    continue  # not REQ framing: ignore
                try:
                    reply = decode_reply(frames[1])
                except ProtocolError:
                    continue
                if reply.id != rid and reply.id != "":
                    continue  # a late reply to an earlier, timed-out request
                if reply.ok:
                    return reply.result
                err = reply.error
                if reply.id == "" and err is not None and err.code not in (
                        ErrorCode.BAD_FRAME.value, ErrorCode.TOO_LARGE.value,
                        ErrorCode.BAD_MSGPACK.value, ErrorCode.BAD_REQUEST.value):
                    continue
                raise DaemonError(err.code if err else ErrorCode.INTERNAL.value,
                                  err.message if err else "error reply without details")

    def request_watching(self, cmd: str, args: dict[str, Any] | None = None,
                         on_event: Callable[[str, dict[str, Any]], None] | None = None, *,
                         topics: Iterable[str] | None = None,
                         timeout: float | None = None) -> Any:
        """:meth:`request` for a long command (curate, finetune, image restore): it runs
        on a worker thread while this one hands the daemon's events (``topics``; all by
        default) to ``on_event``, so progress shows and Ctrl-C still stops the wait.
        Raises what :meth:`request` raises."""
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["result"] = self.request(cmd, args, timeout=timeout)
            except Exception as e:       # handed to the waiting thread, raised there
                box["error"] = e
        worker = threading.Thread(target=call, daemon=True)
        events = self.subscriber(topics=topics) if on_event is not None else None
        try:
            worker.start()
            while worker.is_alive():
                if events is None or on_event is None:
                    worker.join(0.2)
                    continue
                for ev in events.poll(200, timeout_ms=200):
                    on_event(ev.topic, ev.payload)
        finally:
            if events is not None:
                events.close()
        if "error" in box:
            raise box["error"]
        return box["result"]

    @classmethod
    def if_running(cls, settings: Settings, timeout: float | None = None) -> DaemonClient | None:
        """A connected client when a daemon answers a ping, else None (no token file,
        nothing listening). Commands use it to go through the daemon when one runs."""
        try:
            client = cls.from_settings(settings, timeout=timeout)
        except DaemonUnavailable:
            return None
        if client.ping(timeout=min(client.timeout, 2.0)):
            return client
        client.close()
        return None

    def ping(self, timeout: float = 2.0) -> bool:
        try:
            self.request("system.ping", timeout=timeout)
            return True
        except DaemonUnavailable:
            return False


class EventSubscriber:
    """Receive daemon events without blocking (the UI calls :meth:`poll` from its Clock).

    ``alive`` is True while heartbeats (or any event) keep arriving within
    ``dead_after_s``. ``resync_needed`` turns True at start, after a gap in ``seq``,
    after a daemon restart and after a reconnect: the client then asks
    ``system.snapshot`` and calls :meth:`mark_synced`. ``missed`` counts events known
    lost (only meaningful when subscribed to every topic).
    """

    def __init__(self, event_addr: str, topics: Iterable[str] | None = None, *,
                 heartbeat_interval_s: float = 2.0, dead_after_s: float | None = None,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None,
                 rcvhwm: int = 100_000) -> None:
        self.event_addr = event_addr
        self.topics = list(topics) if topics else [""]
        self.heartbeat_interval_s = heartbeat_interval_s
        self.dead_after_s = dead_after_s or max(3 * heartbeat_interval_s, 1.0)
        self.rcvhwm = rcvhwm
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket[bytes] | None = None
        self._last_seen: float | None = None
        self._last_seq: int | None = None
        self._boot_id: str | None = None
        self._connected_at = 0.0
        self.missed = 0
        self.reconnects = 0
        self.resync_needed = True
        self.last_heartbeat: dict[str, Any] | None = None
        self._connect()

    @classmethod
    def from_settings(cls, settings: Settings, topics: Iterable[str] | None = None,
                      **kw: Any) -> EventSubscriber:
        return cls(settings.bus.event_addr, topics,
                   heartbeat_interval_s=settings.bus.heartbeat_interval_s, **kw)

    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.SUB)
        _configure(sock)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        for t in self.topics:
            sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        sock.connect(self.event_addr)
        self._sock = sock
        self._connected_at = time.monotonic()

    def reconnect(self) -> None:
        """Rebuild the SUB socket (called by :meth:`poll` when heartbeats stop)."""
        if self._sock is not None:
            self._sock.close(linger=0)
        self._connect()
        self.reconnects += 1
        self._last_seq = None
        self.resync_needed = True

    @property
    def alive(self) -> bool:
        return (self._last_seen is not None
                and time.monotonic() - self._last_seen < self.dead_after_s)

    def mark_synced(self) -> None:
        self.resync_needed = False

    def poll(self, max_events: int = 500, timeout_ms: int = 0) -> list[EventMessage]:
        """Up to ``max_events`` events; waits at most ``timeout_ms`` for the first one."""
        if self._sock is None:
            return []
        out: list[EventMessage] = []
        sock = self._sock
        if timeout_ms and not sock.poll(timeout_ms, zmq.POLLIN):
            self._check_dead()
            return out
        while len(out) < max_events:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                ev = decode_event(frames)
            except ProtocolError:
                continue
            self._track(ev)
            out.append(ev)
        if not out:
            self._check_dead()
        return out

    def _track(self, ev: EventMessage) -> None:
        self._last_seen = time.monotonic()
        if ev.topic == HEARTBEAT:
            self.last_heartbeat = ev.payload
            boot = ev.payload.get("boot_id")
            if boot is not None and boot != self._boot_id:
                if self._boot_id is not None:
                    self.resync_needed = True  # the daemon restarted
                    self._last_seq = None
                self._boot_id = boot
        if self._last_seq is not None:
            if ev.seq <= self._last_seq:
                self.resync_needed = True  # seq went back: a new daemon
            elif ev.seq > self._last_seq + 1 and self.topics == [""]:
                self.missed += ev.seq - self._last_seq - 1
                self.resync_needed = True
        self._last_seq = ev.seq

    def _check_dead(self) -> None:
        now = time.monotonic()
        ref = self._last_seen if self._last_seen is not None else self._connected_at
        if now - ref > self.dead_after_s and now - self._connected_at > self.dead_after_s:
            self.reconnect()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx:
            self._ctx.destroy(linger=0)

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
