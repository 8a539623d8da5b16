"""Inspectors: a proto's slots and methods, edited in place, in floating windows.

Right click a morph (or "inspect" on its halo) and its inspector opens on the desk:
non-modal, movable, several at once, each refreshed as its proto changes (an edit
being typed is left alone). Each row edits one slot with an editor that fits its type
(a check box for booleans, a line for numbers and text, JSON text for lists and
dicts); methods get a :class:`~a4ps.ui.codeeditor.CodeEditor`. Text is parsed back to
the slot's type here (see :mod:`a4ps.ui.values`); a value that doesn't parse never
leaves the UI. If the daemon refuses an edit the row shows why; a refused method keeps
the code you wrote, with the line the error names marked. Lists and dicts can be
drilled into; inherited slots are marked with the proto they come from, and editing
one gives this proto its own slot (Self-style override).
"""
from __future__ import annotations

from typing import Any

from kivy.metrics import dp
from kivy.properties import (BooleanProperty, DictProperty, ListProperty, NumericProperty,
                             ObjectProperty, StringProperty)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.checkbox import CheckBox
from kivy.uix.textinput import TextInput

from . import values as V
from .codeeditor import CodeEditor, error_line
from .panels import FloatingPanel

ROW_H = 34
METHOD_EDITOR_H = 170


class SlotRow(BoxLayout):
    """One slot (or one nested item) of the inspected proto."""

    key = StringProperty("")
    label = StringProperty("")
    kind = StringProperty("text")       # values.kind_of(...)
    inherited_from = StringProperty("")
    error = StringProperty("")
    edit_seq = 0          # which edit of this row the daemon's reply answers
    drillable = BooleanProperty(False)
    inspector = ObjectProperty(None, allownone=True)
    editor = ObjectProperty(None, allownone=True)

    def __init__(self, value: Any = None, path: tuple = (), **kw):
        super().__init__(**kw)
        self.value = value
        self.path = path  # full path from the slot name: (slot, key, key...)
        self._build_editor()

    def _build_editor(self) -> None:
        box = self.ids.editor_box
        box.clear_widgets()
        if self.kind == "bool":
            self.editor = CheckBox(active=bool(self.value), size_hint_x=None, width=dp(40))
            self.editor.bind(active=lambda _c, _v: self.commit())
        else:
            multiline = self.kind == "text" and ("\n" in self.value or len(self.value) > 60)
            self.editor = TextInput(text=V.format_value(self.value), multiline=multiline,
                                    readonly=self.kind == "ref", write_tab=False,
                                    font_size="12sp")
            if not multiline:
                self.editor.bind(on_text_validate=lambda *_: self.commit())
        box.add_widget(self.editor)
        self.height = dp(96) if getattr(self.editor, "multiline", False) else dp(ROW_H)

    @property
    def text(self) -> str:
        if isinstance(self.editor, CheckBox):
            return "true" if self.editor.active else "false"
        return self.editor.text

    def reset(self) -> None:
        """Show the value the daemon holds again."""
        if isinstance(self.editor, CheckBox):
            self._build_editor()
        else:
            self.editor.text = V.format_value(self.value)

    def refused(self, message: str) -> None:
        """A refused value goes back to what the daemon holds (the message quotes
        what was typed)."""
        self.error = message
        self.reset()

    def commit(self) -> None:
        if self.inspector is not None:
            self.inspector.commit_row(self)

    def drill(self) -> None:
        if self.inspector is not None:
            self.inspector.drill(self.path)


class MethodRow(BoxLayout):
    """One method: its source in a code editor, Set and Revert."""

    key = StringProperty("")
    label = StringProperty("")
    kind = StringProperty("method")
    inherited_from = StringProperty("")
    error = StringProperty("")
    edit_seq = 0          # which edit of this row the daemon's reply answers
    drillable = BooleanProperty(False)
    dirty = BooleanProperty(False)       # the editor holds text the daemon doesn't have
    inspector = ObjectProperty(None, allownone=True)
    editor = ObjectProperty(None, allownone=True)

    def __init__(self, value: str = "", path: tuple = (), **kw):
        super().__init__(**kw)
        self.value = value
        self.path = path
        self.editor = CodeEditor(text=value)
        self.ids.editor_box.add_widget(self.editor)
        self.editor.bind(text=self._typed)
        self.height = dp(METHOD_EDITOR_H + 48)

    @property
    def text(self) -> str:
        return self.editor.text

    def _typed(self, _inst: Any, text: str) -> None:
        self.dirty = text != self.value

    def reset(self) -> None:
        self.editor.text = self.value
        self.editor.mark_error(None)
        self.error = ""
        self.dirty = False

    def refused(self, message: str) -> None:
        """Keep the user's code; say why and mark the line the error names."""
        self.error = message
        self.editor.mark_error(error_line(message))
        self.dirty = self.editor.text != self.value

    def commit(self) -> None:
        if self.inspector is not None:
            self.inspector.commit_row(self)

    def drill(self) -> None:
        pass


