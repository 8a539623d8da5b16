"""Plots people read: dissonance per round, a task's timeline, the live graph strip.

* :class:`DissonancePlot`: rounds on x, dissonance 0..1 on y, both axes with ticks,
  each point with its value, and the convergence threshold as a labelled dashed line.
* :class:`TimelinePlot`: one row per finished node: how long it ran (a bar scaled to
  the slowest node) and, for a persona that spoke, tokens per second.
* :class:`GraphStrip`: the cognitive graph drawn from the edges the daemon sends, the
  node running now lit, the nodes this task went through marked.

Text drawn inside plots is rendered to textures at the size it needs, and placed
inside the plot's box, so nothing spills.
"""
from __future__ import annotations

from typing import Any

from kivy.core.text import Label as CoreLabel
from kivy.graphics import Color, Line, Rectangle, RoundedRectangle
from kivy.metrics import dp, sp
from kivy.properties import (BooleanProperty, ListProperty, NumericProperty, ObjectProperty,
                             StringProperty)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.widget import Widget

from .activity import END, NODE_PERSONA, NODE_SHORT, START, GraphShape

PERSONA_RGB = {"ALFRED": (0.94, 0.82, 0.48), "BRICK": (0.48, 0.72, 1.0),
               "ROBIN": (1.0, 0.60, 0.84)}
AXIS = (0.55, 0.58, 0.62, 1)
TEXT = (0.82, 0.84, 0.87, 1)


_textures: dict[tuple, Any] = {}


def _texture(text: str, size: float, color=TEXT, bold: bool = False) -> Any:
    """A text texture, cached: plots redraw often and say the same things."""
    key = (text, size, tuple(color), bold)
    tex = _textures.get(key)
    if tex is None:
        core = CoreLabel(text=text, font_size=size, color=color, bold=bold)
        core.refresh()
        if len(_textures) > 512:
            _textures.clear()
        tex = _textures[key] = core.texture
    return tex


def _text(x: float, y: float, text: str, *, size: float | None = None, color=TEXT,
          anchor: str = "left", box: tuple[float, float, float, float] | None = None,
          bold: bool = False) -> tuple[float, float]:
    """Draw ``text`` at (x, y) (y = vertical centre), kept inside ``box`` (x0,y0,x1,y1)."""
    tex = _texture(text, size or sp(10), color, bold)
    w, h = tex.size
    if anchor == "right":
        x -= w
    elif anchor == "center":
        x -= w / 2
    y -= h / 2
    if box is not None:
        x = min(max(box[0], x), box[2] - w)
        y = min(max(box[1], y), box[3] - h)
    Color(1, 1, 1, 1)
    Rectangle(texture=tex, pos=(x, y), size=(w, h))
    return w, h


