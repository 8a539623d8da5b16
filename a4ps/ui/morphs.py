"""Morphs: every live object of the image as a picture you can drag and inspect.

A morph holds only display properties (layout and colours are in morphic.kv); the
controller sets them from events. Dragging with the left button moves the morph and,
on release, fires ``on_moved``; a right click fires ``on_inspect``. The
:class:`MorphCanvas` places new morphs on a free grid cell unless the proto carries
a saved ``morph_pos``.
"""
from __future__ import annotations

from kivy.graphics import Canvas, ClearBuffers, ClearColor, Color, Fbo, Rectangle
from kivy.properties import (BooleanProperty, ListProperty, NumericProperty,
                             ObjectProperty, StringProperty)
from kivy.uix.relativelayout import RelativeLayout
from kivy.uix.widget import Widget

from .values import _escape as _esc

STATUS_COLORS = {
    "idle": (0.20, 0.24, 0.30, 1),
    "thinking": (0.18, 0.36, 0.55, 1),
    "loading model": (0.50, 0.40, 0.12, 1),
    "fine-tuning": (0.42, 0.22, 0.50, 1),
    "error": (0.55, 0.18, 0.18, 1),
}


class Morph(Widget):
    """Base: drag with the left button, right click to inspect."""

    name = StringProperty("")
    selected = BooleanProperty(False)
    dragging = BooleanProperty(False)
    bg_color = ListProperty(STATUS_COLORS["idle"])
    controller = ObjectProperty(None, allownone=True)
    display_text = StringProperty("")   # all of the morph's text, one label texture

    __events__ = ("on_moved", "on_inspect")

    def on_touch_down(self, touch):
        if not self.collide_point(*touch.pos):
            return False
        if getattr(touch, "button", "left") == "right":
            self.dispatch("on_inspect")
            return True
        if getattr(touch, "is_mouse_scrolling", False):
            return False
        touch.grab(self)
        touch.ud[self] = (touch.x - self.x, touch.y - self.y, tuple(self.pos))
        self.dragging = True
        return True

    def on_touch_move(self, touch):
        if touch.grab_current is self:
            ox, oy, _ = touch.ud[self]
            self.pos = (touch.x - ox, touch.y - oy)
            return True
        return super().on_touch_move(touch)

    def on_touch_up(self, touch):
        if touch.grab_current is self:
            touch.ungrab(self)
            self.dragging = False
            _, _, start = touch.ud.pop(self, (0, 0, tuple(self.pos)))
            if tuple(self.pos) != start:
                self.dispatch("on_moved")
            return True
        return super().on_touch_up(touch)

    def on_moved(self):
        if self.controller is not None:
            self.controller.morph_moved(self)

    def on_inspect(self):
        if self.controller is not None:
            self.controller.open_inspector(self.name)


class ProtoMorph(Morph):
    """A proto: name, role, model, status, latest utterance, dissonance (BRICK/ROBIN)."""

    role = StringProperty("")
    model_name = StringProperty("")
    status = StringProperty("idle")
    utterance = StringProperty("")
    dissonance = NumericProperty(-1.0)  # -1: not measured yet
    show_dissonance = BooleanProperty(False)
    version = NumericProperty(0)
    parent_name = StringProperty("")

    def __init__(self, **kw):
        super().__init__(**kw)
        self.bind(name=self._text, role=self._text, model_name=self._text,
                  status=self._text, dissonance=self._text, show_dissonance=self._text,
                  utterance=self._text)
        self._text()

    def _text(self, *_):
        title = f"[b][size=14sp]{_esc(self.name)}[/size][/b]"
        if self.role:
            title += f"  [color=aaaaaa]{_esc(self.role)}[/color]"
        lines = [title]
        if self.model_name:
            lines.append("model: " + _esc(self.model_name))
        lines.append("status: [b]" + _esc(self.status) + "[/b]")
        if self.show_dissonance:
            lines.append("dissonance: " + (f"{self.dissonance:.2f}" if self.dissonance >= 0
                                           else "\u2014"))
        if self.utterance:
            lines.append(f"[size=11sp][color=d8d8d8]{_esc(self.utterance[:140])}[/color][/size]")
        self.display_text = "\n".join(lines)

    def on_utterance(self, _inst, value):
        flat = " ".join(value.split())[:300]
        if flat != value:
            self.utterance = flat

    def on_status(self, _inst, value):
        self.bg_color = STATUS_COLORS.get(value, STATUS_COLORS["idle"])

    def apply_proto(self, data: dict) -> None:
        """Show a proto as sent by ``proto.get`` (Proto.to_dict())."""
        slots = dict(data.get("slots") or {})
        inherited = {k: v.get("value") for k, v in (data.get("inherited") or {}).items()
                     if isinstance(v, dict)}
        merged = {**inherited, **slots}
        self.version = int(data.get("version") or 0)
        self.parent_name = data.get("parent") or ""
        self.role = str(merged.get("role") or "")
        self.model_name = str(merged.get("model_name") or "")
        if merged.get("last_utterance"):
            self.utterance = str(merged["last_utterance"])
        status = merged.get("status")
        if isinstance(status, str) and status and not self.dragging:
            self.status = status


