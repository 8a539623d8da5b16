"""Time travel: the image's snapshots, what each changed, and going back to one.

The browser lists ``image.snapshots`` (newest first: when, why it was taken, what it
changed), shows ``image.diff`` of the selected one against the live image, saves a
named snapshot (``image.snapshot``), and restores one (``image.restore``) after a
confirmation that says the current state is kept as a "pre-restore" snapshot. The
daemon side is the time-travel part's; this is its face.
"""
from __future__ import annotations

import time
from typing import Any

from kivy.metrics import dp
from kivy.properties import (BooleanProperty, ListProperty, ObjectProperty, StringProperty)
from kivy.uix.behaviors import ToggleButtonBehavior
from kivy.uix.boxlayout import BoxLayout

from . import values as V
from .panels import FloatingPanel


def snapshot_title(s: dict[str, Any]) -> str:
    """One line: when, and why it was taken (or its name)."""
    ts = s.get("ts")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) \
        if isinstance(ts, (int, float)) else str(ts or "?")
    what = f"\u201c{s['name']}\u201d" if s.get("name") else (s.get("trigger") or "snapshot")
    return f"{when}  {what}"


def snapshot_line(s: dict[str, Any]) -> str:
    """The second line: generation and what changed."""
    gen = s.get("generation")
    parts = [f"gen {gen}"] if gen is not None else []
    if s.get("name") and s.get("trigger"):
        parts.append(str(s["trigger"]))
    what = str(s.get("summary") or V.changes_line(s.get("changes")) or "")
    if what:
        parts.append(what)
    return " \u00b7 ".join(parts)


class SnapshotItem(ToggleButtonBehavior, BoxLayout):
    """One snapshot in the list (layout in morphic.kv)."""

    snapshot_id = StringProperty("")
    heading = StringProperty("")
    summary = StringProperty("")
    browser = ObjectProperty(None, allownone=True)

    def on_state(self, _inst: Any, state: str) -> None:
        if state == "down" and self.browser is not None:
            self.browser.select(self.snapshot_id)


class SnapshotBrowser(FloatingPanel):
    """The snapshot list, the diff against now, restore and save."""

    snapshots = ListProperty([])
    selected = StringProperty("")
    diff_markup = StringProperty("")
    status = StringProperty("")
    busy = BooleanProperty(False)
    controller = ObjectProperty(None, allownone=True)

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("size", (dp(760), dp(500)))
        kw.setdefault("title", "Time travel: snapshots of the living image")
        kw.setdefault("accent", [0.45, 0.75, 0.55, 1])
        super().__init__(**kw)
        self._group = f"snapshots-{id(self)}"

    def on_snapshots(self, _inst: Any, snaps: list) -> None:
        box = self.ids.snapshot_list
        box.clear_widgets()
        for s in snaps:
            sid = str(s.get("id"))
            item = SnapshotItem(snapshot_id=sid, heading=snapshot_title(s),
                                summary=snapshot_line(s),
                                browser=self, group=self._group, allow_no_selection=False)
            box.add_widget(item)
            if sid == self.selected:
                item.state = "down"
        if not snaps:
            self.diff_markup = "[color=9aa3ad]No snapshots yet. Save one with a name below, " \
                               "or wait for the next autosave.[/color]"

    def select(self, snapshot_id: str) -> None:
        if snapshot_id == self.selected and self.diff_markup:
            return
        self.selected = snapshot_id
        self.diff_markup = "[color=9aa3ad]comparing with now\u2026[/color]"
        if self.controller is not None:
            self.controller.diff_snapshot(self, snapshot_id)

    def show_diff(self, snapshot_id: str, diff: dict[str, Any]) -> None:
        if snapshot_id == self.selected:
            self.diff_markup = V.image_diff_markup(diff)

    def refresh(self) -> None:
        if self.controller is not None:
            self.controller.list_snapshots(self)

    def restore(self) -> None:
        if self.selected and self.controller is not None and not self.busy:
            snap = next((s for s in self.snapshots if str(s.get("id")) == self.selected), {})
            self.controller.confirm_restore(self, self.selected, snapshot_title(snap))

    def save_named(self, name: str) -> None:
        name = (name or "").strip()
        if not name:
            self.status = "type a name for the snapshot first"
            return
        if self.controller is not None and not self.busy:
            self.controller.save_snapshot(self, name)

    def on_close(self) -> None:
        if self.controller is not None:
            self.controller.snapshots_closed(self)
