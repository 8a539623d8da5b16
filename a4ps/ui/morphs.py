"""Morphs: every live object of the image as a picture you can move, inspect and clone.

A morph holds display properties; the controller sets them. Morphs on the canvas are
drawn as one quad each of a shared texture (see :mod:`a4ps.ui.sprites`); prototypes on
the shelf are ordinary widgets (morphic.kv). Left-drag moves a morph (saved on release as ``morph_pos``, top-left anchored,
in dp); a left click selects it and shows its :class:`Halo` (inspect, clone, delete,
move); a right click opens its inspector. Personas and clones live on the
:class:`MorphCanvas`; the prototypes they delegate to (``persona``, ``tool``) sit on
the shelf below it as :class:`PrototypeMorph` s, which have no activity of their own.
"""
from __future__ import annotations

from typing import Any

from kivy.clock import Clock
from kivy.graphics import Callback, Canvas, Color, Fbo, Rectangle
from kivy.graphics.opengl import GL_BLEND, glDisable, glEnable
from kivy.metrics import dp, sp
from kivy.properties import (BooleanProperty, ListProperty, NumericProperty,
                             ObjectProperty, StringProperty)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.relativelayout import RelativeLayout
from kivy.uix.widget import Widget

from . import damage
from . import layout as L
from . import sprites
from .values import _escape as _esc

STATUS_COLORS = {
    "idle": (0.17, 0.20, 0.25, 1),
    "thinking": (0.13, 0.30, 0.50, 1),
    "speaking": (0.10, 0.38, 0.42, 1),
    "loading model": (0.45, 0.33, 0.08, 1),
    "fine-tuning": (0.38, 0.20, 0.48, 1),
    "error": (0.52, 0.16, 0.16, 1),
}
BUSY_COLOR = (0.16, 0.32, 0.46, 1)          # routing, answering, forging...
STATUS_TEXT = {"idle": "9aa3ad", "thinking": "8cc8ff", "speaking": "7fe7e0",
               "loading model": "ffcf6b", "fine-tuning": "d9a5ff", "error": "ff8a8a"}
BORDER = (0.32, 0.36, 0.42, 1)
ACTIVE_BORDER = (0.55, 0.85, 1.0, 1)
DRAG_THRESHOLD = 4   # dp a press must move before it is a drag, not a click
ZOOM_AT = (760, 560)  # dp of canvas per zoom 1: a bigger canvas draws morphs bigger
MAX_ZOOM = 1.5

PERSONA_SIZE = (208, 124)   # dp
TOOL_SIZE = (208, 80)
PROTOTYPE_SIZE = (190, 30)


