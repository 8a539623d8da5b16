"""A method's source in the inspector: Python highlighting, line numbers, no soft wrap.

Kivy's :class:`~kivy.uix.codeinput.CodeInput` (Pygments' Python lexer) with wrapping
off, so a long expression scrolls sideways instead of breaking mid-token, and a gutter
whose numbers follow the editor's scrolling, so "line 3" in an error means the third
line you see. :meth:`CodeEditor.mark_error` paints that line red in the gutter and
under the code until the text changes.
"""
from __future__ import annotations

import re
from typing import Any

from kivy.core.text import Label as CoreLabel
from kivy.graphics import Color, Rectangle
from kivy.metrics import dp, sp
from kivy.properties import NumericProperty, ObjectProperty, StringProperty
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.codeinput import CodeInput
from kivy.uix.widget import Widget

LINE_RE = re.compile(r"\bline (\d+)\b")
FONT = "RobotoMono-Regular"


def error_line(message: str) -> int | None:
    """The line an error message points at ("... line 3 ..."), if it names one."""
    m = LINE_RE.search(message or "")
    return int(m.group(1)) if m else None


class Gutter(Widget):
    """Line numbers drawn beside a CodeInput, aligned with its visible lines."""

    editor = ObjectProperty(None, allownone=True)
    error_line = NumericProperty(0)      # 1-based; 0 = none

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._textures: dict[tuple[str, bool], Any] = {}
        self.bind(pos=self.redraw, size=self.redraw, error_line=self.redraw)

    def _texture(self, text: str, red: bool) -> Any:
        key = (text, red)
        tex = self._textures.get(key)
        if tex is None:
            core = CoreLabel(text=text, font_size=sp(11), font_name=FONT,
                             color=(1, 0.45, 0.45, 1) if red else (0.55, 0.58, 0.62, 1))
            core.refresh()
            tex = self._textures[key] = core.texture
        return tex

    def redraw(self, *_: Any) -> None:
        self.canvas.clear()
        ed = self.editor
        if ed is None:
            return
        with self.canvas:
            Color(0.10, 0.11, 0.13, 1)
            Rectangle(pos=self.pos, size=self.size)
            Color(1, 1, 1, 1)
            pad_top = ed.padding[1]
            dy = ed.line_height + ed.line_spacing
            top = ed.top - pad_top + ed.scroll_y
            for i in range(max(1, len(ed._lines))):
                y_top = top - i * dy
                if y_top - ed.line_height > ed.top:
                    continue
                if y_top < ed.y:
                    break
                tex = self._texture(str(i + 1), i + 1 == self.error_line)
                w, h = tex.size
                y = y_top - ed.line_height + (ed.line_height - h) / 2
                if y < self.y or y + h > self.top:
                    continue
                Rectangle(texture=tex, size=(w, h), pos=(self.right - w - dp(6), y))


class CodeEditor(BoxLayout):
    """Gutter + CodeInput. ``text`` is the source; ``mark_error(line)`` highlights one."""

    text = StringProperty("")
    error_line = NumericProperty(0)
    code = ObjectProperty(None)

    def __init__(self, text: str = "", **kw: Any) -> None:
        super().__init__(**kw)
        from pygments.lexers.python import PythonLexer
        self.orientation = "horizontal"
        self.gutter = Gutter(size_hint_x=None, width=dp(34))
        self.code = CodeInput(text=text, lexer=PythonLexer(), do_wrap=False,
                              font_name=FONT, font_size=sp(12), write_tab=True,
                              tab_width=4, background_color=(0.13, 0.14, 0.16, 1),
                              foreground_color=(0.9, 0.9, 0.9, 1),
                              cursor_color=(0.9, 0.9, 0.9, 1), style_name="monokai")
        self.gutter.editor = self.code
        self.add_widget(self.gutter)
        self.add_widget(self.code)
        self.text = text
        self.code.bind(text=self._typed, scroll_y=self._scrolled, size=self._scrolled,
                       pos=self._scrolled, line_height=self._scrolled)
        self.bind(error_line=self._show_error)
        self._band: list[Any] = []

    @property
    def focus(self) -> bool:
        return bool(self.code.focus)

    @focus.setter
    def focus(self, value: bool) -> None:
        self.code.focus = value

    def on_text(self, _inst: Any, value: str) -> None:
        if self.code is not None and self.code.text != value:
            self.code.text = value

    def _typed(self, _inst: Any, value: str) -> None:
        if self.text != value:
            self.text = value
        if self.error_line:
            self.error_line = 0      # edited since the error: the mark is stale
        self.gutter.redraw()

    def _scrolled(self, *_: Any) -> None:
        self.gutter.redraw()
        self._show_error()

    def mark_error(self, line: int | None) -> None:
        self.error_line = int(line or 0)

    def _show_error(self, *_: Any) -> None:
        self.gutter.error_line = self.error_line
        ed = self.code
        for instr in self._band:
            ed.canvas.after.remove(instr)
        self._band = []
        if not self.error_line:
            return
        dy = ed.line_height + ed.line_spacing
        y_top = ed.top - ed.padding[1] + ed.scroll_y - (self.error_line - 1) * dy
        y = max(ed.y, y_top - ed.line_height)
        h = min(ed.top, y_top) - y
        if h <= 0:
            return
        color = Color(1, 0.3, 0.3, 0.22)
        rect = Rectangle(pos=(ed.x, y), size=(ed.width, h))
        ed.canvas.after.add(color)
        ed.canvas.after.add(rect)
        self._band = [color, rect]
