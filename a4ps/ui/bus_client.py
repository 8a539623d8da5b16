"""The UI's link to the daemon: commands on a worker thread, replies on the main thread.

A command can take seconds (a daemon that is down times out), so the Kivy main thread
never waits on one: :meth:`CommandRunner.call` queues it, a single worker thread sends
it, and the reply is queued back; :meth:`CommandRunner.drain` — called from the same
Clock tick that polls the SUB socket — runs the callbacks on the main thread, the only
thread that touches widgets. No Kivy here.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from a4ps.client import DaemonError, DaemonUnavailable

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """How a command ended: ``ok`` with ``result``, or an error ``code`` and ``message``."""

    cmd: str
    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""

    @property
    def unavailable(self) -> bool:
        return not self.ok and self.code == "unavailable_daemon"


Callback = Callable[[Reply], None]


class CommandRunner:
    """Sends commands on one worker thread through a client made by ``client_factory``.

    ``client_factory()`` returns an object with ``request(cmd, args, timeout)`` (an
    :class:`a4ps.client.DaemonClient`); it is called again after the daemon was
    unavailable or refused the token, so a restarted daemon is picked up.
    """

    def __init__(self, client_factory: Callable[[], Any], *, timeout: float = 10.0) -> None:
        self._factory = client_factory
        self._timeout = timeout
        self._client: Any = None
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._done: deque[tuple[Callback | None, Reply]] = deque()
        self._closed = False
        self._unanswered = 0     # queued or being sent
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="a4ps-ui-commands",
                                        daemon=True)
        self._thread.start()

    def call(self, cmd: str, args: dict[str, Any] | None = None,
             on_done: Callback | None = None, timeout: float | None = None) -> None:
        """Queue ``cmd``; ``on_done(Reply)`` runs later on the thread that calls drain()."""
        if self._closed:
            raise RuntimeError("the command runner is closed; build a new one")
        with self._count_lock:
            self._unanswered += 1
        self._jobs.put((cmd, dict(args or {}), on_done, timeout or self._timeout))

    @property
    def pending(self) -> int:
        """Commands not answered yet (queued, or on the wire)."""
        return self._unanswered

    @property
    def idle(self) -> bool:
        """No command waiting for an answer and no answer waiting for drain()."""
        return self._unanswered == 0 and not self._done

    def drain(self, max_replies: int = 100) -> int:
        """Run up to ``max_replies`` finished callbacks here; returns how many ran."""
        n = 0
        while n < max_replies:
            try:
                cb, reply = self._done.popleft()
            except IndexError:
                break
            n += 1
            if cb is not None:
                try:
                    cb(reply)
                except Exception:  # a view bug must not stop the UI loop
                    log.exception("UI callback for %s failed", reply.cmd)
        return n

    def close(self) -> None:
        self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout=5)
        self._drop_client()

    # -- worker thread -----------------------------------------------------------
    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None and hasattr(client, "close"):
            try:
                client.close()
            except Exception:
                pass

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            cmd, args, cb, timeout = job
            try:
                if self._client is None:
                    self._client = self._factory()
                result = self._client.request(cmd, args, timeout=timeout)
                reply = Reply(cmd, True, result)
            except DaemonError as e:
                reply = Reply(cmd, False, code=e.code, message=e.message)
                if e.code == "unauthorized":
                    self._drop_client()  # the token may have changed: re-read it
            except DaemonUnavailable as e:
                reply = Reply(cmd, False, code="unavailable_daemon", message=str(e))
                self._drop_client()
            except Exception as e:  # a client bug: report it, keep serving
                log.exception("command %s failed in the client", cmd)
                reply = Reply(cmd, False, code="client_error", message=f"{type(e).__name__}: {e}")
            self._done.append((cb, reply))
            with self._count_lock:
                self._unanswered -= 1
