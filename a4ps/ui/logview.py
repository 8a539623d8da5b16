"""The log panel: the daemon's and the UI's messages, by level, scrollable.

Lines come from ``log`` events and from the UI itself (refused edits, failed
commands). A RecycleView makes widgets only for the visible lines; the filter shows
everything, warnings and errors, or errors only. New lines keep the view at the
bottom unless the user scrolled up to read. A line that does not fit ends in an
ellipsis; hovering it shows all of it.
"""
from __future__ import annotations

from typing import Any

from kivy.properties import ListProperty, NumericProperty, StringProperty
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
    """Lines are dicts ``{level, source, message}``; ``show`` picks a filter."""

    lines = ListProperty([])
    show = StringProperty("all")
    counts = StringProperty("")
    errors = NumericProperty(0)

    def on_lines(self, *_: Any) -> None:
        self._refresh()

    def on_show(self, *_: Any) -> None:
        self._refresh()

    @property
    def data(self) -> list[dict]:
        return self.ids.rv.data

    def _refresh(self) -> None:
        floor = FILTERS.get(self.show, 0)
        shown = []
        errors = warnings = 0
        for line in self.lines:
            level = level_of(line.get("level", "info"))
            rank = LEVELS.get(level, 1)
            errors += rank >= 3
            warnings += rank == 2
            if rank >= floor:
                color = LEVEL_COLORS.get(level, "cccccc")
                shown.append({
                    "text": f"[color={color}]{level.upper()[:5]:5}[/color] "
                            f"[color=8a929c]{_esc(line.get('source', ''))}[/color] "
                            f"{_esc(line.get('message', ''))}",
                    "tooltip": f"{level.upper()} {line.get('source', '')}: "
                               f"{line.get('message', '')}"})
        self.errors = errors
        self.counts = f"{len(self.lines)} \u00b7 {warnings} warn \u00b7 {errors} err"
        rv = self.ids.rv
        following = rv.scroll_y <= 0.02 or not rv.children or \
            rv.height >= rv.children[0].height
        rv.data = shown
        if following:
            self._settle()

    def _settle(self, *_: Any) -> None:
        """Few lines start at the top; many keep the newest in view at the bottom."""
        from kivy.clock import Clock
        rv = self.ids.rv

        def settle(_dt: float) -> None:
            content = rv.children[0].height if rv.children else 0
            rv.scroll_y = 1 if content <= rv.height else 0
        Clock.schedule_once(settle, 0)


def _esc(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("[", "&bl;").replace("]", "&br;") \
        .replace("\n", " ")
