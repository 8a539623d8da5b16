"""Stopping a running task: cancellation on request, and goals that yield to the user.

Why its own part: the queue (:mod:`a4ps.tasks`) only records states, and the graph
only *honours* a cancel token (``graph.run(..., cancel=token)`` checks it at every
node boundary and passes it into every model call). Something has to *set* the token
while the worker is busy inside a run:

* ``task.cancel`` on the running task (from this process, or the queue's
  ``cancel_requested`` flag written by another one);
* a user task arriving while a self-generated task (a motivator goal, a reflection)
  runs: the self-generated task is **preempted**. It is re-queued (its checkpoint
  keeps the finished nodes, so it resumes later) or dropped, per
  ``motivator.preempted_goals``.

:class:`TaskSupervisor` runs one task at a time with a fresh :class:`TaskStop` and
watches for both, through the EventBus (``task.queued``, immediate) and by polling the
queue (another process's writes). :func:`finish_stopped` records the outcome and
publishes ``task.cancelled`` (and ``task.preempted``).
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .events import Event, EventBus
    from .tasks import Task, TaskQueue

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
PREEMPTED = "preempted"


class TaskStop:
    """A cancel token (``is_set()``, like ``threading.Event``) that also says why.

    The first ``set`` wins: a task cancelled by the user and then "preempted" stays
    cancelled.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.kind: str | None = None          # CANCELLED | PREEMPTED
        self.reason: str | None = None
        self.by: str | None = None            # the task that preempted this one
        self.requeue = False

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def set(self, kind: str = CANCELLED, reason: str | None = None, *, by: str | None = None,
            requeue: bool = False) -> bool:
        """Stop the task; False if it was already stopped (the first reason stays)."""
        with self._lock:
            if self._event.is_set():
                return False
            self.kind, self.reason, self.by, self.requeue = kind, reason or kind, by, requeue
            self._event.set()
            return True


def finish_stopped(tasks: TaskQueue, bus: EventBus, task: Task, stop: TaskStop | None,
                   node: str | None = None) -> dict[str, Any]:
    """Record a run that ended because its token was set; returns the event payload."""
    kind = stop.kind if stop is not None and stop.kind else CANCELLED
    reason = stop.reason if stop is not None and stop.reason else "cancelled"
    requeued = bool(stop is not None and stop.requeue and kind == PREEMPTED
                    and tasks.requeue(task.id, reason=reason, by=stop.by))
    if not requeued:
        tasks.cancel(task.id, force=True, reason=reason)
    payload = {"task_id": task.id, "origin": task.origin, "reason": reason,
               "requeued": requeued, "node": node}
    if kind == PREEMPTED and stop is not None:
        bus.publish("task.preempted", {"task_id": task.id, "by": stop.by, "origin": task.origin,
                                       "requeued": requeued, "node": node})
    bus.publish("task.cancelled", payload)
    return payload


class TaskSupervisor:
    """Runs claimed tasks one at a time with a stop token, and sets it when it must.

    ``preempt``: what happens to a self-generated task a user task preempts,
    ``"requeue"`` (default) or ``"drop"`` (cancelled). ``poll_s``: how often the queue
    is read for cancel flags and user tasks other processes wrote.
    """

    def __init__(self, tasks: TaskQueue, bus: EventBus, *, preempt: str = "requeue",
                 poll_s: float = 0.25) -> None:
        if preempt not in ("requeue", "drop"):
            raise ValueError(f"preempt must be 'requeue' or 'drop', not {preempt!r}")
        self.tasks = tasks
        self.bus = bus
        self.preempt = preempt
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._stop: TaskStop | None = None

    @property
    def current(self) -> Task | None:
        return self._task

    def run(self, task: Task, fn: Callable[[Task, TaskStop], Any]) -> Any:
        """``fn(task, stop)`` with a watcher setting ``stop`` on cancel or preemption."""
        stop = TaskStop()
        with self._lock:
            self._task, self._stop = task, stop
        done = threading.Event()
        unsub = self.bus.subscribe("task.queued", self._on_queued)
        watcher = threading.Thread(target=self._watch, args=(task, stop, done),
                                   name="a4ps-task-watch", daemon=True)
        watcher.start()
        try:
            if task.self_generated and self.tasks.pending_count(origin="user"):
                self._preempt(task, stop, by=self._waiting_user_task())   # already waiting
            return fn(task, stop)
        finally:
            done.set()
            unsub()
            watcher.join(2.0)
            with self._lock:
                self._task, self._stop = None, None

    def cancel(self, task_id: str, reason: str = "cancelled by request") -> bool:
        """Stop the running task if it is ``task_id``; True when it was."""
        with self._lock:
            task, stop = self._task, self._stop
        if task is None or stop is None or task.id != str(task_id):
            return False
        return stop.set(CANCELLED, reason)

    def _waiting_user_task(self) -> str | None:
        """The id of the queued user task that runs next (claim's order: priority,
        then the oldest), so a preemption found by reading the queue names its cause
        as the bus event does; None if it was claimed meanwhile."""
        waiting = [t for t in self.tasks.list("queued", limit=200) if t.origin == "user"]
        return min(waiting, key=lambda t: (t.priority, t.created)).id if waiting else None

    def _preempt(self, task: Task, stop: TaskStop, by: str | None) -> None:
        requeue = self.preempt == "requeue"
        who = f"user task {by}" if by else "a user task"
        if stop.set(PREEMPTED, f"preempted by {who}", by=by, requeue=requeue):
            log.info("task %s (%s) preempted by %s; %s", task.id, task.origin, who,
                     "re-queued" if requeue else "dropped")

    def _on_queued(self, event: Event) -> None:
        p = event.payload
        with self._lock:
            task, stop = self._task, self._stop
        if task is None or stop is None or not task.self_generated:
            return
        if p.get("origin") == "user":
            self._preempt(task, stop, by=p.get("task_id"))

    def _watch(self, task: Task, stop: TaskStop, done: threading.Event) -> None:
        while not done.wait(self.poll_s):
            if stop.is_set():
                return
            try:
                if self.tasks.cancel_requested(task.id):
                    stop.set(CANCELLED, "cancelled by request")
                    return
                if task.self_generated and self.tasks.pending_count(origin="user"):
                    self._preempt(task, stop, by=self._waiting_user_task())
                    return
            except Exception:       # the queue closing under us: the run ends anyway
                log.debug("task watcher: queue read failed", exc_info=True)
                return
