"""The one reducer: make any value safe for the wire, a checkpoint or the inspector.

Before there were three (``events.json_safe``, ``proto.plain``, ``protocol.plain``)
with different answers for the same value. Now each is this function with options:

* the wire (msgpack, ``protocol.plain``): the defaults;
* JSON (event payloads, checkpoints, ``events.json_safe``): ``keep_bytes=False``, and
  ``unknown=repr`` where a plain string reads better than a tag;
* the inspector (``proto.plain``): ``ref=`` turns a live object (a proto) into a
  reference ``{"$proto": name}`` instead of copying it.

What comes out is only None, bool, int, float, str, (bytes), lists and str-keyed dicts:
ints that msgpack cannot hold and non-finite floats become strings; pydantic models,
dataclasses, enums, paths, datetimes and objects with ``to_dict()`` become their
data; anything else goes through ``unknown`` (``{"$repr": repr(value)}`` by default).
Nesting deeper than ``max_depth`` is cut with a marker, so reducing a pathological
value never fails.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import math
from pathlib import PurePath
from typing import Any, Callable

from pydantic import BaseModel

MAX_DEPTH = 64

Reducer = Callable[[Any], Any]


def tagged_repr(value: Any) -> dict[str, str]:
    """The default for values with no plain form: their repr, tagged as such."""
    return {"$repr": repr(value)}


def plain(value: Any, *, unknown: Reducer = tagged_repr, keep_bytes: bool = True,
          ref: Callable[[Any], Any | None] | None = None,
          max_depth: int = MAX_DEPTH) -> Any:
    """``value`` as plain data (see the module docstring for the options)."""
    def go(v: Any, depth: int) -> Any:
        if depth > max_depth:
            return {"$repr": f"<nested deeper than {max_depth} levels>"}
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v if -2**63 <= v < 2**64 else str(v)
        if isinstance(v, float):
            return v if math.isfinite(v) else str(v)
        if isinstance(v, (bytes, bytearray)):
            return bytes(v) if keep_bytes else unknown(v)
        if isinstance(v, dict):
            return {str(k): go(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple, set, frozenset)):
            return [go(x, depth + 1) for x in v]
        if ref is not None:
            r = ref(v)
            if r is not None:
                return r
        if isinstance(v, BaseModel):
            return go(v.model_dump(mode="python"), depth + 1)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return go(dataclasses.asdict(v), depth + 1)
        if isinstance(v, enum.Enum):
            return go(v.value, depth + 1)
        if isinstance(v, PurePath):
            return str(v)
        if isinstance(v, (_dt.datetime, _dt.date)):
            return v.isoformat()
        to_dict = getattr(v, "to_dict", None)
        if callable(to_dict):
            try:
                return go(to_dict(), depth + 1)
            except Exception:       # a broken to_dict() is just an unknown value
                pass
        return unknown(v)

    return go(value, 0)
