"""The transcript: one task's dialogue as it happens, its answer, its plots.

The controller keeps a :class:`~a4ps.ui.tasklog.TaskRecord` per task and the panel
shows one of them: a turn per step, the turn being spoken growing as tokens stream
(refreshed with the morphs, at most a few times a second), ALFRED's answer at the end
of the scroll, and below it the dissonance plot or the task's timeline. Any earlier
task can be reopened from the history spinner.
"""
from __future__ import annotations

from typing import Any

from kivy.properties import (BooleanProperty, ListProperty, ObjectProperty,
                             StringProperty)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.label import Label

from .tasklog import TaskRecord, Turn
from .values import _escape

PERSONA_COLORS = {"ALFRED": "f0d27a", "BRICK": "7ab8ff", "ROBIN": "ff9ad5"}
MAX_TURN_VIEWS = 120   # older turns of a very long task are summarised, not drawn
MAX_NEW_PER_SYNC = 8   # turn widgets made per display refresh (a burst takes a few)
MAX_BACKLOG = 16       # more new turns than this at a refresh: show the newest at once
MAX_ROUNDS_PLOTTED = 20
EMPTY = "no task yet"
HOW_TO = ("[color=9aa3ad]No task yet. Type a question in the box above and press Enter "
          "(or Ask): BRICK and ROBIN answer in turns here, then ALFRED.[/color]")


class TurnView(Label):
    """One turn: persona, round, dissonance, text."""

    persona = StringProperty("")
    streaming = BooleanProperty(False)


def turn_markup(t: Turn, *, streaming: bool = False) -> str:
    color = PERSONA_COLORS.get(t.persona, "8a929c")
    meta = []
    if t.round is not None:
        meta.append(f"round {t.round}")
    if t.dissonance is not None:
        meta.append(f"dissonance {t.dissonance:.2f}")
    if streaming:
        meta.append("speaking\u2026")
    head = f"[b][color={color}]{_escape(t.persona)}[/color][/b]"
    if meta:
        head += f"  [color=9aa3ad]{', '.join(meta)}[/color]"
    body = _escape(t.text) + (" \u2026" if streaming else "")
    if t.problem:
        body += f"\n[color=ff9a7a]problem: {_escape(t.problem)}[/color]"
    return head + "\n" + body


