"""Plain helpers for the inspector and dialogs: typed slot editing, drilling, diffs.

No Kivy here, so these rules are tested without a window. A slot value edited as text
is parsed back to the type it had (a number stays a number), and a nested value is
changed by rebuilding the top-level slot with the one item replaced.
"""
from __future__ import annotations

import ast
import copy
import difflib
import json
from typing import Any

Path = tuple[Any, ...]  # a path into a nested value: keys (dict) or indexes (list)


class EditError(ValueError):
    """The typed text cannot become a value of the slot's type."""


def kind_of(value: Any) -> str:
    """The editor a value gets: bool, int, float, text, list, dict, none, ref."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        if set(value) in ({"$proto"}, {"$repr"}):
            return "ref"  # a reference the wire could only describe; read-only
        return "dict"
    if value is None:
        return "none"
    return "ref"


def format_value(value: Any) -> str:
    """Text shown in an editor for ``value`` (JSON for containers, readable for refs)."""
    kind = kind_of(value)
    if kind == "text":
        return str(value)
    if kind == "bool":
        return "true" if value else "false"
    if kind in ("int", "float"):
        return repr(value)
    if kind == "none":
        return ""
    if kind == "ref":
        if isinstance(value, dict) and "$proto" in value:
            return f"<proto {value['$proto']}>"
        if isinstance(value, dict) and "$repr" in value:
            return str(value["$repr"])
        return repr(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def short(value: Any, limit: int = 60) -> str:
    """A one-line preview of a value for lists and morph labels."""
    text = format_value(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def parse_value(text: str, like: Any) -> Any:
    """Parse editor ``text`` into the type of ``like``; raises EditError saying what to type."""
    kind = kind_of(like)
    stripped = text.strip()
    if kind == "text":
        return text
    if kind == "bool":
        low = stripped.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise EditError(f"{text!r} is not a boolean: type true or false")
    if kind == "int":
        try:
            return int(stripped)
        except ValueError:
            raise EditError(f"{text!r} is not a whole number: type digits like 3") from None
    if kind == "float":
        try:
            number = float(stripped)
        except ValueError:
            raise EditError(f"{text!r} is not a number: type a number like 0.7") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise EditError(f"{text!r} is not a finite number")
        return number
    if kind in ("list", "dict"):
        value = _literal(stripped)
        want = list if kind == "list" else dict
        if isinstance(value, tuple) and want is list:
            value = list(value)
        if not isinstance(value, want):
            example = "[1, 2]" if want is list else '{"k": 1}'
            raise EditError(f"expected a {want.__name__} written as JSON, e.g. {example}")
        return value
    if kind == "none":
        if not stripped:
            return None
        try:
            return _literal(stripped)
        except EditError:
            return text  # an empty slot takes free text
    raise EditError("this value is a reference to a live object and cannot be edited as text")


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise EditError(f"cannot read {text[:40]!r}: write JSON like [1, 2] or "
                        '{"key": "value"}') from None


def value_at(value: Any, path: Path) -> Any:
    for key in path:
        value = value[key]
    return value


def replace_at(value: Any, path: Path, new: Any) -> Any:
    """A deep copy of ``value`` with the item at ``path`` replaced by ``new``."""
    if not path:
        return new
    root = copy.deepcopy(value)
    parent = value_at(root, path[:-1])
    parent[path[-1]] = new
    return root


def children(value: Any) -> list[tuple[Any, Any]]:
    """(key, item) pairs of a list or dict; empty for leaves."""
    if kind_of(value) == "dict":
        return list(value.items())
    if kind_of(value) == "list":
        return list(enumerate(value))
    return []


def path_label(name: str, slot: str, path: Path) -> str:
    return name + "." + slot + "".join(f"[{k!r}]" for k in path)


def diff_markup(current: str, proposed: str) -> str:
    """A line diff of two texts as Kivy markup: removed lines red, added lines green."""
    out = []
    for line in difflib.ndiff((current or "").splitlines(), (proposed or "").splitlines()):
        tag, body = line[:2], _escape(line[2:])
        if tag == "- ":
            out.append(f"[color=ff7a7a]- {body}[/color]")
        elif tag == "+ ":
            out.append(f"[color=7aff8a]+ {body}[/color]")
        elif tag == "  ":
            out.append(f"  {body}")
    return "\n".join(out)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("[", "&bl;").replace("]", "&br;")


def changes_line(changes: Any) -> str:
    """A snapshot's ``changes`` dict as one line ("3 protos changed, codex v4")."""
    if not isinstance(changes, dict) or not changes:
        return ""
    parts = []
    for key, value in changes.items():
        if isinstance(value, (list, tuple, set)):
            if value:
                parts.append(f"{key}: {', '.join(str(v) for v in list(value)[:4])}"
                             + ("\u2026" if len(value) > 4 else ""))
        elif isinstance(value, dict):
            if value:
                parts.append(f"{key}: {', '.join(str(k) for k in list(value)[:4])}")
        elif value not in (None, "", 0, False):
            parts.append(f"{key} {value}")
    return "; ".join(parts)


