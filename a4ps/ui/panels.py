"""Floating windows on the desk, labels that fit, tooltips, a confirm dialog.

The desk is a layer over the whole window. Inspectors, the approval dialog, the
snapshot browser and confirmations are :class:`FloatingPanel` s on it: non-modal,
movable by their title bar, raised when touched, closed with their x or Esc (the top
one). Only a :class:`ConfirmDialog` is modal: it dims the window and takes every touch
until answered.

:class:`FitLabel` is one line that never spills: text that does not fit ends in an
ellipsis, and hovering it shows the whole text in a tooltip (errors also go to the
log). Layout lives in morphic.kv.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

from kivy.clock import Clock
from kivy.core.text import Label as CoreLabel
from kivy.core.window import Window
from kivy.metrics import dp
from kivy.properties import (BooleanProperty, ListProperty, ObjectProperty, StringProperty)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.floatlayout import FloatLayout
from kivy.uix.label import Label

_fit_labels: weakref.WeakSet = weakref.WeakSet()


class FitLabel(Label):
    """One line; an ellipsis when cut, the full text in a tooltip on hover."""

    tooltip = StringProperty("")   # shown instead of the text, if set

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        _fit_labels.add(self)

    def is_cut(self) -> bool:
        """True when the text is wider than the label (so it shows an ellipsis)."""
        if not self.text or self.width <= 0:
            return False
        core = CoreLabel(text=self.text, font_size=self.font_size, font_name=self.font_name,
                         bold=self.bold, markup=self.markup)
        try:
            w, _h = core.get_extents(core.text if not self.markup else _plain(self.text))
        except Exception:
            return False
        return w > self.width + 1

    def hover_text(self) -> str:
        if self.tooltip:
            return self.tooltip
        return _plain(self.text) if self.is_cut() else ""


def _plain(markup: str) -> str:
    """Markup text without its [tags] (&bl; / &br; become brackets again)."""
    out, i = [], 0
    while i < len(markup):
        c = markup[i]
        if c == "[":
            j = markup.find("]", i)
            if j < 0:
                out.append(markup[i:])
                break
            i = j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out).replace("&bl;", "[").replace("&br;", "]").replace("&amp;", "&")


class Tooltip(Label):
    """The tooltip bubble (one, on the desk)."""


class TooltipManager:
    """Shows a FitLabel's full text when the mouse rests on a cut one."""

    delay_s = 0.5

    def __init__(self, desk: Desk) -> None:
        self.desk = desk
        self.bubble = Tooltip(opacity=0, size_hint=(None, None))
        self._ev = None
        self._pos = (0.0, 0.0)
        Window.bind(mouse_pos=self._moved)

    def close(self) -> None:
        Window.unbind(mouse_pos=self._moved)
        self.hide()

    def _moved(self, _win: Any, pos: tuple) -> None:
        self._pos = tuple(pos)
        if self.bubble.opacity:
            self.hide()
        if self._ev is not None:
            self._ev.cancel()
        self._ev = Clock.schedule_once(self._show, self.delay_s)

    def label_at(self, x: float, y: float) -> FitLabel | None:
        for lab in list(_fit_labels):
            if lab.get_root_window() is None or not lab.opacity or not lab.text:
                continue
            lx, ly = lab.to_window(lab.x, lab.y)
            if lx <= x <= lx + lab.width and ly <= y <= ly + lab.height:
                return lab
        return None

    def _show(self, *_: Any) -> None:
        self._ev = None
        lab = self.label_at(*self._pos)
        text = lab.hover_text() if lab is not None else ""
        if text:
            self.show(text, self._pos)

    def show(self, text: str, pos: tuple[float, float]) -> None:
        b = self.bubble
        b.text = text[:2000]
        b.text_size = (min(dp(420), Window.width - dp(20)), None)
        b.texture_update()
        b.size = (b.texture_size[0] + dp(12), b.texture_size[1] + dp(8))
        x = min(max(0, pos[0] + dp(12)), Window.width - b.width)
        y = pos[1] - b.height - dp(12)
        if y < 0:
            y = min(pos[1] + dp(16), Window.height - b.height)
        b.pos = (x, y)
        if b.parent is None:
            self.desk.add_widget(b)
        else:
            self.desk.remove_widget(b)
            self.desk.add_widget(b)
        b.opacity = 1

    def hide(self) -> None:
        self.bubble.opacity = 0
        if self.bubble.parent is not None:
            self.bubble.parent.remove_widget(self.bubble)


