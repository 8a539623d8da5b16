"""What to repaint on the morph canvas: damaged tiles, and only what shows in them.

Morphic repaints damaged rectangles, not the world; this does the same for a software
rasteriser, where the cost is pixels drawn. The canvas is cut into square tiles; a
morph that changes (its picture, its place, its z-order) damages the tiles under its
old and new rectangles. :meth:`Scene.plan` says what to draw for the damaged tiles:
for each tile, from the topmost morph whose opaque body covers the whole tile upward
(what is below it cannot show), each clipped to the tile; a tile no body covers first
gets the background. So a crowd of 200 overlapping morphs costs about what its
visible surface covers, and one morph changing costs about its own area.

Rectangles are ``(x0, y0, x1, y1)`` in canvas pixels, y up. No Kivy here.
"""
from __future__ import annotations

from typing import Any, Hashable, Iterable

Rect = tuple[float, float, float, float]
BACKGROUND = None        # the key of a background draw in a plan


def intersect(a: Rect, b: Rect) -> Rect | None:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def contains(outer: Rect, inner: Rect) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and \
        inner[2] <= outer[2] and inner[3] <= outer[3]


class Scene:
    """Morph rectangles in z-order, spatially hashed by tile, and the damage."""

    def __init__(self, tile: int = 48) -> None:
        self.tile = tile
        self.width = self.height = 0
        self.order: list[Hashable] = []            # bottom first
        self._z: dict[Hashable, int] = {}
        self.picture: dict[Hashable, Rect] = {}    # what a key draws over
        self.body: dict[Hashable, Rect] = {}       # where it is opaque
        self._tiles_of: dict[Hashable, set[tuple[int, int]]] = {}
        self._members: dict[tuple[int, int], set[Hashable]] = {}
        self.dirty: set[tuple[int, int]] = set()
        self.geometry = 0      # counts changes of what covers what (see shows)
        self._exposed: dict[tuple[Hashable, Rect], bool] = {}
        self._exposed_at = -1

    # -- changes -------------------------------------------------------------------------
    def resize(self, width: int, height: int) -> None:
        self.width, self.height = int(width), int(height)
        self.geometry += 1
        self.damage_all()

    def damage_all(self) -> None:
        t = self.tile
        self.dirty = {(i, j) for i in range(-(-self.width // t)) for j in range(-(-self.height // t))}

    def damage(self, rect: Rect) -> None:
        self.dirty |= self._tiles_in(rect)

    def put(self, key: Hashable, picture: Rect, body: Rect,
            changed: Rect | None = None) -> None:
        """Add ``key`` on top, or move/redraw it where it is in the z-order
        (``changed``: a new picture in the same place differs only inside it, so
        only the tiles under it are damaged)."""
        if self.picture.get(key) == picture and self.body.get(key) == body:
            tiles = self._tiles_of[key]              # a new picture in the same place
            self.dirty |= tiles if changed is None else tiles & self._tiles_in(changed)
            return
        self.geometry += 1
        if key in self.picture:
            self.damage(self.picture[key])
            for tile in self._tiles_of.pop(key, ()):
                self._members.get(tile, set()).discard(key)
        else:
            self.order.append(key)
            self._z[key] = len(self.order) - 1
        self.picture[key], self.body[key] = picture, body
        tiles = self._tiles_in(picture)
        self._tiles_of[key] = tiles
        for tile in tiles:
            self._members.setdefault(tile, set()).add(key)
        self.dirty |= tiles

    def remove(self, key: Hashable) -> None:
        if key not in self.picture:
            return
        self.damage(self.picture.pop(key))
        self.body.pop(key, None)
        for tile in self._tiles_of.pop(key, ()):
            self._members.get(tile, set()).discard(key)
        self.order.remove(key)
        self._reindex()
        self.geometry += 1

    def raise_(self, key: Hashable) -> None:
        if key in self._z and self.order[-1] != key:
            self.order.remove(key)
            self.order.append(key)
            self._reindex()
            self.geometry += 1
            self.damage(self.picture[key])

    def _reindex(self) -> None:
        self._z = {k: i for i, k in enumerate(self.order)}

    def _tiles_in(self, rect: Rect) -> set[tuple[int, int]]:
        t = self.tile
        x0, y0 = max(0, int(rect[0] // t)), max(0, int(rect[1] // t))
        x1 = min(-(-self.width // t), int(-(-rect[2] // t)))
        y1 = min(-(-self.height // t), int(-(-rect[3] // t)))
        return {(i, j) for i in range(x0, x1) for j in range(y0, y1)}

    def shows(self, key: Hashable, rect: Rect) -> bool:
        """Whether any part of ``rect`` (inside ``key``'s picture) may be on screen:
        in some tile, that part is not under one body above ``key`` (conservative:
        a part covered only by several bodies together counts as showing). Answers
        are kept until the geometry changes: a morph asks about the same rects."""
        if self._exposed_at != self.geometry:
            self._exposed, self._exposed_at = {}, self.geometry
        answer = self._exposed.get((key, rect))
        if answer is None:
            answer = self._exposed[(key, rect)] = self._shows(key, rect)
        return answer

    def _shows(self, key: Hashable, rect: Rect) -> bool:
        z = self._z.get(key)
        if z is None:
            return False
        t = self.tile
        for (i, j) in self._tiles_in(rect):
            part = intersect(rect, (i * t, j * t, (i + 1) * t, (j + 1) * t))
            if part is not None and not any(
                    self._z[k] > z and contains(self.body[k], part)
                    for k in self._members.get((i, j), ())):
                return True
        return False

    # -- what to draw ------------------------------------------------------------------
    def take(self) -> set[tuple[int, int]]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def plan(self, tiles: Iterable[tuple[int, int]]) -> list[tuple[Any, Rect]]:
        """Draws, in order, for ``tiles``: ``(BACKGROUND, rect)`` or ``(key, rect)``,
        each rect inside one tile. The order is the backgrounds, then each key's
        draws together, bottom key first: the same back-to-front result tile by tile
        (draws in different tiles never overlap), with one texture switch per key."""
        t = self.tile
        out: list[tuple[Any, Rect]] = []
        z = self._z
        for (i, j) in sorted(tiles, key=lambda ij: (ij[1], ij[0])):
            rect = intersect((i * t, j * t, (i + 1) * t, (j + 1) * t),
                             (0, 0, self.width, self.height))
            if rect is None:
                continue
            stack = sorted(self._members.get((i, j), ()), key=z.__getitem__)
            start = 0
            for k in range(len(stack) - 1, -1, -1):
                if contains(self.body[stack[k]], rect):
                    start = k
                    break
            else:
                out.append((BACKGROUND, rect))
            for key in stack[start:]:
                part = intersect(self.picture[key], rect)
                if part is not None:
                    out.append((key, part))
        out.sort(key=lambda d: -1 if d[0] is BACKGROUND else z[d[0]])
        return out
