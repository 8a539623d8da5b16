"""The one value reducer (a4ps.values.plain) and its three faces."""
from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path

import msgpack
from pydantic import BaseModel

from a4ps.events import json_safe
from a4ps.proto import Proto, ProtoManager
from a4ps.proto import plain as inspector_plain
from a4ps.protocol import plain as wire_plain
from a4ps.values import plain


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: float


class Spec(BaseModel):
    name: str
    tags: set[str]


class Odd:
    def __repr__(self) -> str:
        return "<odd>"


MIXED = {"i": 2**70, "nan": float("nan"), "b": b"\x00", "s": {1}, "t": (1, 2),
         "p": Point(1, 2.5), "e": Colour.RED, "m": Spec(name="n", tags={"a"}),
         "path": Path("/x/y"), "o": Odd(), 3: "int key"}


def test_the_three_faces_agree_on_everything_but_their_options() -> None:
    wire = wire_plain(MIXED)
    assert wire == {"i": str(2**70), "nan": "nan", "b": b"\x00", "s": [1], "t": [1, 2],
                    "p": {"x": 1, "y": 2.5}, "e": "red", "m": {"name": "n", "tags": ["a"]},
                    "path": "/x/y", "o": {"$repr": "<odd>"}, "3": "int key"}
    assert wire_plain is plain
    msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)   # wire-safe
    js = json_safe(MIXED)
    json.loads(json.dumps(js, allow_nan=False))      # strict JSON can carry it
    assert js["b"] == repr(b"\x00") and js["o"] == "<odd>"
    assert {k: v for k, v in js.items() if k not in ("b", "o")} == \
        {k: v for k, v in wire.items() if k not in ("b", "o")}


def test_the_inspector_keeps_protos_as_references() -> None:
    protos = ProtoManager()
    base = protos.create("thing", slots={"n": 1})
    value = {"friend": base, "list": [base, 1]}
    assert isinstance(base, Proto)
    assert inspector_plain(value) == {"friend": {"$proto": "thing"},
                                      "list": [{"$proto": "thing"}, 1]}
    assert wire_plain(1.5) == inspector_plain(1.5)


def test_deep_nesting_is_cut_not_failed() -> None:
    deep: list = []
    cur = deep
    for _ in range(200):
        cur.append([])
        cur = cur[0]
    out = plain(deep, max_depth=10)
    for _ in range(11):
        out = out[0]
    assert out == {"$repr": "<nested deeper than 10 levels>"}
    json_safe(deep)   # never raises RecursionError