class Inspector(FloatingPanel):
    """A proto's slots in a floating window; ``show_proto`` refreshes it."""

    proto_name = StringProperty("")
    proto_version = NumericProperty(0)
    parent_name = StringProperty("")
    activity = StringProperty("")        # what the persona is doing (one source: activity)
    crumb = StringProperty("")
    error = StringProperty("")
    busy = BooleanProperty(False)
    data = DictProperty({})
    path = ListProperty([])   # [] = the slot list; [slot, key, ...] = inside a value
    controller = ObjectProperty(None, allownone=True)

    def __init__(self, **kw):
        kw.setdefault("size", (dp(500), dp(480)))
        super().__init__(**kw)
        self.rows: dict[str, SlotRow | MethodRow] = {}
        self.bind(proto_name=self._title, proto_version=self._title, parent_name=self._title)
        self._title()

    def _title(self, *_: Any) -> None:
        self.title = f"{self.proto_name}  v{self.proto_version}" + (
            f"  (parent: {self.parent_name})" if self.parent_name else "")

    # -- showing -------------------------------------------------------------------
    def show_proto(self, data: dict) -> None:
        same = data.get("name", "") == self.proto_name and bool(self.rows)
        self.data = dict(data)
        self.proto_name = data.get("name", "")
        self.proto_version = int(data.get("version") or 0)
        self.parent_name = data.get("parent") or ""
        self.busy = False
        if self.path and self.path[0] not in self._all_slots():
            self.path = []
        if not (same and self._refresh_in_place()):
            self.rebuild()

    def _refresh_in_place(self) -> bool:
        """Update changed values without rebuilding, so an edit being typed survives
        another slot changing (a persona's last_utterance changes every turn)."""
        fresh = self._row_values()
        if set(fresh) != set(self.rows):
            return False
        for key, (value, _owner) in fresh.items():
            row = self.rows[key]
            if row.kind != "method" and (V.kind_of(value) != row.kind
                                         or row.drillable != bool(value)
                                         and row.kind in ("list", "dict")):
                return False   # a different editor is needed
        for key, (value, owner) in fresh.items():
            row = self.rows[key]
            if row.value == value and row.inherited_from == owner:
                continue
            row.value, row.inherited_from = value, owner
            if row.kind == "method":
                if not row.dirty and not row.editor.focus:
                    row.reset()
            elif not getattr(row.editor, "focus", False):
                row.reset()
        return True

    def _row_values(self) -> dict[str, tuple[Any, str]]:
        """What rebuild() would show: row key -> (value, inherited from)."""
        specs = self._row_specs()
        return {} if specs is None else {spec[0]: (spec[2], spec[4]) for spec in specs}

    def _row_specs(self) -> list[tuple] | None:
        """The rows at ``self.path``, in display order, as ``_add_row`` arguments
        (key, label, value, path, owner, kind); None when the path no longer exists."""
        slots = self._all_slots()
        if not self.path:
            rows: list[tuple] = [(key, key, slots[key][0], (key,), slots[key][1], None)
                                 for key in sorted(slots)]
            methods = self.data.get("methods") or {}
            inherited_m = self.data.get("inherited_methods") or {}
            rows += [(f"{key}()", f"{key}()", methods[key], (key,), "", "method")
                     for key in sorted(methods)]
            # editing an inherited method defines it on this proto (Self-style override)
            rows += [(f"{key}()", f"{key}()", inherited_m[key].get("source", ""), (key,),
                      str(inherited_m[key].get("from") or "parent"), "method")
                     for key in sorted(k for k in inherited_m if k not in methods)]
            return rows
        top, owner = slots.get(self.path[0], (None, ""))
        try:
            value = V.value_at(top, tuple(self.path[1:]))
        except (KeyError, IndexError, TypeError):
            return None
        return [(repr(k), f"[{k!r}]", item, tuple(self.path) + (k,), owner, None)
                for k, item in V.children(value)]

    def _all_slots(self) -> dict[str, tuple[Any, str]]:
        out: dict[str, tuple[Any, str]] = {}
        for k, v in (self.data.get("inherited") or {}).items():
            if isinstance(v, dict):
                out[k] = (v.get("value"), str(v.get("from") or "parent"))
        for k, v in (self.data.get("slots") or {}).items():
            out[k] = (v, "")
        return out

    def rebuild(self) -> None:
        # code being written survives a rebuild (another slot appeared, say)
        unsaved = {k: (r.text, r.error) for k, r in self.rows.items()
                   if isinstance(r, MethodRow) and r.dirty}
        self.ids.rows.clear_widgets()
        self.rows = {}
        specs = self._row_specs()
        if specs is None:
            self.path = []
            specs = self._row_specs()
        self.crumb = V.path_label(self.proto_name, self.path[0], tuple(self.path[1:])) \
            if self.path else self.proto_name
        for spec in specs:
            row = self._add_row(*spec)
            if spec[0] in unsaved and isinstance(row, MethodRow):
                row.editor.text, error = unsaved[spec[0]]
                if error:
                    row.refused(error)

    def _add_row(self, key: str, label: str, value: Any, path: tuple, owner: str,
                 kind: str | None = None) -> SlotRow | MethodRow:
        if kind == "method":
            row: SlotRow | MethodRow = MethodRow(value=value, path=path, key=key, label=label,
                                                 inherited_from=owner, inspector=self)
        else:
            kind = kind or V.kind_of(value)
            row = SlotRow(value=value, path=path, key=key, label=label, kind=kind,
                          inherited_from=owner, inspector=self,
                          drillable=kind in ("list", "dict") and bool(value))
        self.ids.rows.add_widget(row)
        self.rows[key] = row
        return row

    # -- navigation ----------------------------------------------------------------
    def drill(self, path: tuple) -> None:
        self.path = list(path)
        self.rebuild()

    def back(self) -> None:
        if self.path:
            self.path = self.path[:-1] if len(self.path) > 1 else []
            self.rebuild()

    # -- editing -------------------------------------------------------------------
    def commit_row(self, row: SlotRow | MethodRow) -> None:
        """Parse the row's text and send it; a parse error stays local. Replies carry
        the edit they answer: a late "ok" for an earlier edit must not clear the
        error of a later one."""
        self.error = ""
        row.edit_seq += 1
        seq = row.edit_seq
        slot = row.path[0]
        if row.kind == "method":
            row.error = ""
            row.editor.mark_error(None)
            if self.controller is not None:
                self.busy = True
                self.controller.update_proto(
                    self.proto_name, methods={slot: row.text},
                    on_error=lambda msg: self._refused(row, msg, seq),
                    on_ok=lambda: self._accepted(row, seq))
            return
        try:
            new = V.parse_value(row.text, row.value)
        except V.EditError as e:
            self._refused(row, str(e), seq)
            return
        top, _ = self._all_slots().get(slot, (None, ""))
        value = V.replace_at(top, tuple(row.path[1:]), new) if len(row.path) > 1 else new
        if self.controller is not None:
            self.busy = True
            self.controller.update_proto(self.proto_name, slots={slot: value},
                                         expected_version=self.proto_version,
                                         on_error=lambda msg: self._refused(row, msg, seq),
                                         on_ok=lambda: self._accepted(row, seq))

    def _accepted(self, row: SlotRow | MethodRow, seq: int) -> None:
        self.busy = False
        if seq != row.edit_seq:          # answers an edit the user has since replaced
            return
        row.error = ""
        if row.kind == "method":
            row.dirty = False
        if self.error.startswith(row.label + ":"):
            self.error = ""

    def _refused(self, row: SlotRow | MethodRow, message: str, seq: int) -> None:
        self.busy = False
        if seq != row.edit_seq:          # answers an edit the user has since replaced
            return
        self.error = f"{row.label}: {message}"
        row.refused(message)
        if row.parent is not None:
            self.ids.rows_scroll.scroll_to(row, padding=dp(8), animate=False)

    def close(self) -> None:
        super().close()
        if self.controller is not None:
            self.controller.inspector_closed(self)
