"""Where morphs go on the canvas: top-left anchored, in dp, never off the visible canvas.

A morph the user dragged keeps the spot it was dropped on (``{"left", "top"}`` in dp
from the canvas's top-left corner, saved as the proto's ``morph_pos`` slot); the
others flow in reading order into the free cells of a grid as wide as the canvas, so
ALFRED, BRICK and ROBIN never overlap at the defaults and reflow when the window
changes size. A saved spot that a smaller window would cut off is shown pulled back
inside (the saved value does not change). No Kivy here: plain numbers, tested alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

MARGIN = 12.0   # dp between the canvas edge and the first morph
GAP = 12.0      # dp between morphs


@dataclass
class Box:
    """A morph's wish: its size, and the spot the user chose (None: flow it)."""

    name: str
    width: float
    height: float
    spot: tuple[float, float] | None = None   # (left, top) in dp


def saved_spot(value: Any) -> tuple[float, float] | None:
    """``morph_pos`` as the UI saves it (``{"left": dp, "top": dp}``), else None.

    Older images stored ``[x, y]`` in bottom-left window pixels; that form is ignored
    (the morph flows like a new one) rather than guessed at.
    """
    if not isinstance(value, dict):
        return None
    left, top = value.get("left"), value.get("top")
    if (isinstance(left, (int, float)) and isinstance(top, (int, float))
            and not isinstance(left, bool) and not isinstance(top, bool)):
        return (float(left), float(top))
    return None


def spot_value(left: float, top: float) -> dict[str, float]:
    """What ``morph_pos`` stores for a spot (rounded: no sub-dp noise in the image)."""
    return {"left": round(float(left), 1), "top": round(float(top), 1)}


def clamp(left: float, top: float, width: float, height: float, canvas_w: float,
          canvas_h: float, margin: float = 0.0) -> tuple[float, float]:
    """The nearest spot at which the whole box is inside the canvas (top-left first
    when the canvas is smaller than the box)."""
    left = max(margin, min(left, canvas_w - width - margin))
    top = max(margin, min(top, canvas_h - height - margin))
    return (left, top)


def place(boxes: Iterable[Box], canvas_w: float, canvas_h: float, *,
          margin: float = MARGIN, gap: float = GAP) -> dict[str, tuple[float, float]]:
    """(left, top) in dp for every box: saved spots clamped inside, the rest flowed."""
    boxes = list(boxes)
    out: dict[str, tuple[float, float]] = {}
    taken: list[tuple[float, float, float, float]] = []
    for b in boxes:
        if b.spot is not None:
            left, top = clamp(b.spot[0], b.spot[1], b.width, b.height, canvas_w, canvas_h)
            out[b.name] = (left, top)
            taken.append((left, top, left + b.width, top + b.height))
    flowing = [b for b in boxes if b.spot is None]
    if not flowing:
        return out
    cell_w = max(b.width for b in flowing) + gap
    cols = max(1, int((canvas_w - 2 * margin + gap) // cell_w))
    col, top, row_h = 0, margin, 0.0
    for b in flowing:
        while True:
            if col >= cols:
                col, top, row_h = 0, top + row_h + gap, 0.0
            left = margin + col * cell_w
            rect = (left, top, left + b.width, top + b.height)
            col += 1
            if not any(_overlap(rect, t) for t in taken):
                break
            row_h = max(row_h, b.height)   # a saved morph sits here: skip the cell
        out[b.name] = (left, top)
        taken.append(rect)
        row_h = max(row_h, b.height)
    return out


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])
