"""One task as the UI knows it: its turns, the turn being streamed, and its timeline.

Built from ``task.queued`` / ``task.step`` / ``task.token`` / ``task.done`` events, from
``task.get`` (a finished task) or from ``task.steps`` (a task that was already running
when this UI connected). Streamed text is concatenated in the tokens' ``seq`` order;
when the node's ``task.step`` arrives its text is the turn's final text. Every event
applied is remembered by its PUB ``seq``, so a ``task.steps`` reply and the live events
that raced it are merged without doubling anything. No Kivy here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4.0    # estimate when the daemon does not say how many tokens


@dataclass
class Turn:
    persona: str          # ALFRED/BRICK/ROBIN, or the graph node for system steps
    text: str
    round: int | None = None
    dissonance: float | None = None
    node: str = ""
    system: bool = False  # a step no persona spoke (recall, measure, remember)
    problem: str = ""


@dataclass
class Partial:
    """The turn being spoken: text so far, streamed by ``task.token``."""

    persona: str
    node: str
    round: int | None
    text: str = ""
    token_seq: int = -1
    tokens: int = 0
    counted: bool = False   # True when the daemon sent token counts
    first_ts: float | None = None
    last_ts: float | None = None


@dataclass
class NodeTime:
    """One node of the timeline: how long it ran and how fast it spoke."""

    node: str
    persona: str
    round: int | None
    start: float | None
    end: float
    tokens: float = 0.0
    estimated: bool = True
    stream_s: float = 0.0

    @property
    def seconds(self) -> float | None:
        return None if self.start is None else max(0.0, self.end - self.start)

    @property
    def tokens_per_s(self) -> float | None:
        span = self.stream_s or (self.seconds or 0.0)
        return self.tokens / span if self.tokens and span > 0 else None


@dataclass
class TaskRecord:
    task_id: str
    text: str = ""
    status: str = "queued"
    turns: list[Turn] = field(default_factory=list)
    answer: str = ""
    error: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    partial: Partial | None = None
    timeline: list[NodeTime] = field(default_factory=list)
    applied_seq: int = 0        # highest PUB seq applied to this record
    rebuilding: bool = False    # a task.steps reply is awaited; events wait in `held`
    held: list[tuple[str, dict[str, Any], int, float]] = field(default_factory=list)
    _boundary: float | None = None   # when the node running now started

    @property
    def dissonances(self) -> list[float]:
        """One value per round (the last reported in that round)."""
        by_round: dict[int, float] = {}
        for t in self.turns:
            if t.dissonance is not None and t.round is not None:
                by_round[t.round] = t.dissonance
        return [by_round[r] for r in sorted(by_round)]

    @property
    def running(self) -> bool:
        return self.status in ("queued", "running")

    def title(self) -> str:
        text = self.text.replace("\n", " ")
        return f"#{self.task_id} {text[:40]}{'…' if len(text) > 40 else ''} ({self.status})"

    # -- events ------------------------------------------------------------------------
    def seen(self, seq: int) -> bool:
        """True when the event numbered ``seq`` is already in this record."""
        return bool(seq) and seq <= self.applied_seq

    def _mark(self, seq: int) -> None:
        if seq:
            self.applied_seq = max(self.applied_seq, seq)

    def apply_step(self, p: dict[str, Any], ts: float | None = None, seq: int = 0) -> Turn | None:
        """A ``task.step``: the node ended. Returns the turn to show (None: nothing new)."""
        if self.seen(seq):
            return None
        self._mark(seq)
        ts = float(ts if ts is not None else time.time())
        if self.status == "queued":
            self.status = "running"
        if self._boundary is None:
            self._boundary = self.started
        turn = turn_from_step(p)
        part = self.partial if self.partial is not None and \
            self.partial.node == turn.node else None        # streamed this node
        self.timeline.append(NodeTime(
            node=turn.node or turn.persona, persona="" if turn.system else turn.persona,
            round=turn.round, start=self._boundary, end=ts,
            tokens=(part.tokens if part.counted else len(part.text) / CHARS_PER_TOKEN)
            if part is not None else 0.0,
            estimated=not (part is not None and part.counted),
            stream_s=(part.last_ts - part.first_ts) if part is not None and part.first_ts
            and part.last_ts and part.last_ts > part.first_ts else 0.0))
        self._boundary = ts
        if part is not None:
            self.partial = None
        if turn.text or turn.dissonance is not None or turn.problem:
            self.turns.append(turn)
            return turn
        return None

    def apply_token(self, p: dict[str, Any], ts: float | None = None, seq: int = 0) -> bool:
        """A ``task.token`` delta; True when the streamed text changed."""
        if self.seen(seq):
            return False
        self._mark(seq)
        ts = float(ts if ts is not None else time.time())
        if self.status == "queued":
            self.status = "running"
        node, persona = str(p.get("node") or ""), str(p.get("persona") or "")
        r = p.get("round")
        rnd = r if isinstance(r, int) and not isinstance(r, bool) else None
        part = self.partial
        if part is None or (part.node, part.persona, part.round) != (node, persona, rnd):
            part = self.partial = Partial(persona or node, node, rnd, first_ts=ts)
            if self._boundary is None:
                self._boundary = ts
        tseq = p.get("seq")
        if isinstance(tseq, int):
            if tseq <= part.token_seq:
                return False
            part.token_seq = tseq
        text = str(p.get("text") or "")
        if isinstance(p.get("tokens"), int):
            part.tokens += p["tokens"]
            part.counted = True
        part.text += text
        part.last_ts = ts
        return bool(text)

    def mark_start(self, ts: float) -> None:
        """The earliest the first node can have started (the task was queued then)."""
        if self._boundary is None and not self.timeline:
            self._boundary = float(ts)

    def end(self, status: str, p: dict[str, Any], seq: int = 0) -> None:
        self._mark(seq)
        self.status = status
        self.partial = None
        if status == "done":
            answer = p.get("answer") or p.get("result")
            if isinstance(answer, dict):
                answer = answer.get("answer") or answer.get("text")
            self.answer = str(answer or self.answer)
        else:
            self.error = str(p.get("error") or p.get("reason") or p.get("message") or status)

    def rebuild(self, reply: dict[str, Any]) -> None:
        """Replace what this record knows with a ``task.steps`` reply."""
        self.turns, self.timeline, self.partial = [], [], None
        self.applied_seq = 0
        self._boundary = self.started
        for s in reply.get("steps") or []:
            if isinstance(s, dict):
                self.apply_step(s, s.get("ts"), 0)
        part = reply.get("partial")
        if isinstance(part, dict):
            self.apply_token({**part, "seq": None}, part.get("ts"), 0)
            if isinstance(part.get("tokens"), int) and part["tokens"] and self.partial:
                self.partial.tokens, self.partial.counted = part["tokens"], True
            if self.partial is not None and isinstance(part.get("token_seq"), int):
                self.partial.token_seq = part["token_seq"]
        seq = reply.get("seq")
        self.applied_seq = seq if isinstance(seq, int) else 0
        if reply.get("status") == "running":
            self.status = "running"   # an end comes with its event (or task.get): answer


def turn_from_step(payload: dict[str, Any]) -> Turn:
    """A Turn from a ``task.step`` payload (or a stored turn of a finished task)."""
    d = payload.get("dissonance")
    r = payload.get("round")
    persona = payload.get("persona")
    return Turn(persona=str(persona or payload.get("node") or "step"),
                text=str(payload.get("text") or ""),
                round=int(r) if isinstance(r, (int, float)) and not isinstance(r, bool)
                else None,
                dissonance=float(d) if isinstance(d, (int, float))
                and not isinstance(d, bool) else None,
                node=str(payload.get("node") or ""), system=not persona,
                problem=str(payload.get("problem") or ""))


def record_from_task(data: dict[str, Any]) -> TaskRecord:
    """A TaskRecord from ``task.get``/``task.list`` data (tolerant of missing keys)."""
    tid = str(data.get("id", data.get("task_id", "")))
    rec = TaskRecord(task_id=tid, text=str(data.get("text") or ""),
                     status=str(data.get("status") or "queued"))
    result = data.get("result")
    answer = data.get("answer")
    if isinstance(result, dict):
        answer = answer or result.get("answer")
        steps = result.get("steps") or result.get("turns") or []
    else:
        answer = answer or (result if isinstance(result, str) else None)
        steps = []
    steps = data.get("steps") or data.get("turns") or steps or []
    rounds = result.get("rounds") if isinstance(result, dict) else None
    measured = {r.get("round"): r.get("dissonance") for r in rounds or []
                if isinstance(r, dict)}
    for i, s in enumerate(x for x in steps if isinstance(x, dict)):
        turn = turn_from_step(s)
        rec.turns.append(turn)
        nxt = steps[i + 1] if i + 1 < len(steps) and isinstance(steps[i + 1], dict) else {}
        if turn.round in measured and nxt.get("round") != turn.round:
            d = measured.pop(turn.round)
            if isinstance(d, (int, float)):
                rec.turns.append(Turn("measure", f"dissonance {d:.3f}", turn.round, float(d),
                                      "measure", True))
    for key in ("created", "started"):
        if isinstance(data.get(key), (int, float)):
            setattr(rec, key, float(data[key]))
    rec.answer = str(answer or "")
    rec.error = str(data.get("error") or "")
    return rec