class TranscriptPanel(BoxLayout):
    """Shows one TaskRecord; ``append`` adds a turn, ``stream`` shows the partial one."""

    task_id = StringProperty("")
    header = StringProperty(EMPTY)
    answer = StringProperty("")
    history = ListProperty([])          # spinner values (titles)
    chart = StringProperty("dissonance")   # or "timeline"
    following = BooleanProperty(True)     # the view follows the newest turn
    controller = ObjectProperty(None, allownone=True)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._stream_view: TurnView | None = None
        self._answer_view: TurnView | None = None
        self._earlier: TurnView | None = None
        self._hidden = 0       # turns not drawn (a very long task)
        self._shown = 0        # rec.turns already turned into widgets
        self._rec: TaskRecord | None = None

    # -- showing -------------------------------------------------------------------
    def show(self, rec: TaskRecord) -> None:
        """Show ``rec`` from scratch (another task was shown)."""
        self.following = True
        self.task_id = rec.task_id
        self._rec = rec
        self.ids.turns.clear_widgets()
        self._stream_view = self._answer_view = self._earlier = None
        self._shown = self._hidden = 0
        while self.sync(rec, live=False):
            pass

    def sync(self, rec: TaskRecord, live: bool = True) -> bool:
        """Bring the view up to ``rec``: new turns, the streamed one, answer, plots.
        At most MAX_NEW_PER_SYNC new turn widgets a call; only the newest
        MAX_TURN_VIEWS turns get widgets at all; True means call again for the
        rest. ``live`` (the display refresh): when more than MAX_BACKLOG turns came
        since the last refresh, the view jumps to the newest (those before join the
        "earlier turns" line) rather than trail seconds behind them."""
        if rec.task_id != self.task_id:
            return False
        self._rec = rec
        box = self.ids.turns
        new = rec.turns[self._shown:]
        more = False
        if new:
            self._drop_stream()
            if self._answer_view is not None:
                box.remove_widget(self._answer_view)
                self._answer_view = None
            skipped = max(0, len(new) - MAX_TURN_VIEWS)   # new turns never shown
            dropped = 0                                    # shown turns taken off
            if live and len(new) > MAX_BACKLOG:
                skipped = len(new) - MAX_NEW_PER_SYNC     # a burst: show its newest
                for old in [w for w in box.children if w is not self._earlier]:
                    box.remove_widget(old)
                    dropped += 1
            new = new[skipped:]
            more = len(new) > MAX_NEW_PER_SYNC
            if more:
                new = new[:MAX_NEW_PER_SYNC]
            for t in new:
                box.add_widget(TurnView(text=turn_markup(t), persona=t.persona))
            views = [w for w in box.children if w is not self._earlier]
            for old in views[MAX_TURN_VIEWS:]:      # children are newest first
                box.remove_widget(old)
                dropped += 1
            self._hidden += skipped + dropped
            self._shown += skipped + len(new)
            if self._hidden:
                text = f"[color=9aa3ad]\u2026 {self._hidden} earlier turns (not shown)[/color]"
                if self._earlier is None:
                    self._earlier = TurnView(text=text)
                    box.add_widget(self._earlier, index=len(box.children))
                else:
                    self._earlier.text = text
        if not more:
            self.stream(rec)
        self._update(rec)
        return more

    def append(self, rec: TaskRecord, turn: Turn) -> None:
        """(``turn`` is already in ``rec.turns``.)"""
        while self.sync(rec, live=False):
            pass

    def update(self, rec: TaskRecord) -> None:
        if rec.task_id == self.task_id:
            self._update(rec)

    def stream(self, rec: TaskRecord) -> None:
        """Show the turn being spoken (or remove it when there is none)."""
        if rec.task_id != self.task_id:
            return
        part = rec.partial
        if part is None:
            self._drop_stream()
            return
        turn = Turn(part.persona, part.text, part.round, node=part.node)
        text = turn_markup(turn, streaming=True)
        if self._stream_view is None:
            self._stream_view = TurnView(text=text, persona=part.persona, streaming=True)
            self.ids.turns.add_widget(self._stream_view)
        elif self._stream_view.text != text:
            self._stream_view.text = text
        self._follow()

    @property
    def streamed_text(self) -> str:
        """The text of the turn being spoken as displayed ("" when none)."""
        rec = self._rec
        return rec.partial.text if rec is not None and rec.partial is not None \
            and self._stream_view is not None else ""

    def _drop_stream(self) -> None:
        if self._stream_view is not None:
            self.ids.turns.remove_widget(self._stream_view)
            self._stream_view = None

    def _update(self, rec: TaskRecord) -> None:
        status = rec.status
        activity = getattr(self.controller, "activity", None)
        if rec.running and activity is not None and activity.task_id == rec.task_id \
                and activity.speaker:
            status = f"{status} \u00b7 {activity.label(activity.speaker)}"
        self.header = f"#{rec.task_id[:12]} ({status}): {' '.join(rec.text.split())}"
        if rec.answer:
            self.answer = (f"[b][color={PERSONA_COLORS['ALFRED']}]ALFRED's answer[/color][/b]\n"
                           + _escape(rec.answer))
        elif rec.error:
            self.answer = f"[color=ff7a7a]failed: {_escape(rec.error)}[/color]"
        else:
            self.answer = ""
        box = self.ids.turns
        if self.answer:
            if self._answer_view is None:
                self._answer_view = TurnView(text=self.answer, persona="answer")
                box.add_widget(self._answer_view)
            elif self._answer_view.text != self.answer:
                self._answer_view.text = self.answer
        elif self._answer_view is not None:
            box.remove_widget(self._answer_view)
            self._answer_view = None
        if self._answer_view is not None and box.children and box.children[0] is not \
                self._answer_view:
            box.remove_widget(self._answer_view)
            box.add_widget(self._answer_view)
        points = rec.dissonances[-MAX_ROUNDS_PLOTTED:]
        if self.ids.plot.points != points:
            self.ids.plot.points = points
        if self.chart == "timeline":
            self.ids.timeline.show(rec.timeline)
        self._follow()

    def on_chart(self, _inst: Any, chart: str) -> None:
        holder = self.ids.chart_holder
        holder.clear_widgets()
        holder.add_widget(self.timeline if chart == "timeline" else self.plot)
        if chart == "timeline" and self._rec is not None:
            self.timeline.show(self._rec.timeline)

    def _follow(self, *_: Any) -> None:
        """Keep the newest turn in view unless the user scrolled up to read (after the
        layout settles: the heights are only right then)."""
        self._settle_scroll()

    def _settle(self, *_: Any) -> None:
        scroll, turns = self.ids.scroll, self.ids.turns
        if turns.height <= scroll.height:
            scroll.scroll_y = 1          # everything fits: from the top
        elif self.following:
            scroll.scroll_y = 0          # the newest at the bottom
        else:
            scroll.scroll_y = min(1.0, max(0.0, scroll.scroll_y))

    def _scrolled(self, scroll: Any, value: float) -> None:
        if scroll._touch:                # the user moved it: follow only at the bottom
            self.following = value <= 0.02

    def on_kv_post(self, _base: Any) -> None:
        from kivy.clock import Clock
        # only the chart on show is in the tree (a hidden one would still be drawn)
        self.plot, self.timeline = self.ids.plot.__self__, self.ids.timeline.__self__
        self.ids.chart_holder.remove_widget(self.timeline)
        self._settle_scroll = Clock.create_trigger(self._settle, -1)   # same frame
        self.ids.scroll.bind(height=self._settle_scroll, scroll_y=self._scrolled)
        self.ids.turns.bind(height=self._settle_scroll)
        self.clear()

    def clear(self) -> None:
        self.task_id = ""
        self._rec = None
        self.ids.turns.clear_widgets()
        self.ids.turns.add_widget(TurnView(text=HOW_TO))
        self._stream_view = self._answer_view = self._earlier = None
        self._hidden = self._shown = 0
        self.header = EMPTY
        self.answer = ""
        self.ids.plot.points = []
        self.ids.timeline.show([])

    def reopen(self, title: str) -> None:
        if self.controller is not None and title:
            self.controller.reopen_task(title.split(" ", 1)[0].lstrip("#"))
