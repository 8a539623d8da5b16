"""The inspector: a proto's slots and methods, edited in place (right click a morph).

Each row edits one slot with an editor that fits its type (a check box for booleans,
a line for numbers and text, JSON text for lists and dicts, a code field for method
source). Text is parsed back to the slot's type here (see :mod:`a4ps.ui.values`); a
value that doesn't parse never leaves the UI. The controller sends ``proto.update``;
if the daemon refuses, the row shows the daemon's message and its old value. Lists
and dicts can be drilled into; inherited slots are marked with the proto they come
from, and editing one gives this proto its own slot (Self-style override).
"""
from __future__ import annotations

from typing import Any

from kivy.properties import (BooleanProperty, DictProperty, ListProperty, NumericProperty,
                             ObjectProperty, StringProperty)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.checkbox import CheckBox
from kivy.uix.modalview import ModalView
from kivy.uix.textinput import TextInput

from . import values as V


class SlotRow(BoxLayout):
    """One slot (or one nested item, or one method) of the inspected proto."""

    key = StringProperty("")
    label = StringProperty("")
    kind = StringProperty("text")       # values.kind_of(...) or "method"
    inherited_from = StringProperty("")
    error = StringProperty("")
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
            self.editor = CheckBox(active=bool(self.value), size_hint_x=None, width=40)
            self.editor.bind(active=lambda _c, _v: self.commit())
        else:
            multiline = self.kind == "method" or (
                self.kind == "text" and ("\n" in self.value or len(self.value) > 60))
            text = self.value if self.kind == "method" else V.format_value(self.value)
            self.editor = TextInput(text=text, multiline=multiline,
                                    readonly=self.kind == "ref", write_tab=False,
                                    font_name="RobotoMono-Regular" if self.kind == "method"
                                    else "Roboto",
                                    font_size="12sp")
            if not multiline:
                self.editor.bind(on_text_validate=lambda *_: self.commit())
        box.add_widget(self.editor)
        self.height = 150 if getattr(self.editor, "multiline", False) else 34

    @property
    def text(self) -> str:
        if isinstance(self.editor, CheckBox):
            return "true" if self.editor.active else "false"
        return self.editor.text

    def reset(self) -> None:
        """Show the value the daemon holds again (after a refused edit)."""
        if isinstance(self.editor, CheckBox):
            self._build_editor()
        else:
            self.editor.text = self.value if self.kind == "method" else V.format_value(self.value)

    def commit(self) -> None:
        if self.inspector is not None:
            self.inspector.commit_row(self)

    def drill(self) -> None:
        if self.inspector is not None:
            self.inspector.drill(self.path)


class Inspector(ModalView):
    """A proto's slots; ``show_proto`` refreshes it from ``proto.get`` data."""

    proto_name = StringProperty("")
    proto_version = NumericProperty(0)
    parent_name = StringProperty("")
    crumb = StringProperty("")
    error = StringProperty("")
    busy = BooleanProperty(False)
    data = DictProperty({})
    path = ListProperty([])   # [] = the slot list; [slot, key, ...] = inside a value
    controller = ObjectProperty(None, allownone=True)

    def __init__(self, **kw):
        kw.setdefault("auto_dismiss", False)  # a closing click must not be swallowed
        super().__init__(**kw)
        self.rows: dict[str, SlotRow] = {}

    # -- showing -------------------------------------------------------------------
    def show_proto(self, data: dict) -> None:
        same = data.get("name", "") == self.proto_name and bool(self.rows)
        self.data = dict(data)
        self.proto_name = data.get("name", "")
        self.proto_version = int(data.get("version") or 0)
        self.parent_name = data.get("parent") or ""
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
            if not getattr(row.editor, "focus", False):
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
        self.ids.rows.clear_widgets()
        self.rows = {}
        specs = self._row_specs()
        if specs is None:
            self.path = []
            specs = self._row_specs()
        self.crumb = V.path_label(self.proto_name, self.path[0], tuple(self.path[1:])) \
            if self.path else self.proto_name
        for spec in specs:
            self._add_row(*spec)

    def _add_row(self, key: str, label: str, value: Any, path: tuple, owner: str,
                 kind: str | None = None) -> SlotRow:
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
    def commit_row(self, row: SlotRow) -> None:
        """Parse the row's text and send it; a parse error stays local."""
        row.error = ""
        self.error = ""
        slot = row.path[0]
        if row.kind == "method":
            if self.controller is not None:
                self.busy = True
                self.controller.update_proto(self.proto_name, methods={slot: row.text},
                                             on_error=lambda msg: self._refused(row, msg))
            return
        try:
            new = V.parse_value(row.text, row.value)
        except V.EditError as e:
            self._refused(row, str(e))
            return
        top, _ = self._all_slots().get(slot, (None, ""))
        value = V.replace_at(top, tuple(row.path[1:]), new) if len(row.path) > 1 else new
        if self.controller is not None:
            self.busy = True
            self.controller.update_proto(self.proto_name, slots={slot: value},
                                         expected_version=self.proto_version,
                                         on_error=lambda msg: self._refused(row, msg))

    def _refused(self, row: SlotRow, message: str) -> None:
        self.busy = False
        row.error = message
        self.error = f"{row.label}: {message}"
        row.reset()

    def close(self) -> None:
        self.dismiss()
        if self.controller is not None:
            self.controller.inspector_closed(self)
