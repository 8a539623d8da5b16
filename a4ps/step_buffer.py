"""What each recent task has said so far, kept in the daemon for ``task.steps``.

A UI that connects while a task runs (or restarts mid-task) missed the ``task.step``
and ``task.token`` events published before it subscribed; the queue only stores a
task's result once it ends. The daemon feeds this buffer from the events it publishes
(the same payloads, with the PUB sequence number and time each went out under), so
``task.steps`` answers with the steps so far and the text streamed into the turn that
is still being spoken.

The client dedupes by ``seq``: it applies the reply, then only the live events of
that task numbered above the reply's ``seq`` (the newest step or token the reply
holds; a task's end is in ``status``, and its answer comes with ``task.get``). Bounded: the newest ``max_tasks`` tasks,
``max_steps`` steps each, ``max_partial_chars`` of streamed text. Thread-safe; no
Kivy, no sockets.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

TASK_TOPICS = ("task.queued", "task.step", "task.token", "task.done", "task.failed",
               "task.cancelled")
ENDED = {"task.done": "done", "task.failed": "failed", "task.cancelled": "cancelled"}


class _TaskLog:
    __slots__ = ("steps", "partial", "seq", "status")

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.partial: dict[str, Any] | None = None
        self.seq = 0
        self.status = "queued"


class StepBuffer:
    """Per-task steps and the partial (streaming) turn, newest tasks kept."""

    def __init__(self, *, max_tasks: int = 32, max_steps: int = 400,
                 max_partial_chars: int = 20_000) -> None:
        self.max_tasks = max_tasks
        self.max_steps = max_steps
        self.max_partial_chars = max_partial_chars
        self._tasks: OrderedDict[str, _TaskLog] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, topic: str, payload: dict[str, Any], seq: int, ts: float) -> None:
        """Take one published event (any topic; non-task topics are ignored)."""
        if topic not in TASK_TOPICS or not isinstance(payload, dict):
            return
        tid = payload.get("task_id", payload.get("id"))
        if tid is None or tid == "":
            return
        tid = str(tid)
        with self._lock:
            log = self._tasks.get(tid)
            if log is None:
                log = self._tasks[tid] = _TaskLog()
                while len(self._tasks) > self.max_tasks:
                    self._tasks.popitem(last=False)
            else:
                self._tasks.move_to_end(tid)
            if topic in ("task.step", "task.token"):
                log.seq = max(log.seq, seq)    # the newest event the steps/partial hold
            if topic == "task.step":
                log.status = "running"
                if len(log.steps) < self.max_steps:
                    log.steps.append({**payload, "seq": seq, "ts": ts})
                if log.partial is not None and payload.get("node") == log.partial.get("node"):
                    log.partial = None    # the step carries the turn's final text
            elif topic == "task.token":
                log.status = "running"
                self._token(log, payload, seq)
            elif topic in ENDED:
                log.status = ENDED[topic]
                log.partial = None

    def _token(self, log: _TaskLog, p: dict[str, Any], seq: int) -> None:
        key = (p.get("node"), p.get("persona"), p.get("round"))
        part = log.partial
        if part is None or (part["node"], part["persona"], part["round"]) != key:
            part = log.partial = {"node": key[0], "persona": key[1], "round": key[2],
                                  "text": "", "token_seq": -1, "seq": seq, "tokens": 0}
        token_seq = p.get("seq")
        if isinstance(token_seq, int) and token_seq <= part["token_seq"]:
            return    # a repeat
        if isinstance(token_seq, int):
            part["token_seq"] = token_seq
        text = str(p.get("text") or "")
        if len(part["text"]) + len(text) <= self.max_partial_chars:
            part["text"] += text
        if isinstance(p.get("tokens"), int):
            part["tokens"] += p["tokens"]
        part["seq"] = seq

    def get(self, task_id: str) -> dict[str, Any] | None:
        """``{steps, partial, seq, status}`` for a task seen here, else None."""
        with self._lock:
            log = self._tasks.get(str(task_id))
            if log is None:
                return None
            return {"steps": [dict(s) for s in log.steps],
                    "partial": dict(log.partial) if log.partial else None,
                    "seq": log.seq, "status": log.status}