def fit_text(text: str, width_px: float, font_px: float, lines: int, *, tail: bool) -> str:
    """Cut ``text`` to about ``lines`` lines of ``width_px`` (an ellipsis marks the cut):
    the end of it while it streams (``tail``), the start of it once it is final."""
    flat = " ".join((text or "").split())
    per_line = max(8, int(width_px / (font_px * 0.52)))
    budget = max(8, per_line * lines - per_line // 3)   # words wrap early; keep slack
    if len(flat) <= budget:
        return flat
    if tail:
        cut = flat[-(budget - 1):]
        space = cut.find(" ")
        return "\u2026" + (cut[space + 1:] if 0 <= space < 16 else cut)
    cut = flat[:budget - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > budget - 16 else cut) + "\u2026"


class Morph(Widget):
    """Base: drag with the left button, click to select, right click to inspect."""

    name = StringProperty("")
    selected = BooleanProperty(False)
    dragging = BooleanProperty(False)
    active = BooleanProperty(False)          # its node is running: highlighted border
    draggable = BooleanProperty(True)
    zoom = NumericProperty(1.0)              # the canvas's zoom (bigger windows, bigger morphs)
    bg_color = ListProperty(STATUS_COLORS["idle"])
    controller = ObjectProperty(None, allownone=True)
    display_text = StringProperty("")   # all of the morph's text, one label texture

    __events__ = ("on_moved", "on_inspect", "on_select")

    def on_touch_down(self, touch):
        if not self.collide_point(*touch.pos):
            return False
        if getattr(touch, "button", "left") == "right":
            self.dispatch("on_inspect")
            return True
        if getattr(touch, "is_mouse_scrolling", False):
            return False
        touch.grab(self)
        touch.ud[self] = (touch.x - self.x, touch.y - self.y, tuple(self.pos), False)
        return True

    def on_touch_move(self, touch):
        if touch.grab_current is self:
            ox, oy, start, moving = touch.ud[self]
            if not self.draggable:
                return True
            if not moving and abs(touch.x - ox - start[0]) < dp(DRAG_THRESHOLD) and \
                    abs(touch.y - oy - start[1]) < dp(DRAG_THRESHOLD):
                return True
            if not moving:
                touch.ud[self] = (ox, oy, start, True)
                self.dragging = True
                if self.controller is not None:
                    self.controller.morph_drag_started(self)
            self.pos = (touch.x - ox, touch.y - oy)
            return True
        return super().on_touch_move(touch)

    def on_touch_up(self, touch):
        if touch.grab_current is self:
            touch.ungrab(self)
            _, _, start, moving = touch.ud.pop(self, (0, 0, tuple(self.pos), False))
            self.dragging = False
            if moving and tuple(self.pos) != start:
                self.dispatch("on_moved")
            else:
                self.dispatch("on_select")
            return True
        return super().on_touch_up(touch)

    def on_moved(self):
        if self.controller is not None:
            self.controller.morph_moved(self)

    def on_inspect(self):
        if self.controller is not None:
            self.controller.open_inspector(self.proto_name)

    def on_select(self):
        if self.controller is not None:
            self.controller.select_morph(self)

    _trim = 0     # lines of words taken off because the text did not fit
    _trim_size: tuple = ()

    def _text(self, *_: Any) -> None:
        """Subclasses build ``display_text`` here."""

    _batching = False
    _text_wanted = False

    def _retext(self, *_: Any) -> None:
        if self._batching:
            self._text_wanted = True     # once, after the whole batch (apply_props)
        else:
            self._text()

    def apply_props(self, props: dict[str, Any]) -> None:
        """Set display properties together: the text is rebuilt once for all of
        them, not once per property."""
        self._batching = True
        try:
            for key, value in props.items():
                setattr(self, key, value)
        finally:
            self._batching = False
        if self._text_wanted:
            self._text_wanted = False
            self._text()

    def _trimmed(self) -> int:
        """Lines to take off (reset when the morph's size changes)."""
        if self._trim_size != tuple(self.size):
            self._trim_size, self._trim = tuple(self.size), 0
        return self._trim

    def render_now(self) -> None:
        """Draw the morph's picture now (the display refresh budgets this work)."""

    @property
    def proto_name(self) -> str:
        """The proto this morph shows (what the inspector opens)."""
        return self.name

    @property
    def can_clone(self) -> bool:
        return True

    @property
    def can_delete(self) -> bool:
        return True


class SpriteMorph(Morph):
    """A morph on the canvas: its picture is composed on the CPU (see
    :mod:`a4ps.ui.sprites`) into a small texture of its own (small textures update
    in microseconds; one big shared one cost milliseconds per update in Mesa's
    software renderer), and the canvas paints it where it shows (see
    :mod:`a4ps.ui.damage`). Any change of what it shows re-composes it: at once when
    the controller's display refresh calls :meth:`render_now`, else at the next frame."""

    text_fits = BooleanProperty(True)   # the last picture's text fitted inside the body
    header_text = StringProperty("")    # markup: name, role, activity, facts
    body_text = StringProperty("")      # plain: words (rendered ~3x faster than markup)

    def __init__(self, **kw):
        self.texture: Any = None
        self.picture_size = (0, 0)      # px of the last picture (body + shadow)
        self.composer = sprites.Composer()
        super().__init__(**kw)
        self._dirty = True
        self._render_ev = Clock.create_trigger(lambda _dt: self.render_now(), 0)
        self.bind(display_text=self._changed, bg_color=self._changed, active=self._changed,
                  selected=self._changed, dragging=self._changed, size=self._changed,
                  pos=self._moved)

    def _changed(self, *_: Any) -> None:
        self._dirty = True
        self._render_ev()

    def _moved(self, *_: Any) -> None:
        parent = self.parent
        if parent is not None and self.picture_size[0] and hasattr(parent, "morph_changed"):
            parent.morph_changed(self)

    def look(self) -> sprites.Look:
        highlighted = self.active or self.selected or self.dragging
        border = (1, 1, 1, 0.95) if (self.dragging or self.selected) else (
            ACTIVE_BORDER if self.active else BORDER)
        return sprites.Look(int(self.width), int(self.height), tuple(self.bg_color), border,
                            highlighted, 0.6 if self.dragging else 0.4, self.header_text,
                            sp(12) * self.zoom, self.body_text, sp(11) * self.zoom)

    def render_now(self, repaint: bool = True) -> bool:
        """Compose the picture now if what changed shows (True when it did). A change
        that no part of the window shows (the morph is covered there) waits, marked,
        until the canvas uncovers it: a crowd of 200 busy morphs costs what shows.
        ``repaint``: also repaint the canvas now (False: at the display refresh)."""
        self._render_ev.cancel()
        if not self._dirty or self.parent is None or self.width < 4:
            return False
        canvas = self.parent
        look = self.look()
        changed = self._changed_rect(look) if self.picture_size[0] else None
        if changed is not None and hasattr(canvas, "shows") and \
                not canvas.shows(self, changed):
            canvas.hidden.add(self)
            return False
        self._dirty = False
        for _ in range(4):        # fit_text guesses; a line fewer until the text fits
            img, fits = self.composer.compose(look)
            if fits or self._trimmed() >= 6:
                break
            self._trim += 1
            self._text()
            self._dirty = False
            look = self.look()
        self.text_fits = fits
        self.texture = sprites.upload(img, self.texture)
        self.picture_size = (img.shape[1], img.shape[0])
        self._drawn_parts = (self.composer.frame_key(look), look.header)
        if hasattr(canvas, "hidden"):
            canvas.hidden.discard(self)
        if repaint:
            self._moved()
        elif hasattr(canvas, "morph_changed"):
            canvas.morph_changed(self, repaint=False, changed=changed)
        return True

    _drawn_parts: tuple = ()

    def _changed_rect(self, look: sprites.Look) -> tuple[float, float, float, float]:
        """Where the picture changes (canvas px, y up): only the body text's area
        when the frame and the header are as last drawn, else all of it."""
        pw, ph = self.picture_size
        x, y = self.x, self.y - sprites.SHADOW
        if self._drawn_parts != (self.composer.frame_key(look), look.header) or \
                (int(self.width), int(self.height)) != (pw - sprites.SHADOW, ph - sprites.SHADOW):
            return (x, y, x + pw, y + ph)
        top = self.top - sprites.PAD[1] - self.composer.header_height()
        return (self.x + 1, self.y + 1, self.right - 1, max(self.y + 1, top))


class ProtoMorph(SpriteMorph):
    """A persona (or a clone): name, role, what it is doing now, model, last words."""

    role = StringProperty("")
    model_name = StringProperty("")
    status = StringProperty("idle")          # the colour: idle, thinking, speaking...
    activity = StringProperty("idle")        # "BRICK · round 2 · thinking"
    utterance = StringProperty("")
    streaming = BooleanProperty(False)       # utterance is still being spoken
    dissonance = NumericProperty(-1.0)       # -1: not measured yet
    show_dissonance = BooleanProperty(False)
    version = NumericProperty(0)
    parent_name = StringProperty("")

    base_size = PERSONA_SIZE

    def __init__(self, **kw):
        kw.setdefault("size", (dp(PERSONA_SIZE[0]), dp(PERSONA_SIZE[1])))
        super().__init__(**kw)
        t = self._retext
        self.bind(name=t, role=t, model_name=t, activity=t, status=t, dissonance=t,
                  show_dissonance=t, utterance=t, streaming=t, size=t)
        self._text()

    def _text(self, *_):
        z = self.zoom
        title = f"[b][size={int(dp(14) * z)}]{_esc(self.name)}[/size][/b]"
        if self.role:
            title += f"  [color=9aa3ad]{_esc(self.role)}[/color]"
        color = STATUS_TEXT.get(self.status, STATUS_TEXT["thinking"])
        lines = [title, f"[color={color}]\u2022 {_esc(self.activity)}[/color]"]
        facts = []
        if self.model_name:
            facts.append(_esc(self.model_name))
        if self.show_dissonance:
            facts.append("dissonance " + (f"{self.dissonance:.2f}" if self.dissonance >= 0
                                          else "\u2014"))
        if facts:
            lines.append("[color=b8c0c8]" + " \u00b7 ".join(facts) + "[/color]")
        words = ""
        if self.utterance:
            font = dp(11) * z
            room = self.height - dp(12) - (dp(19) + dp(16) * (len(lines) - 1)) * z
            n = int(room // (font * 1.25)) - self._trimmed()
            if n >= 1:
                words = fit_text(self.utterance, self.width - dp(16), font, n,
                                 tail=self.streaming)
        self.header_text = "\n".join(lines)
        self.body_text = words
        self.display_text = self.header_text + ("\n" + _esc(words) if words else "")

    def on_status(self, _inst, value):
        self.bg_color = STATUS_COLORS.get(value, BUSY_COLOR)

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
        if merged.get("last_utterance") and not self.streaming:
            self.utterance = str(merged["last_utterance"])


class ToolMorph(SpriteMorph):
    """A forged tool: name, description, version, test status."""

    tool_name = StringProperty("")
    description = StringProperty("")
    version = StringProperty("")
    test_status = StringProperty("")

    base_size = TOOL_SIZE

    def __init__(self, **kw):
        kw.setdefault("size", (dp(TOOL_SIZE[0]), dp(TOOL_SIZE[1])))
        super().__init__(**kw)
        t = self._retext
        self.bind(tool_name=t, description=t, version=t, test_status=t, size=t)
        self._text()

    def _text(self, *_):
        z = self.zoom
        lines = 2 - self._trimmed()
        desc = fit_text(self.description, self.width - dp(16), dp(11) * z, lines, tail=False) \
            if lines > 0 else ""
        self.header_text = (
            f"[b][size={int(dp(14) * z)}]tool {_esc(self.tool_name or self.name)}[/size][/b]"
            f"  v{_esc(self.version)}\n[color=b8c0c8]tests: {_esc(self.test_status)}[/color]")
        self.body_text = desc
        self.display_text = self.header_text + ("\n" + _esc(desc) if desc else "")

    def apply_tool(self, data: dict) -> None:
        self.description = " ".join(str(data.get("description") or "").split())[:300]
        version = data.get("version")
        self.version = "" if version is None else str(version)
        self.test_status = _test_status(data)
        self.bg_color = (0.13, 0.32, 0.24, 1) if self.test_status.startswith("pass") \
            else (0.27, 0.27, 0.27, 1)

    @property
    def proto_name(self) -> str:
        return f"tool.{self.tool_name}"

    @property
    def can_clone(self) -> bool:
        return False     # tools come from the forge, with tests

    @property
    def can_delete(self) -> bool:
        return False


class PrototypeMorph(Morph):
    """A prototype on the shelf (``persona``, ``tool``): what clones delegate to."""

    clones = NumericProperty(0)
    version = NumericProperty(0)

    def __init__(self, **kw):
        kw.setdefault("size", (dp(PROTOTYPE_SIZE[0]), dp(PROTOTYPE_SIZE[1])))
        kw.setdefault("draggable", False)
        super().__init__(**kw)
        self.bind(name=self._retext, clones=self._retext)
        self._text()

    def _text(self, *_):
        clones = f"{self.clones} clone{'s' if self.clones != 1 else ''}"
        self.display_text = (f"[b]{_esc(self.name)}[/b] [color=9aa3ad]prototype"
                             + (f" \u00b7 {clones}" if self.clones else "") + "[/color]")

    def apply_proto(self, data: dict) -> None:
        self.version = int(data.get("version") or 0)

    @property
    def can_delete(self) -> bool:
        return self.clones == 0


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


def _blend_off(_instr: Any) -> None:
    glDisable(GL_BLEND)


def _blend_on(_instr: Any) -> None:
    glEnable(GL_BLEND)


class MorphCanvas(RelativeLayout):
    """The world: holds morphs by name, places them (see :mod:`a4ps.ui.layout`) and
    paints them.

    Painting is built for a software rasteriser: every morph's picture lives in one
    texture (:class:`~a4ps.ui.sprites.MorphAtlas`), and only damaged tiles are
    repainted, each with only what shows in it (:class:`~a4ps.ui.damage.Scene`), as
    one mesh into an offscreen framebuffer that keeps the rest. The window shows that
    framebuffer as one quad. Morph widgets draw nothing themselves; they are in the
    widget tree for touches.
    """

    morph_count = NumericProperty(0)
    background = ListProperty([0.09, 0.10, 0.12, 1])
    controller = ObjectProperty(None, allownone=True)
    zoom = NumericProperty(1.0)   # morphs grow with a big window (1 .. MAX_ZOOM)

    def __init__(self, **kw):
        self.canvas = Canvas()
        with self.canvas:
            self.fbo = Fbo(size=(100, 100), with_stencilbuffer=False)
            # the framebuffer is opaque (every tile has a background or a body):
            # drawn without blending, llvmpipe does not read what is under it
            self.opaque = (Callback(_blend_off), Callback(_blend_on))
            self.canvas.remove(self.opaque[1])
            Color(1, 1, 1, 1)
            self.fbo_rect = Rectangle(pos=(0, 0), size=(100, 100), texture=self.fbo.texture)
        self.canvas.add(self.opaque[1])
        self._ghost = Canvas()           # where the morph widgets' own canvases go
        self.scene = damage.Scene()
        self.morphs: dict[str, Morph] = {}
        self.spots: dict[str, tuple[float, float] | None] = {}   # saved (left, top) dp
        self._repaint_ev = Clock.create_trigger(self._repaint, -1)
        self.repaints = 0
        self.hidden: set[Morph] = set()        # changed where nothing shows (see shows)
        self._geometry_seen = -1
        # tile -> its draws [(morph or BACKGROUND, texture, quad)], planned ahead of
        # the refresh that paints them (see plan_ahead)
        self._planned: dict[tuple[int, int], list[tuple[Any, Any, tuple]]] = {}
        super().__init__(**kw)

    def add_widget(self, widget, *args, **kw):
        canvas, self.canvas = self.canvas, self._ghost
        try:
            return super().add_widget(widget, *args, **kw)
        finally:
            self.canvas = canvas

    def remove_widget(self, widget, *args, **kw):
        canvas, self.canvas = self.canvas, self._ghost
        try:
            return super().remove_widget(widget, *args, **kw)
        finally:
            self.canvas = canvas
            self.scene.remove(widget)
            self.hidden.discard(widget)
            self._repaint_ev()

    # -- painting ------------------------------------------------------------------
    def morph_changed(self, morph: SpriteMorph, repaint: bool = True,
                      changed: tuple[float, float, float, float] | None = None) -> None:
        """A morph's picture, place or size changed: damage where it was and is
        (``changed``: a new picture in the same place differs only there, e.g. its
        words; ``repaint``: paint it next frame; else the display refresh calls
        :meth:`repaint_now`)."""
        if self.morphs.get(morph.name) is not morph or not morph.picture_size[0]:
            return
        pw, ph = morph.picture_size
        x, y = morph.x, morph.y - sprites.SHADOW
        self.scene.put(morph, (x, y, x + pw, y + ph),
                       (morph.x + 1, morph.y + 1, morph.right - 1, morph.top - 1), changed)
        if repaint:
            self._repaint_ev()

    def shows(self, morph: Morph, rect: tuple[float, float, float, float]) -> bool:
        """Whether any of ``rect`` (canvas px) of ``morph`` is on screen."""
        return self.scene.shows(morph, rect)

    @property
    def damaged(self) -> bool:
        """Tiles wait to be repainted (planned ahead or not)."""
        return bool(self.scene.dirty or self._planned)

    def repaint_now(self) -> None:
        self._repaint_ev.cancel()
        self._repaint()

    def _uncover(self) -> None:
        """Morphs whose changes were covered: the scene moved, compose those now
        uncovered (before the tiles they damage are painted)."""
        if self.scene.geometry == self._geometry_seen:
            return
        self._geometry_seen = self.scene.geometry
        for m in list(self.hidden):
            if self.morphs.get(m.name) is not m:
                self.hidden.discard(m)
            else:
                m.render_now(repaint=False)

    def plan_ahead(self) -> int:
        """Between refreshes: plan the tiles damaged so far (what to draw in each, as
        quads), so the refresh frame plans only what was damaged since. A tile damaged
        again is planned again (its old plan is dropped); nothing is drawn until the
        canvas's next refresh. Returns the tiles planned."""
        self._uncover()
        tiles = self.scene.take()
        if tiles:
            self._plan_tiles(tiles)
        return len(tiles)

    def _plan_tiles(self, tiles: set[tuple[int, int]]) -> None:
        t = self.scene.tile
        for tile in tiles:
            self._planned[tile] = []
        planned = self._planned
        for key, (x0, y0, x1, y1) in self.scene.plan(tiles):
            if key is damage.BACKGROUND:
                tex, quad = None, (x0, y0, 0, 0, x1, y0, 0, 0, x1, y1, 0, 0, x0, y1, 0, 0)
            else:
                tex = key.texture
                tw, th = key.picture_size
                px, py = key.x, key.y - sprites.SHADOW
                u0, v0, u1, v1 = (x0 - px) / tw, (y0 - py) / th, (x1 - px) / tw, (y1 - py) / th
                quad = (x0, y0, u0, v0, x1, y0, u1, v0, x1, y1, u1, v1, x0, y1, u0, v1)
            planned[(int(x0 // t), int(y0 // t))].append((key, tex, quad))

    def _repaint(self, *_: Any) -> None:
        """Paint the damaged tiles into the framebuffer (the rest of it stays): the
        background where nothing covers a tile, then each morph's visible parts as
        one mesh of its own texture (tiles planned ahead by :meth:`plan_ahead` and
        the rest planned now)."""
        from kivy.graphics import Mesh
        self.plan_ahead()
        planned, self._planned = self._planned, {}
        if not planned:
            return
        z = self.scene._z
        draws = [d for tile_draws in planned.values() for d in tile_draws]
        # backgrounds first, then each morph's draws together, bottom morph first
        draws.sort(key=lambda d: -1 if d[0] is damage.BACKGROUND else z.get(d[0], -1))
        self.fbo.clear()
        groups: list[tuple[Any, list[float]]] = []
        for _key, tex, quad in draws:
            if not groups or groups[-1][0] is not tex or len(groups[-1][1]) >= 16 * 4000:
                groups.append((tex, []))
            groups[-1][1].extend(quad)
        for tex, vs in groups:
            self.fbo.add(Color(*self.background) if tex is None else Color(1, 1, 1, 1))
            n = len(vs) // 16
            idx = [i for q in range(n) for i in (4 * q, 4 * q + 1, 4 * q + 2,
                                                 4 * q + 2, 4 * q + 3, 4 * q)]
            self.fbo.add(Mesh(vertices=vs, indices=idx, mode="triangles", texture=tex))
        self.fbo.ask_update()
        self.repaints += 1

    def on_touch_down(self, touch):
        if super().on_touch_down(touch):
            return True
        if self.collide_point(*touch.pos) and self.controller is not None \
                and getattr(touch, "button", None) in (None, "left"):
            self.controller.select_morph(None)     # a click on the empty canvas
        return False

    def on_size(self, _inst, size):
        w, h = max(int(size[0]), 1), max(int(size[1]), 1)
        self.fbo.size = (w, h)
        self.fbo_rect.size = (w, h)
        self.fbo_rect.texture = self.fbo.texture
        self._planned.clear()            # planned for the old size
        self.scene.resize(w, h)          # a new framebuffer: paint all of it
        self._repaint_ev()
        zoom = round(min(max(min(w / dp(ZOOM_AT[0]), h / dp(ZOOM_AT[1])), 1.0), MAX_ZOOM), 2)
        if zoom != self.zoom:
            self.zoom = zoom     # on_zoom relayouts
        else:
            self.relayout()

    def on_zoom(self, _inst, zoom):
        for m in self.morphs.values():
            self._fit_zoom(m)
        self.relayout()

    def _fit_zoom(self, m: Morph) -> None:
        base = getattr(m, "base_size", None)
        m.zoom = self.zoom
        if base is not None:
            m.size = (dp(base[0]) * self.zoom, dp(base[1]) * self.zoom)

    @property
    def unit(self) -> float:
        """Pixels per layout unit (dp at zoom 1)."""
        return dp(1) * self.zoom

    def on_background(self, _inst, value):
        self.scene.damage_all()
        self._repaint_ev()

    def get(self, name: str) -> Morph | None:
        return self.morphs.get(name)

    def add_morph(self, morph: Morph, spot: tuple[float, float] | None = None) -> Morph:
        old = self.morphs.pop(morph.name, None)
        if old is not None:
            self.remove_widget(old)
        self.morphs[morph.name] = morph
        self.spots[morph.name] = spot
        self._fit_zoom(morph)
        self.add_widget(morph)
        if isinstance(morph, SpriteMorph):
            morph._changed()
        self.morph_count = len(self.morphs)
        self.relayout()
        return morph

    def remove_morph(self, name: str) -> None:
        morph = self.morphs.pop(name, None)
        self.spots.pop(name, None)
        if morph is not None:
            self.remove_widget(morph)
        self.morph_count = len(self.morphs)
        self.relayout()

    def raise_morph(self, morph: Morph) -> None:
        """On top of the others (painted last, first to get touches)."""
        if morph.parent is self and self.children and self.children[0] is not morph:
            canvas, self.canvas = self.canvas, self._ghost
            try:
                super().remove_widget(morph)
                super().add_widget(morph)
            finally:
                self.canvas = canvas
        self.scene.raise_(morph)
        self._repaint_ev()

    def set_spot(self, name: str, spot: tuple[float, float] | None) -> None:
        """The user's spot for a morph (None: let it flow); relayouts on change."""
        if name in self.morphs and self.spots.get(name) != spot:
            self.spots[name] = spot
            self.relayout()

    def spot_of(self, morph: Morph) -> tuple[float, float]:
        """Where ``morph`` is now, as (left, top) in layout units (dp at zoom 1) from
        the top-left corner."""
        return (morph.x / self.unit, (self.height - morph.top) / self.unit)

    def relayout(self, *_: Any) -> None:
        """Place every morph that is not being dragged (top-left anchored, in view)."""
        if not self.morphs or self.width <= 1:
            return
        one = self.unit
        boxes = [L.Box(name, m.width / one, m.height / one, self.spots.get(name))
                 for name, m in self.morphs.items() if not m.dragging]
        spots = L.place(boxes, self.width / one, self.height / one)
        for name, (left, top) in spots.items():
            m = self.morphs[name]
            pos = (left * one, self.height - top * one - m.height)
            if tuple(m.pos) != pos:
                m.pos = pos


class PrototypeShelf(BoxLayout):
    """The prototypes (``persona``, ``tool``) in a row under the canvas."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.morphs: dict[str, PrototypeMorph] = {}

    def get(self, name: str) -> PrototypeMorph | None:
        return self.morphs.get(name)

    def add_morph(self, morph: PrototypeMorph) -> PrototypeMorph:
        self.remove_morph(morph.name)
        self.morphs[morph.name] = morph
        self.ids.chips.add_widget(morph)
        return morph

    def remove_morph(self, name: str) -> None:
        morph = self.morphs.pop(name, None)
        if morph is not None and morph.parent is not None:
            morph.parent.remove_widget(morph)


class Halo(BoxLayout):
    """Buttons around the selected morph: inspect, clone, delete, move (drag it)."""

    target = ObjectProperty(None, allownone=True)
    controller = ObjectProperty(None, allownone=True)
    can_clone = BooleanProperty(True)
    can_delete = BooleanProperty(True)
    can_move = BooleanProperty(True)

    def on_target(self, _inst, morph):
        if morph is None:
            self.opacity = 0
            self.disabled = True
            return
        self.can_clone = morph.can_clone
        self.can_delete = morph.can_delete
        self.can_move = morph.draggable
        self.opacity = 1
        self.disabled = False
        self.follow()

    def follow(self, *_: Any) -> None:
        """Sit just above the target, or below it when it is at the top of the world
        (or over its top edge when neither fits)."""
        m = self.target
        if m is None or self.parent is None:
            return
        wx, wy = m.to_window(m.x, m.y)
        x, y = self.parent.to_widget(wx, wy)
        top = y + m.height
        py = top + dp(2)
        if py + self.height > self.parent.top:
            py = y - self.height - dp(2)
            if py < self.parent.y:
                py = top - self.height
        px = min(max(self.parent.x, x), self.parent.right - self.width)
        self.pos = (px, py)

    def on_touch_down(self, touch):
        if self.target is None or not self.collide_point(*touch.pos):
            return False
        move = self.ids.get("move")
        if move is not None and self.can_move and move.collide_point(*touch.pos):
            touch.grab(self)
            touch.ud[self] = (touch.x, touch.y, tuple(self.target.pos))
            self.target.dragging = True
            return True
        return super().on_touch_down(touch)

    def on_touch_move(self, touch):
        if touch.grab_current is self and self.target is not None:
            x0, y0, (mx, my) = touch.ud[self]
            self.target.pos = (mx + touch.x - x0, my + touch.y - y0)
            self.follow()
            return True
        return super().on_touch_move(touch)

    def on_touch_up(self, touch):
        if touch.grab_current is self and self.target is not None:
            touch.ungrab(self)
            _, _, start = touch.ud.pop(self)
            self.target.dragging = False
            if tuple(self.target.pos) != start:
                self.target.dispatch("on_moved")
            return True
        return super().on_touch_up(touch)
