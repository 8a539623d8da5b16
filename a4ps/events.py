"""In-process publish/subscribe by topic.

Subscribers run synchronously in the publisher's thread, so they must be quick: a
service with slow work puts it on its own queue. A subscriber that raises is logged
and does not affect the publisher or the other subscribers.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from .values import plain

log = logging.getLogger(__name__)

TOPICS = (
    "proto.changed", "task.queued", "task.step", "task.done", "task.failed",
    "model.loading", "model.loaded", "model.unloaded", "tool.forging", "tool.created",
    "tool.rejected", "tool.invoked", "curator.scored", "finetune.progress", "model.tuned",
    "model.swapped", "goal.generated", "dissonance.high", "system.idle",
    "codex.proposed", "codex.decided", "log", "heartbeat",
    "model.swapping", "codex.approving", "image.restored", "persona.imported",
    "persona.progress",
)
ALL = "*"


@dataclass(frozen=True)
class Event:
    topic: str
    payload: dict[str, Any]
    seq: int
    ts: float = field(default_factory=time.time)


Subscriber = Callable[[Event], None]


def json_safe(value: Any, unknown: Callable[[Any], Any] = repr) -> Any:
    """Plain JSON data for payloads and checkpoints (:func:`a4ps.values.plain` with no
    bytes); values with no plain form go through ``unknown`` (their repr by default)."""
    return plain(value, unknown=unknown, keep_bytes=False)


@runtime_checkable
class Bus(Protocol):
    """The event seam every part publishes to (:class:`EventBus` in process; the
    daemon forwards it to the PUB socket). Parts talk upward only through it."""

    def publish(self, topic: str, payload: dict[str, Any] | None = None) -> Event: ...

    def subscribe(self, topic: str, fn: Subscriber) -> Callable[[], None]: ...

    def log(self, level: str, message: str, **extra: Any) -> None: ...


class EventBus:
    """Thread-safe topic bus. ``subscribe("*", fn)`` receives every topic."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, list[Subscriber]] = {}
        self._seq = itertools.count(1)

    def subscribe(self, topic: str, fn: Subscriber) -> Callable[[], None]:
        """Register ``fn``; returns a function that unsubscribes it."""
        with self._lock:
            self._subs.setdefault(topic, []).append(fn)

        def unsubscribe() -> None:
            with self._lock:
                subs = self._subs.get(topic, [])
                if fn in subs:
                    subs.remove(fn)
        return unsubscribe

    def publish(self, topic: str, payload: dict[str, Any] | None = None) -> Event:
        with self._lock:
            event = Event(topic, dict(payload or {}), next(self._seq))
            targets = list(self._subs.get(topic, ())) + list(self._subs.get(ALL, ()))
        for fn in targets:
            try:
                fn(event)
            except Exception:  # isolate subscribers from each other and the publisher
                log.exception("event subscriber %r failed on %s", fn, topic)
        return event

    def log(self, level: str, message: str, **extra: Any) -> None:
        """Publish a ``log`` event the UI shows, and log it locally too."""
        logging.getLogger("a4ps").log(getattr(logging, level.upper(), logging.INFO), message)
        self.publish("log", {"level": level.lower(), "message": message, **extra})


class EventRecorder:
    """Collects events (tests, CLI). Wait for a topic with :meth:`wait_for`."""

    def __init__(self, bus: EventBus, topic: str = ALL) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self.close = bus.subscribe(topic, self._on)

    def _on(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def topics(self) -> list[str]:
        with self._cond:
            return [e.topic for e in self.events]

    def of(self, topic: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.topic == topic]

    def wait_for(self, topic: str, timeout: float = 10.0,
                 where: Callable[[Event], bool] | None = None) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.topic == topic and (where is None or where(e)):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {topic} event within {timeout}s; saw {self.topics()[-10:]}")
                self._cond.wait(left)
