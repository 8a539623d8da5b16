"""A persona turn as it streams: ``task.token`` events, cancellation, and the
repetition stop.

:class:`TokenStream` is one per task: it coalesces the model's deltas into at most one
``task.token`` event per ``interval_s`` (about 50 ms) so a fast model does not flood
the bus, numbering events with a per-task ``seq``; the UI and ``a4ps ask`` concatenate
``text`` in ``seq`` order.

:class:`TurnGuard` is one per turn and is what the graph passes to the model as
``on_token`` and ``cancel``: ``is_set()`` is true when the task's own cancel token is
set *or* the reply has started repeating itself (:func:`answers.repetition_cut`), so
the backend stops within about a token either way, and the graph keeps the text
before the repeat.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from a4ps.cognition.answers import repetition_cut

Publish = Callable[[str, dict[str, Any]], Any]


class TokenStream:
    """``task.token`` publisher for one task (thread-safe; ``seq`` increases by one)."""

    def __init__(self, publish: Publish, task_id: str, *, interval_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.publish = publish
        self.task_id = task_id
        self.interval_s = interval_s
        self.clock = clock
        self.seq = 0
        self._lock = threading.Lock()
        self._buf: list[str] = []
        self._where: tuple[str, str | None, Any] | None = None
        self._last = float("-inf")

    def delta(self, node: str, persona: str | None, rnd: Any, text: str) -> None:
        """Add a delta; publish the buffer if ``interval_s`` has passed since the last event."""
        if not text:
            return
        with self._lock:
            where = (node, persona, rnd)
            if self._where is not None and where != self._where:
                self._flush_locked()       # a new speaker: never merge two turns' text
            self._where = where
            self._buf.append(text)
            if self.clock() - self._last >= self.interval_s:
                self._flush_locked()

    def flush(self) -> None:
        """Publish whatever is buffered (end of a turn)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._buf or self._where is None:
            return
        node, persona, rnd = self._where
        text = "".join(self._buf)
        self._buf.clear()
        self._last = self.clock()
        self.seq += 1
        self.publish("task.token", {"task_id": self.task_id, "node": node, "persona": persona,
                                    "round": rnd, "text": text, "seq": self.seq})


class TurnGuard:
    """``on_token`` + ``cancel`` for one persona turn (see module doc)."""

    def __init__(self, stream: TokenStream | None, node: str, persona: str | None, rnd: Any,
                 cancel: Any = None) -> None:
        self.stream = stream
        self.where = (node, persona, rnd)
        self.cancel = cancel
        self.text = ""
        self.pieces = 0
        self.cut: int | None = None
        self._sent = 0

    # the model's on_token
    def __call__(self, delta: str) -> None:
        if self.cut is not None:
            return
        self.text += delta
        self.pieces += 1
        cut = repetition_cut(self.text)
        if cut is not None:
            self.cut = cut
        upto = len(self.text) if self.cut is None else self.cut
        if self.stream is not None and upto > self._sent:
            self.stream.delta(*self.where, self.text[self._sent:upto])
            self._sent = upto

    # the model's cancel token
    def is_set(self) -> bool:
        return self.repeated or self.task_cancelled

    @property
    def repeated(self) -> bool:
        return self.cut is not None

    @property
    def task_cancelled(self) -> bool:
        return self.cancel is not None and bool(self.cancel.is_set())

    def kept(self) -> str:
        """The reply without its repeat."""
        return (self.text if self.cut is None else self.text[:self.cut]).strip(" \t\n,;:")

    def done(self) -> None:
        if self.stream is not None:
            self.stream.flush()
