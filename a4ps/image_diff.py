"""What changed between two image states: protos (slots, methods, parent), codex, tools.

An image state is the ``parts`` dict the ImageStore saves: ``{"protos": {name: {"slots",
"methods", "version", "parent"}}, "codex": {...}}``. Two uses:

* :func:`describe_changes` — the one-line summary and compact change list written as
  metadata with every save (names only, so it stays small);
* :func:`diff_parts` — the full ``image.diff`` answer with before/after values, in the
  wire shape of docs/protocol.md.

Pure functions on plain data: no locks, no files.
"""
from __future__ import annotations

import re
from typing import Any

from .proto import plain

_TOOL = re.compile(r"^tool\.([A-Za-z_][A-Za-z0-9_]*)$")
LIST_CAP = 50          # names kept per list in snapshot metadata


def _same(a: Any, b: Any) -> bool:
    """Equality that never raises (numpy arrays, odd objects in slots)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return repr(a) == repr(b)


def _protos(parts: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    protos = (parts or {}).get("protos")
    return protos if isinstance(protos, dict) else {}


def _codex(parts: dict[str, Any] | None) -> dict[str, Any]:
    codex = (parts or {}).get("codex")
    return codex if isinstance(codex, dict) else {}


def proto_keys_changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[str]]:
    """For one proto's states: the slot, method and parent names that differ."""
    out: dict[str, list[str]] = {"slots": [], "methods": [], "parent": []}
    if before is after:
        return out
    for kind in ("slots", "methods"):
        b, a = before.get(kind) or {}, after.get(kind) or {}
        if b is a or _same(b, a):       # one C-level comparison for the common case
            continue
        out[kind] = sorted(k for k in set(b) | set(a)
                           if k not in b or k not in a or not _same(b[k], a[k]))
    if before.get("parent") != after.get("parent"):
        out["parent"] = ["parent"]
    return out


def proto_delta(before: dict[str, Any], after: dict[str, Any]
                ) -> tuple[list[str], list[str], dict[str, dict[str, list[str]]]]:
    """(added, removed, {name: changed keys}) between two ``protos`` parts."""
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed: dict[str, dict[str, list[str]]] = {}
    for name, st in after.items():
        old = before.get(name)
        if old is None or old is st:     # unchanged states are the same object in a live image
            continue
        keys = proto_keys_changed(old, st)
        if any(keys.values()):
            changed[name] = keys
    return added, removed, dict(sorted(changed.items()))


def _tools(protos: dict[str, Any]) -> set[str]:
    return {m.group(1) for name in protos if (m := _TOOL.match(name))}


def _principles(codex: dict[str, Any]) -> dict[tuple[str, str], str]:
    out = {}
    for persona, pc in (codex.get("personas") or {}).items():
        for pid, text in ((pc or {}).get("principles") or {}).items():
            out[(persona, pid)] = text
    return out


def _codex_delta(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    b, a = _principles(before), _principles(after)
    return [{"persona": p, "principle": pid, "before": b.get((p, pid)), "after": a.get((p, pid))}
            for p, pid in sorted(set(b) | set(a)) if b.get((p, pid)) != a.get((p, pid))]


def diff_parts(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """The ``image.diff`` answer: what going from ``before`` to ``after`` changes."""
    bp, ap = _protos(before), _protos(after)
    added, removed, changed = proto_delta(bp, ap)
    detail: dict[str, Any] = {}
    for name, keys in changed.items():
        old, new = bp[name], ap[name]
        entry: dict[str, Any] = {
            "slots": {k: {"before": plain((old.get("slots") or {}).get(k)),
                          "after": plain((new.get("slots") or {}).get(k))} for k in keys["slots"]},
            "methods": {k: {"before": (old.get("methods") or {}).get(k),
                            "after": (new.get("methods") or {}).get(k)} for k in keys["methods"]},
        }
        if keys["parent"]:
            entry["parent"] = {"before": old.get("parent"), "after": new.get("parent")}
        detail[name] = entry
    bc, ac = _codex(before), _codex(after)
    bt, at = _tools(bp), _tools(ap)
    return {
        "protos": {"added": added, "removed": removed, "changed": detail},
        "codex": {"before_version": bc.get("version"), "after_version": ac.get("version"),
                  "changed": _codex_delta(bc, ac)},
        "tools": {"added": sorted(at - bt), "removed": sorted(bt - at)},
    }


def _capped(names: list[str]) -> list[str]:
    return names[:LIST_CAP]


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def describe_changes(before: dict[str, Any] | None, after: dict[str, Any]
                     ) -> tuple[str, dict[str, Any]]:
    """(one-line summary, compact changes) of a save: names and keys, never values."""
    bp, ap = _protos(before), _protos(after)
    bc, ac = _codex(before), _codex(after)
    if before is None:
        tools = sorted(_tools(ap))
        summary = f"first image: {len(ap)} protos" + (
            f", codex v{ac['version']}" if "version" in ac else "") + (
            f", {len(tools)} tools" if tools else "")
        return summary, {"protos": {"added": _capped(sorted(ap)), "removed": [], "changed": {},
                                    "counts": {"added": len(ap), "removed": 0, "changed": 0}},
                         "codex": {"before_version": None, "after_version": ac.get("version"),
                                   "changed": []},
                         "tools": {"added": _capped(tools), "removed": []}}
    added, removed, changed = proto_delta(bp, ap)
    codex_changed = [f"{c['persona']}.{c['principle']}" for c in _codex_delta(bc, ac)]
    bt, at = _tools(bp), _tools(ap)
    t_add, t_rem = sorted(at - bt), sorted(bt - at)
    flat = {name: sorted(set(k["slots"]) | set(k["methods"]) | set(k["parent"]))
            for name, k in changed.items()}
    changes = {
        "protos": {"added": _capped(added), "removed": _capped(removed),
                   "changed": dict(list(flat.items())[:LIST_CAP]),
                   "counts": {"added": len(added), "removed": len(removed),
                              "changed": len(changed)}},
        "codex": {"before_version": bc.get("version"), "after_version": ac.get("version"),
                  "changed": _capped(codex_changed)},
        "tools": {"added": _capped(t_add), "removed": _capped(t_rem)},
    }
    bits = []
    if added:
        bits.append(f"+{len(added)} proto{'s' * (len(added) != 1)} ({_few(added)})")
    if removed:
        bits.append(f"-{len(removed)} proto{'s' * (len(removed) != 1)} ({_few(removed)})")
    if flat:
        shown = [f"{n}.{'/'.join(keys[:3])}{'/…' if len(keys) > 3 else ''}"
                 for n, keys in list(flat.items())[:3]]
        more = f" and {len(flat) - 3} more" if len(flat) > 3 else ""
        bits.append("edited " + ", ".join(shown) + more)
    if bc.get("version") != ac.get("version") or codex_changed:
        bits.append(f"codex v{bc.get('version')} -> v{ac.get('version')}"
                    + (f" ({_few(codex_changed)})" if codex_changed else ""))
    if t_add or t_rem:
        bits.append("tools " + " ".join([f"+{t}" for t in t_add[:3]] + [f"-{t}" for t in t_rem[:3]]))
    return ("; ".join(bits) or "no changes"), changes