class FloatingPanel(BoxLayout):
    """A movable, closable window on the desk. ``on_close`` fires once when closed."""

    title = StringProperty("")
    closable = BooleanProperty(True)
    modal = BooleanProperty(False)
    accent = ListProperty([0.35, 0.55, 0.85, 1])
    desk = ObjectProperty(None, allownone=True)

    __events__ = ("on_close",)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._closed = False

    # -- touches -------------------------------------------------------------------
    def on_touch_down(self, touch: Any) -> bool:
        if not self.collide_point(*touch.pos):
            return False
        if self.desk is not None:
            self.desk.raise_panel(self)
        bar = self.ids.get("title_bar")
        if bar is not None and bar.collide_point(*touch.pos) and \
                not self.ids.close_button.collide_point(*touch.pos) and \
                getattr(touch, "button", None) in (None, "left"):
            touch.grab(self)
            touch.ud[self] = (touch.x - self.x, touch.y - self.y)
            return True
        super().on_touch_down(touch)
        return True   # a panel is opaque: nothing under it gets the touch

    def on_touch_move(self, touch: Any) -> bool:
        if touch.grab_current is self:
            ox, oy = touch.ud[self]
            self.move_to(touch.x - ox, touch.y - oy)
            return True
        if self.collide_point(*touch.pos):
            super().on_touch_move(touch)
            return True
        return super().on_touch_move(touch)

    def on_touch_up(self, touch: Any) -> bool:
        if touch.grab_current is self:
            touch.ungrab(self)
            return True
        if self.collide_point(*touch.pos):
            super().on_touch_up(touch)
            return True
        return super().on_touch_up(touch)

    def move_to(self, x: float, y: float) -> None:
        """Move, keeping the title bar on screen."""
        parent = self.parent
        pw, ph = (parent.width, parent.height) if parent is not None else Window.size
        px, py = (parent.x, parent.y) if parent is not None else (0, 0)
        x = min(max(px - self.width + dp(80), x), px + pw - dp(80))
        y = min(max(py - self.height + dp(40), y), py + ph - self.height)
        self.pos = (x, y)

    def fit(self) -> None:
        """Shrink to the desk and pull inside it (after the window got smaller)."""
        parent = self.parent
        if parent is None:
            return
        self.width = min(self.width, parent.width - dp(8))
        self.height = min(self.height, parent.height - dp(8))
        self.move_to(self.x, self.y)

    # -- closing -------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.parent is not None:
            self.parent.remove_widget(self)
        self.dispatch("on_close")

    @property
    def closed(self) -> bool:
        return self._closed

    def on_close(self) -> None:
        pass


class Desk(FloatLayout):
    """The layer of floating panels over the window (top panel = last child)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.bind(size=self._fit_all)

    @property
    def panels(self) -> list[FloatingPanel]:
        return [w for w in reversed(self.children) if isinstance(w, FloatingPanel)]

    def top_panel(self) -> FloatingPanel | None:
        panels = self.panels
        return panels[-1] if panels else None

    def open(self, panel: FloatingPanel, pos: tuple[float, float] | None = None) -> FloatingPanel:
        panel.desk = self
        panel.size_hint = (None, None)
        panel.width = min(panel.width, self.width - dp(8))
        panel.height = min(panel.height, self.height - dp(8))
        if pos is None:
            n = len(self.panels)
            pos = (self.x + (self.width - panel.width) / 2 + dp(24) * (n % 5),
                   self.y + (self.height - panel.height) / 2 - dp(24) * (n % 5))
        self.add_widget(panel)
        panel.move_to(*pos)
        return panel

    def raise_panel(self, panel: FloatingPanel) -> None:
        if panel.parent is self and self.children and self.children[0] is not panel:
            modal_on_top = any(p.modal for p in self.panels if p is not panel)
            if modal_on_top and not panel.modal:
                return
            self.remove_widget(panel)
            self.add_widget(panel)

    def close_top(self) -> bool:
        """Close the top panel (Esc); False when there is none."""
        top = self.top_panel()
        if top is None or not top.closable:
            return False
        top.close()
        return True

    def on_touch_down(self, touch: Any) -> bool:
        modal = [p for p in self.panels if p.modal]
        if modal:
            modal[-1].on_touch_down(touch)
            return True     # a confirmation waits for its answer
        return super().on_touch_down(touch)

    def on_touch_move(self, touch: Any) -> bool:
        if any(p.modal for p in self.panels):
            for p in self.panels:
                if p.modal:
                    p.on_touch_move(touch)
            return True
        return super().on_touch_move(touch)

    def on_touch_up(self, touch: Any) -> bool:
        if any(p.modal for p in self.panels):
            for p in self.panels:
                if p.modal:
                    p.on_touch_up(touch)
            return True
        return super().on_touch_up(touch)

    def _fit_all(self, *_: Any) -> None:
        for p in self.panels:
            p.fit()


class ConfirmDialog(FloatingPanel):
    """A modal question with two answers; ``on_answer(bool)`` gets the choice."""

    message = StringProperty("")
    yes_text = StringProperty("OK")
    no_text = StringProperty("Cancel")
    danger = BooleanProperty(False)

    def __init__(self, on_answer: Callable[[bool], None] | None = None, **kw: Any) -> None:
        kw.setdefault("modal", True)
        super().__init__(**kw)
        self._on_answer = on_answer
        self.answered: bool | None = None

    def answer(self, yes: bool) -> None:
        if self.answered is not None:
            return
        self.answered = yes
        self.close()
        if self._on_answer is not None:
            self._on_answer(yes)

    def close(self) -> None:
        if self.answered is None:   # closed with x or Esc: the safe answer
            self.answered = False
            super().close()
            if self._on_answer is not None:
                self._on_answer(False)
            return
        super().close()
