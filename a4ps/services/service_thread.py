"""ServiceThread: the worker thread the motivator and the philosopher each run on.

Their EventBus subscribers only enqueue; model calls and writes happen here, so a
slow LLM never blocks whoever published the event.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Literal

log = logging.getLogger(__name__)


class ServiceThread:
    """One daemon thread running queued jobs in order, and a periodic ``tick``.

    Subscribers call :meth:`submit` (cheap, never blocks the publisher); a job that
    raises is logged and the thread keeps going. :meth:`flush` waits until every job
    submitted so far has run (tests, shutdown).
    """

    def __init__(self, name: str, tick: Callable[[], object] | None = None,
                 tick_s: float = 1.0) -> None:
        self.name = name
        self._tick = tick
        self._tick_s = tick_s
        self._q: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._cond = threading.Condition()
        self._outstanding = 0
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._q.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s did not stop within %.0fs (a model call may be running)",
                        self.name, timeout)
        self._thread = None

    def submit(self, job: Callable[[], object]) -> None:
        """Run ``job`` on the service thread (its return value is dropped)."""
        with self._cond:
            self._outstanding += 1
        self._q.put(job)

    def pending(self) -> int:
        with self._cond:
            return self._outstanding

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the jobs submitted so far ran; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._outstanding:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _loop(self) -> None:
        last_tick = time.monotonic()
        while True:
            job: Callable[[], object] | Literal[False] | None
            try:
                job = self._q.get(timeout=self._tick_s)
            except queue.Empty:
                job = False
            if job is None:
                return
            if job is not False:
                try:
                    self._run(job)
                finally:
                    with self._cond:
                        self._outstanding -= 1
                        self._cond.notify_all()
            # tick on schedule even while a steady stream of jobs keeps the queue busy
            if self._tick is not None and time.monotonic() - last_tick >= self._tick_s:
                last_tick = time.monotonic()
                self._run(self._tick)

    def _run(self, job: Callable[[], object]) -> None:
        try:
            job()
        except Exception:  # a bad reply or a broken part must not stop the service
            log.exception("%s: job failed", self.name)