class DissonancePlot(Widget):
    """Dissonance per round, with axes, values and the labelled threshold."""

    points = ListProperty([])
    threshold = NumericProperty(0.35)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.bind(points=self.redraw, threshold=self.redraw, size=self.redraw,
                  pos=self.redraw)

    def plot_box(self) -> tuple[float, float, float, float]:
        """The data area (x0, y0, x1, y1): room left for y ticks, below for rounds."""
        return (self.x + dp(30), self.y + dp(18), self.right - dp(10), self.top - dp(14))

    def point_xy(self, i: int, value: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.plot_box()
        n = len(self.points)
        inset = dp(16)
        x = (x0 + x1) / 2 if n <= 1 else x0 + inset + i * (x1 - x0 - 2 * inset) / (n - 1)
        return x, y0 + max(0.0, min(1.0, value)) * (y1 - y0)

    def redraw(self, *_: Any) -> None:
        self.canvas.after.clear()
        if self.width < dp(80) or self.height < dp(50):
            return
        x0, y0, x1, y1 = self.plot_box()
        whole = (self.x, self.y, self.right, self.top)
        with self.canvas.after:
            Color(*AXIS)
            Line(points=[x0, y1, x0, y0, x1, y0], width=1)
            for v in (0.0, 0.5, 1.0):
                y = y0 + v * (y1 - y0)
                Color(*AXIS)
                Line(points=[x0 - dp(3), y, x0, y], width=1)
                _text(x0 - dp(5), y, f"{v:.1f}", anchor="right", color=AXIS, box=whole)
            ty = y0 + max(0.0, min(1.0, self.threshold)) * (y1 - y0)
            Color(0.95, 0.55, 0.35, 0.8)
            Line(points=[x0, ty, x1, ty], width=1, dash_length=4, dash_offset=4)
            # the label goes on the side of the line away from the last point
            last = self.points[-1] if self.points else 0.0
            below = last >= self.threshold and ty - dp(14) >= y0
            _text(x1, ty - dp(7) if below else ty + dp(7), f"threshold {self.threshold:.2f}",
                  anchor="right", color=(0.95, 0.62, 0.45, 1), box=whole)
            if not self.points:
                _text((x0 + x1) / 2, (y0 + y1) / 2, "no rounds yet", anchor="center",
                      color=AXIS, box=whole)
                return
            coords = []
            n_points = len(self.points)
            for i, v in enumerate(self.points):
                px, py = self.point_xy(i, v)
                coords += [px, py]
                Color(*AXIS)
                _text(px, self.y + dp(8), f"round {i + 1}" if n_points <= 4 else str(i + 1),
                      anchor="center", color=AXIS, box=whole)
            Color(1, 0.8, 0.3, 1)
            if len(coords) > 2:
                Line(points=coords, width=1.5)
            for i, v in enumerate(self.points):
                px, py = coords[2 * i], coords[2 * i + 1]
                Color(1, 0.8, 0.3, 1)
                Line(circle=(px, py, dp(3)), width=1.5)
                above = py + dp(10) <= y1 or py - dp(10) < y0
                _text(px, py + (dp(10) if above else -dp(10)), f"{v:.2f}", anchor="center",
                      box=(x0, y0, x1 + dp(8), self.top))


class TimelineRow(BoxLayout):
    """One node of the timeline (layout in morphic.kv)."""

    node = StringProperty("")
    detail = StringProperty("")
    fraction = NumericProperty(0.0)
    bar_rgba = ListProperty([0.5, 0.55, 0.6, 1])


class TimelinePlot(BoxLayout):
    """Which node took how long and how fast each persona spoke, for one task (the
    newest MAX_ROWS nodes)."""

    MAX_ROWS = 40
    rows = ListProperty([])   # NodeTime objects (a4ps.ui.tasklog)

    def show(self, timeline: list) -> None:
        """Show ``timeline`` (rebuilt only when it changed)."""
        rows = list(timeline[-self.MAX_ROWS:])
        key = (len(timeline), id(timeline[-1]) if timeline else None)
        if key != getattr(self, "_shown_key", None) or rows != self.rows:
            self._shown_key = key
            self.rows = rows

    def on_rows(self, _inst: Any, rows: list) -> None:
        box = self.ids.rows
        box.clear_widgets()
        timed = [r for r in rows if r.seconds is not None]
        longest = max((r.seconds for r in timed), default=0.0) or 1.0
        if not rows:
            box.add_widget(TimelineRow(node="", detail="no finished nodes yet", fraction=0))
            return
        for r in rows:
            name = NODE_SHORT.get(r.node, r.node)
            if r.round is not None and r.node in ("brick", "robin", "measure"):
                name += f" {r.round}"
            secs = r.seconds
            detail = "\u2014" if secs is None else f"{secs:.1f} s"
            rate = r.tokens_per_s
            if rate:
                detail += f" \u00b7 {'~' if r.estimated else ''}{rate:.0f} tok/s"
            rgb = PERSONA_RGB.get(r.persona, (0.55, 0.58, 0.62))
            box.add_widget(TimelineRow(node=name, detail=detail,
                                       fraction=(secs or 0.0) / longest,
                                       bar_rgba=[*rgb, 0.85]))


class GraphStrip(Widget):
    """The cognitive graph as a strip of boxes; the running node lit."""

    shape = ObjectProperty(None, allownone=True)     # GraphShape
    current = StringProperty("")
    visited = ListProperty([])
    hint = StringProperty("")                          # e.g. "BRICK · round 2 · thinking"
    compact = BooleanProperty(False)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.boxes: dict[str, tuple[float, float, float, float]] = {}
        self.column: dict[str, int] = {}
        self.bind(shape=self.redraw, current=self.redraw, visited=self.redraw,
                  size=self.redraw, pos=self.redraw, hint=self.redraw)

    def layout(self) -> dict[str, tuple[float, float, float, float]]:
        """Node name -> (x, y, w, h) inside this widget."""
        shape: GraphShape | None = self.shape
        if not shape:
            return {}
        cols = shape.layers()
        dot = dp(10)
        pad = dp(6)
        top_room = dp(14)         # the hint line
        inner_w = self.width - 2 * pad
        big = [c for c in cols if not set(c) <= {START, END}]
        small = len(cols) - len(big)
        gap = dp(6)
        col_w = min(dp(96), (inner_w - small * (dot + gap) - len(big) * gap) / max(len(big), 1))
        used = small * (dot + gap) + len(big) * (col_w + gap) - gap
        out: dict[str, tuple[float, float, float, float]] = {}
        x = self.x + pad + max(0.0, (inner_w - used) / 2)
        area_y, area_h = self.y + dp(4), self.height - dp(8) - top_room
        self.column = {n: i for i, col in enumerate(cols) for n in col}
        for col in cols:
            if set(col) <= {START, END}:
                for n in col:
                    out[n] = (x, area_y + area_h / 2 - dot / 2, dot, dot)
                x += dot + gap
                continue
            h = min(dp(22), (area_h - dp(4) * (len(col) - 1)) / len(col))
            total = h * len(col) + dp(4) * (len(col) - 1)
            y = area_y + (area_h + total) / 2 - h
            for n in col:
                out[n] = (x, y, max(col_w, dp(8)), h)
                y -= h + dp(4)
            x += col_w + gap
        return out

    def redraw(self, *_: Any) -> None:
        self.canvas.after.clear()
        self.boxes = boxes = self.layout()
        whole = (self.x, self.y, self.right, self.top)
        with self.canvas.after:
            Color(0.07, 0.08, 0.10, 1)
            Rectangle(pos=self.pos, size=self.size)
            if not boxes:
                _text(self.x + dp(8), self.center_y, "graph: waiting for the daemon's shape",
                      color=AXIS, box=whole)
                return
            shape: GraphShape = self.shape
            back = shape.back_edges()
            for s, t, _c, _l in shape.edges:
                if s not in boxes or t not in boxes:
                    continue
                lit = s in self.visited and (t in self.visited or t == self.current)
                Color(*((0.75, 0.8, 0.88, 0.9) if lit else (0.36, 0.40, 0.46, 0.9)))
                sx, sy, sw, sh = boxes[s]
                tx, ty, tw, th = boxes[t]
                skips = self.column.get(t, 0) - self.column.get(s, 0) > 1
                if (s, t) in back or skips:
                    above = sy + sh / 2 > self.y + (self.height - dp(14)) / 2
                    ey = (max(sy + sh, ty + th) + dp(3)) if above else (min(sy, ty) - dp(3))
                    ey = min(max(ey, self.y + dp(1)), self.top - dp(15))
                    sx0 = sx + sw / 2
                    tx0 = tx + tw / 2
                    y_s = sy + sh if above else sy
                    y_t = ty + th if above else ty
                    Line(points=[sx0, y_s, sx0, ey, tx0, ey, tx0, y_t], width=1)
                else:
                    Line(points=[sx + sw, sy + sh / 2, tx, ty + th / 2], width=1)
            for n, (x, y, w, h) in boxes.items():
                if n in (START, END):
                    Color(*AXIS)
                    Line(circle=(x + w / 2, y + h / 2, w / 2), width=1)
                    continue
                rgb = PERSONA_RGB.get(NODE_PERSONA.get(n, ""), (0.62, 0.65, 0.70))
                if n == self.current:
                    Color(*rgb, 1)
                elif n in self.visited:
                    Color(*rgb, 0.45)
                else:
                    Color(0.20, 0.22, 0.26, 1)
                RoundedRectangle(pos=(x, y), size=(w, h), radius=[dp(3)], segments=2)
                if n == self.current:
                    Color(1, 1, 1, 1)
                    Line(rectangle=(x - 1, y - 1, w + 2, h + 2))
                    Line(rectangle=(x - 2, y - 2, w + 4, h + 4))
                name = NODE_SHORT.get(n, n)
                tex = _texture(name, sp(10), (0.05, 0.06, 0.08, 1) if n == self.current
                               else TEXT, bold=n == self.current)
                if tex.width > w - dp(2):
                    tex = _texture(name[:max(1, int(len(name) * (w - dp(2)) / tex.width))],
                                   sp(10), TEXT)
                Color(1, 1, 1, 1)
                Rectangle(texture=tex, size=tex.size,
                          pos=(x + (w - tex.width) / 2, y + (h - tex.height) / 2))
            label = "now: " + (self.hint or "idle")
            _text(self.x + dp(6), self.top - dp(8), label, color=TEXT, box=whole)

