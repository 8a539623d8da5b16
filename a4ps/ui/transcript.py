"""The task box and the transcript: the dialogue of a task as it happens.

The controller keeps one :class:`TaskRecord` per task it has seen (from ``task.queued``,
``task.step``, ``task.done``/``task.failed`` or ``task.get``); the panel shows one of
them at a time, appending a turn widget per step, with a small plot of dissonance over
rounds. Any earlier task can be reopened from the history spinner.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kivy.graphics import Color, Line
from kivy.properties import (ListProperty, NumericProperty, ObjectProperty, StringProperty)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.label import Label
from kivy.uix.widget import Widget

from .values import _escape

PERSONA_COLORS = {"ALFRED": "f0d27a", "BRICK": "7ab8ff", "ROBIN": "ff9ad5"}


@dataclass
class Turn:
    persona: str          # ALFRED/BRICK/ROBIN, or the graph node for system steps
    text: str
    round: int | None = None
    dissonance: float | None = None
    node: str = ""
    system: bool = False  # a step no persona spoke (recall, measure, remember)


@dataclass
class TaskRecord:
    task_id: str
    text: str = ""
    status: str = "queued"
    turns: list[Turn] = field(default_factory=list)
    answer: str = ""
    error: str = ""
    created: float = field(default_factory=time.time)

    @property
    def dissonances(self) -> list[float]:
        """One value per round (the last reported in that round)."""
        by_round: dict[int, float] = {}
        for t in self.turns:
            if t.dissonance is not None and t.round is not None:
                by_round[t.round] = t.dissonance
        return [by_round[r] for r in sorted(by_round)]

    def title(self) -> str:
        text = self.text.replace("\n", " ")
        return f"#{self.task_id} {text[:40]}{'…' if len(text) > 40 else ''} ({self.status})"


def turn_from_step(payload: dict[str, Any]) -> Turn:
    """A Turn from a ``task.step`` payload (or a stored turn of a finished task)."""
    d = payload.get("dissonance")
    r = payload.get("round")
    persona = payload.get("persona")
    return Turn(persona=str(persona or payload.get("node") or "step"),
                text=str(payload.get("text") or ""),
                round=int(r) if isinstance(r, (int, float)) and not isinstance(r, bool)
                else None,
                dissonance=float(d) if isinstance(d, (int, float)) else None,
                node=str(payload.get("node") or ""), system=not persona)


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
    if isinstance(data.get("created"), (int, float)):
        rec.created = float(data["created"])
    rec.answer = str(answer or "")
    rec.error = str(data.get("error") or "")
    return rec


class TurnView(Label):
    """One turn: persona, round, dissonance, text."""

    persona = StringProperty("")


class DissonancePlot(Widget):
    """A polyline of dissonance over rounds, 0 at the bottom, 1 at the top."""

    points = ListProperty([])
    threshold = NumericProperty(0.35)

    def on_points(self, *_):
        self.redraw()

    def on_size(self, *_):
        self.redraw()

    def on_pos(self, *_):
        self.redraw()

    def redraw(self) -> None:
        self.canvas.after.clear()
        if not self.points:
            return
        n = len(self.points)
        step = self.width / max(n - 1, 1)
        coords = []
        for i, v in enumerate(self.points):
            coords += [self.x + i * step, self.y + max(0.0, min(1.0, v)) * self.height]
        with self.canvas.after:
            Color(0.9, 0.5, 0.3, 0.5)
            y = self.y + self.threshold * self.height
            Line(points=[self.x, y, self.right, y], width=1, dash_length=4, dash_offset=4)
            Color(1, 0.8, 0.3, 1)
            if n == 1:
                Line(circle=(coords[0], coords[1], 3), width=1.5)
            else:
                Line(points=coords, width=1.5)


class TranscriptPanel(BoxLayout):
    """Shows one TaskRecord; ``append`` adds a turn as it streams in."""

    task_id = StringProperty("")
    header = StringProperty("no task yet: type one below")
    answer = StringProperty("")
    history = ListProperty([])          # spinner values (titles)
    plot = ObjectProperty(None)
    controller = ObjectProperty(None, allownone=True)

    def show(self, rec: TaskRecord) -> None:
        self.task_id = rec.task_id
        self.ids.turns.clear_widgets()
        for t in rec.turns:
            self._add_turn(t)
        self._update(rec)

    def append(self, rec: TaskRecord, turn: Turn) -> None:
        if rec.task_id != self.task_id:
            return
        self._add_turn(turn)
        self._update(rec)

    def update(self, rec: TaskRecord) -> None:
        if rec.task_id == self.task_id:
            self._update(rec)

    def _update(self, rec: TaskRecord) -> None:
        self.header = f"task #{rec.task_id[:8]} ({rec.status}): {rec.text}"
        if rec.answer:
            self.answer = f"[b][color={PERSONA_COLORS['ALFRED']}]ALFRED's answer[/color][/b]\n" \
                          + _escape(rec.answer)
        elif rec.error:
            self.answer = f"[color=ff7a7a]failed: {_escape(rec.error)}[/color]"
        else:
            self.answer = ""
        self.ids.plot.points = rec.dissonances

    def _add_turn(self, t: Turn) -> None:
        color = PERSONA_COLORS.get(t.persona, "888888")
        meta = []
        if t.round is not None:
            meta.append(f"round {t.round}")
        if t.dissonance is not None:
            meta.append(f"dissonance {t.dissonance:.2f}")
        head = f"[b][color={color}]{_escape(t.persona)}[/color][/b]"
        if meta:
            head += f"  [size=11sp][color=999999]{', '.join(meta)}[/color][/size]"
        self.ids.turns.add_widget(TurnView(text=head + "\n" + _escape(t.text),
                                           persona=t.persona))
        self.ids.scroll.scroll_y = 0

    def reopen(self, title: str) -> None:
        if self.controller is not None and title:
            self.controller.reopen_task(title.split(" ", 1)[0].lstrip("#"))