class ToolMorph(Morph):
    """A forged tool: name, description, version, test status."""

    tool_name = StringProperty("")
    description = StringProperty("")
    version = StringProperty("")
    test_status = StringProperty("")

    def __init__(self, **kw):
        super().__init__(**kw)
        self.bind(tool_name=self._text, description=self._text, version=self._text,
                  test_status=self._text)
        self._text()

    def _text(self, *_):
        self.display_text = (
            f"[b][size=14sp]tool {_esc(self.tool_name or self.name)}[/size][/b]  v{_esc(self.version)}"
            f"\ntests: {_esc(self.test_status)}\n[size=11sp]{_esc(self.description[:140])}[/size]")

    def apply_tool(self, data: dict) -> None:
        self.description = " ".join(str(data.get("description") or "").split())[:300]
        version = data.get("version")
        self.version = "" if version is None else str(version)
        self.test_status = _test_status(data)
        self.bg_color = (0.16, 0.38, 0.28, 1) if self.test_status.startswith("pass") \
            else (0.30, 0.30, 0.30, 1)


def _test_status(data: dict) -> str:
    for key in ("test_status", "tests_status", "status"):
        if isinstance(data.get(key), str) and data[key]:
            return data[key]
    for key in ("tests_passed", "passed"):
        if key in data:
            passed = data[key]
            total = data.get("tests_total", data.get("total"))
            if isinstance(passed, bool):
                return "passed" if passed else "failed"
            if isinstance(total, int):
                return f"passed {passed}/{total}" if passed == total else f"failed {passed}/{total}"
            return f"passed {passed}"
    return "unknown"


class MorphCanvas(RelativeLayout):
    """The world: holds morphs by name and finds a free spot for new ones.

    The morphs draw into an offscreen framebuffer (Fbo) whose texture is one quad in
    the window. A window redraw caused by anything else (status bar, log, transcript)
    then costs one textured quad instead of hundreds of morph instructions; the Fbo
    re-renders only when a morph changes, and the controller batches those changes.
    """

    morph_count = NumericProperty(0)
    cell = ListProperty([240, 150])
    background = ListProperty([0.09, 0.10, 0.12, 1])

    def __init__(self, **kw):
        self.canvas = Canvas()
        with self.canvas:
            self.fbo = Fbo(size=(100, 100), with_stencilbuffer=False)
            Color(1, 1, 1, 1)
            self.fbo_rect = Rectangle(pos=(0, 0), size=(100, 100), texture=self.fbo.texture)
        with self.fbo:
            self._clear = ClearColor(*self.background)
            ClearBuffers()
        super().__init__(**kw)
        self.morphs: dict[str, Morph] = {}

    def add_widget(self, widget, *args, **kw):
        canvas, self.canvas = self.canvas, self.fbo   # children draw into the Fbo
        try:
            return super().add_widget(widget, *args, **kw)
        finally:
            self.canvas = canvas

    def remove_widget(self, widget, *args, **kw):
        canvas, self.canvas = self.canvas, self.fbo
        try:
            return super().remove_widget(widget, *args, **kw)
        finally:
            self.canvas = canvas

    def on_size(self, _inst, size):
        w, h = max(int(size[0]), 1), max(int(size[1]), 1)
        self.fbo.size = (w, h)
        self.fbo_rect.size = (w, h)
        self.fbo_rect.texture = self.fbo.texture

    def on_background(self, _inst, value):
        self._clear.rgba = value

    def get(self, name: str) -> Morph | None:
        return self.morphs.get(name)

    def add_morph(self, morph: Morph, pos=None) -> Morph:
        old = self.morphs.pop(morph.name, None)
        if old is not None:
            self.remove_widget(old)
        morph.pos = tuple(pos) if pos is not None else self.free_spot(morph)
        self.morphs[morph.name] = morph
        self.add_widget(morph)
        self.morph_count = len(self.morphs)
        return morph

    def remove_morph(self, name: str) -> None:
        morph = self.morphs.pop(name, None)
        if morph is not None:
            self.remove_widget(morph)
        self.morph_count = len(self.morphs)

    def free_spot(self, morph: Morph) -> tuple[float, float]:
        """The first grid cell (left to right, top down) no morph overlaps."""
        cw, ch = self.cell
        width = max(self.width, cw * 3)
        height = max(self.height, ch * 3)
        cols = max(int(width // cw), 1)
        taken = [m for m in self.morphs.values() if m is not morph]
        for i in range(2000):
            col, row = i % cols, i // cols
            x, y = 10 + col * cw, height - (row + 1) * ch
            box = (x, y, x + morph.width, y + morph.height)
            if not any(_overlap(box, m) for m in taken):
                return (x, y)
        return (10, 10)


def _overlap(box: tuple, m: Widget) -> bool:
    x0, y0, x1, y1 = box
    return not (x1 <= m.x or m.right <= x0 or y1 <= m.y or m.top <= y0)