def image_diff_markup(diff: Any) -> str:
    """``image.diff``'s result as Kivy markup: what the snapshot had (red) and what the
    live image has now (green), per proto slot and method, then codex and tools."""
    if not isinstance(diff, dict):
        return "[color=9aa3ad]no differences reported[/color]"
    out: list[str] = []
    protos = _as_dict(diff.get("protos"))
    added, removed = protos.get("added") or [], protos.get("removed") or []
    changed = _as_dict(protos.get("changed"))
    if added:
        out.append("[b]protos only in the live image:[/b] " + _escape(", ".join(map(str, added))))
    if removed:
        out.append("[b]protos only in the snapshot:[/b] " + _escape(", ".join(map(str, removed))))
    for name in sorted(changed):
        c = _as_dict(changed[name])
        out.append(f"[b]{_escape(str(name))}[/b]")
        parent = c.get("parent") if isinstance(c.get("parent"), dict) else None
        if parent:
            out.append(f"  parent: [color=ff7a7a]{_escape(str(parent.get('before')))}[/color]"
                       f" \u2192 [color=7aff8a]{_escape(str(parent.get('after')))}[/color]")
        for kind in ("slots", "methods"):
            items = _as_dict(c.get(kind))
            for key in sorted(items):
                d = _as_dict(items[key])
                label = f"{key}()" if kind == "methods" else key
                out.append(f"  {_escape(label)}:")
                before, after = d.get("before"), d.get("after")
                if kind == "methods" and isinstance(before, str) and isinstance(after, str):
                    out.append("    " + diff_markup(before, after).replace("\n", "\n    "))
                else:
                    out.append(f"    [color=ff7a7a]snapshot: {_escape(_shown(before))}[/color]")
                    out.append(f"    [color=7aff8a]now:      {_escape(_shown(after))}[/color]")
    codex = diff.get("codex") if isinstance(diff.get("codex"), dict) else {}
    if codex and (codex.get("changed") or codex.get("before_version") != codex.get("after_version")):
        out.append(f"[b]codex[/b] v{codex.get('before_version')} in the snapshot, "
                   f"v{codex.get('after_version')} now")
        for item in codex.get("changed") or []:
            if isinstance(item, dict):
                out.append(f"  {_escape(str(item.get('persona')))}."
                           f"{_escape(str(item.get('principle')))}:")
                out.append(f"    [color=ff7a7a]snapshot: {_escape(_shown(item.get('before')))}"
                           "[/color]")
                out.append(f"    [color=7aff8a]now:      {_escape(_shown(item.get('after')))}"
                           "[/color]")
            else:
                out.append("  " + _escape(short(item, 160)))
    tools = _as_dict(diff.get("tools"))
    for key, what in (("added", "tools forged since"), ("removed", "tools since removed")):
        if tools.get(key):
            out.append(f"[b]{what}:[/b] " + _escape(", ".join(map(str, tools[key]))))
    return "\n".join(out) if out else "[color=9aa3ad]identical to the live image[/color]"


def _shown(value: Any) -> str:
    """A slot value in a diff; a slot that does not exist (None) says so."""
    return "(not set here)" if value is None else short(value, 120)


def _as_dict(value: Any) -> dict[str, Any]:
    """``value`` when it is a map, else an empty one (a diff from an older daemon)."""
    return value if isinstance(value, dict) else {}
