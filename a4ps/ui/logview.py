"""The log panel: the daemon's and the UI's messages, by level, scrollable.

Lines come from ``log`` events and from the UI itself (refused edits, failed
commands). A RecycleView makes widgets only for the visible lines; the filter shows
everything, warnings and errors, or errors only. New lines keep the view at the
bottom unless the user scrolled up to read. A line that does not fit ends in an
ellipsis; hovering it shows all of it.
"""
from __future__ import annotations

from typing import Any

from collections import deque

from kivy.properties import NumericProperty, StringProperty
from kivy.uix.boxlayout import BoxLayout

LEVELS = {"debug": 0, "info": 1, "warning": 2, "warn": 2, "error": 3, "critical": 3}
LEVEL_COLORS = {"debug": "8a929c", "info": "9fd0ff", "warning": "ffcf6b", "error": "ff7a7a"}
FILTERS = {"all": 0, "warnings": 2, "errors": 3}


def level_of(name: str) -> str:
    name = (name or "info").lower()
    if LEVELS.get(name, 1) >= 3:
        return "error"
    return {"warn": "warning"}.get(name, name if name in LEVEL_COLORS else "info")


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
                           f"{line.get('message', '')}"}

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
