"""The log panel: the daemon's and the UI's messages, by level, scrollable.

Lines come from ``log`` events and from the UI itself (refused edits, failed
commands). A RecycleView makes widgets only for the visible lines; the filter shows
everything, warnings and errors, or errors only. New lines keep the view at the
bottom unless the user scrolled up to read. A line that does not fit ends in an
ellipsis; hovering it shows all of it.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

from kivy.properties import NumericProperty, ObjectProperty, StringProperty
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.label import Label

from .panels import FitLabel

LEVELS = {"debug": 0, "info": 1, "warning": 2, "warn": 2, "error": 3, "critical": 3}
LEVEL_COLORS = {"debug": "8a929c", "info": "9fd0ff", "warning": "ffcf6b", "error": "ff7a7a"}
FILTERS = {"all": 0, "warnings": 2, "errors": 3}
RENDERED_KEEP = 128      # row pictures rendered ahead, kept (a few screens' worth)


def level_of(name: str) -> str:
    name = (name or "info").lower()
    if LEVELS.get(name, 1) >= 3:
        return "error"
    return {"warn": "warning"}.get(name, name if name in LEVEL_COLORS else "info")


class LogLine(FitLabel):
    """One row of the log; its picture may have been rendered ahead of the refresh
    that shows it (:meth:`LogPanel.render_ahead`): then it is not rendered again."""

    rendered = ObjectProperty(None, allownone=True)   # the panel's pictures, by row

    def texture_update(self, *largs: Any) -> None:
        ahead = None if self.rendered is None else \
            self.rendered.get((self.text, int(self.width), int(self.height)))
        if ahead is None:
            super().texture_update(*largs)
            return
        self.texture, self.is_shortened = ahead
        self.texture_size = list(self.texture.size)


class LogPanel(BoxLayout):
    """The newest ``max_lines`` lines (dicts ``{level, source, message}``); ``add``
    appends, ``show`` picks a filter."""

    show = StringProperty("all")
    counts = StringProperty("")
    errors = NumericProperty(0)
    max_lines = NumericProperty(1000)

    def __init__(self, **kw: Any) -> None:
        self._lines: deque[dict] = deque()
        self._warnings = 0
        # (row text, width, height) -> (texture, shortened): rows rendered ahead
        self._rendered: OrderedDict[tuple[str, int, int], tuple[Any, bool]] = OrderedDict()
        self._template: LogLine | None = None
        super().__init__(**kw)

    @property
    def lines(self) -> list[dict]:
        return list(self._lines)

    @property
    def data(self) -> list[dict]:
        return self.ids.rv.data

    def add(self, lines: list[dict]) -> None:
        """Append lines: only they are formatted; the oldest fall out."""
        if not lines:
            return
        floor = FILTERS.get(self.show, 0)
        rows = [r for r in (self._row(line, floor) for line in lines) if r is not None]
        dropped = 0
        for line in lines:
            self._lines.append(line)
            if len(self._lines) > self.max_lines:
                old = self._lines.popleft()
                self._count(old, -1)
                dropped += self._rank(old) >= floor
            self._count(line, +1)
        rv = self.ids.rv
        following = rv.scroll_y <= 0.02 or not rv.children or \
            rv.height >= rv.children[0].height
        # changed in place (a removal and an append), not replaced: the RecycleView
        # then sizes only the new rows instead of all of them again
        if dropped:
            del rv.data[:dropped]
        if rows:
            rv.data.extend(rows)
        self._counts()
        if following:
            self._settle()

    def render_ahead(self, lines: list[dict], budget_s: float | None = None) -> int:
        """Render the pictures of lines not yet added (the newest, as many as the view
        shows), so the refresh that adds them does not: Kivy would render each row
        that scrolls into view in that frame. Returns the rows rendered."""
        rv = self.ids.rv
        views = rv.children[0].children if rv.children else []
        if not views or not lines:
            return 0
        w, h = int(views[0].width), int(views[0].height)
        if w <= 0 or h <= 0:
            return 0
        floor = FILTERS.get(self.show, 0)
        t0 = time.perf_counter()
        made = 0
        for line in reversed(lines[-(int(rv.height // h) + 1):]):    # newest first
            row = self._row(line, floor)
            if row is None or (row["text"], w, h) in self._rendered:
                continue
            tpl = self._template = self._template or LogLine()
            tpl.size = (w, h)
            tpl.text = row["text"]
            tpl._label.texture = None          # a new texture, not the last one's
            Label.texture_update(tpl)
            tpl._trigger_texture.cancel()      # rendered now, not again before drawing
            if tpl.texture is not None:
                self._rendered[(row["text"], w, h)] = (tpl.texture, tpl.is_shortened)
            while len(self._rendered) > RENDERED_KEEP:
                self._rendered.popitem(last=False)
            made += 1
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
        return made

    def on_show(self, *_: Any) -> None:
        floor = FILTERS.get(self.show, 0)
        self.ids.rv.data = [r for r in (self._row(line, floor) for line in self._lines)
                            if r is not None]
        self._settle()

    @staticmethod
    def _rank(line: dict) -> int:
        return LEVELS.get(level_of(line.get("level", "info")), 1)

    def _count(self, line: dict, sign: int) -> None:
        rank = self._rank(line)
        if rank >= 3:
            self.errors += sign
        elif rank == 2:
            self._warnings += sign

    def _counts(self) -> None:
        self.counts = (f"{len(self._lines)} \u00b7 {self._warnings} warn \u00b7 "
                       f"{self.errors} err")

    def _row(self, line: dict, floor: int) -> dict | None:
        level = level_of(line.get("level", "info"))
        if LEVELS.get(level, 1) < floor:
            return None
        color = LEVEL_COLORS.get(level, "cccccc")
        return {"text": f"[color={color}]{level.upper()[:5]:5}[/color] "
                        f"[color=8a929c]{_esc(line.get('source', ''))}[/color] "
                        f"{_esc(line.get('message', ''))}",
                "tooltip": f"{level.upper()} {line.get('source', '')}: "
                           f"{line.get('message', '')}",
                "rendered": self._rendered}

    def _settle(self, *_: Any) -> None:
        """Few lines start at the top; many keep the newest in view at the bottom."""
        from kivy.clock import Clock
        rv = self.ids.rv

        def settle(_dt: float) -> None:
            content = rv.children[0].height if rv.children else 0
            rv.scroll_y = 1 if content <= rv.height else 0
        Clock.schedule_once(settle, -1)     # after the layout, before this frame's drawing


def _esc(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("[", "&bl;").replace("]", "&br;") \
        .replace("\n", " ")
