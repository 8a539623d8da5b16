"""Morph pictures composed on the CPU, one small texture each.

With a software rasteriser, a morph drawn as widgets (a body, a border, a label
texture) costs several state and texture switches; 200 of them took tens of
milliseconds a frame. So each morph's whole picture (shadow, body, border, text) is
composed here with numpy and uploaded as one small texture (:func:`upload`), and the
canvas paints each morph as one textured quad per damaged tile (see damage.py).

:func:`text_image` lays out and renders Kivy markup to RGBA pixels with Kivy's own
text renderer (the same fonts and markup as a Label), without creating a texture.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

SHADOW = 4          # px of shadow right and below the body
PAD = (8, 6)        # px of text padding inside the body (x, y)


class _Capture:
    """Stands in for the texture a core label would blit its pixels into."""

    data: Any = None

    def blit_data(self, data: Any) -> None:
        self.data = data


def text_image(text: str, width: int, font_size: float, *, markup: bool = True,
               color: tuple[float, ...] = (1, 1, 1, 1)) -> tuple[Any, int, int]:
    """(numpy RGBA array top row first, width, height) of ``text`` (Kivy markup, or
    plain text in ``color``, which renders about three times faster) wrapped at
    ``width`` px; height 0 when there is nothing to draw."""
    import numpy as np
    if markup:
        from kivy.core.text.markup import MarkupLabel as Core
    else:
        from kivy.core.text import Label as Core
    core = Core(text=text, text_size=(width, None), font_size=font_size, halign="left",
                valign="top", markup=markup, color=color)
    core.resolve_font_name()
    size = core.render()               # layout pass: the lines and the height
    if size[0] <= 1 or size[1] <= 1:
        return np.zeros((0, width, 4), np.uint8), width, 0
    core._size = size
    capture = _Capture()
    core.texture = capture             # the render pass blits here instead of a texture
    core._render_real()
    data = capture.data
    arr = np.frombuffer(data.data, dtype=np.uint8).reshape(data.height, data.width, 4)
    return arr, data.width, data.height


@dataclass
class Look:
    """What a morph's picture shows: a frame, a markup header (name, role, activity:
    it changes less often, so its rendering is cached) and plain body text."""

    width: int
    height: int
    body: tuple[float, ...]
    border: tuple[float, ...]
    double_border: bool
    shadow_alpha: float
    header: str
    font_size: float
    text: str = ""
    text_size: float = 11.0
    text_color: tuple[float, ...] = (0.89, 0.9, 0.92, 1)


class Composer:
    """Composes pictures, keeping each morph's last frame with its header drawn on
    it: most changes are a new body text on the same frame and header, and then
    only that text is laid out and drawn (one table lookup per pixel, no blending
    arithmetic: the text is one colour on the body's one colour)."""

    def __init__(self) -> None:
        self._frame: tuple[Any, ...] | None = None
        self._header: tuple[Any, ...] | None = None
        self._base: tuple[Any, ...] | None = None    # frame + header, and where text goes

    @staticmethod
    def frame_key(look: Look) -> tuple[Any, ...]:
        return (look.width, look.height, look.body, look.border, look.double_border,
                look.shadow_alpha)

    def frame(self, look: Look) -> Any:
        import numpy as np
        key = self.frame_key(look)
        if self._frame is not None and self._frame[0] == key:
            return self._frame[1]
        w, h = look.width, look.height
        img = np.zeros((h + SHADOW, w + SHADOW, 4), np.uint8)
        shade = int(255 * look.shadow_alpha)
        img[SHADOW:, w:, 3] = shade                   # right edge
        img[h:, SHADOW:, 3] = shade                   # bottom edge
        img[:h, :w] = [int(255 * c) for c in look.body]
        for r in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
            img[r] = 0                                # corners cut: a rounded look
        border = [int(255 * c) for c in look.border]
        for i in range(2 if look.double_border else 1):
            img[i, i:w - i] = border
            img[h - 1 - i, i:w - i] = border
            img[i:h - i, i] = border
            img[i:h - i, w - 1 - i] = border
        self._frame = (key, img)
        return img

    def header(self, look: Look, width: int) -> Any:
        key = (look.header, width, look.font_size)
        if self._header is None or self._header[0] != key:
            self._header = (key, text_image(look.header, width, look.font_size)[0])
        return self._header[1]

    def header_height(self) -> int:
        """Pixels the last header took (0 before any)."""
        return self._header[1].shape[0] if self._header is not None else 0

    def _with_header(self, look: Look) -> tuple[Any, int, bool]:
        """The frame with the header drawn on it, the row where the body text starts
        and whether the header fitted (cached: both change rarely)."""
        key = (self.frame_key(look), look.header, look.font_size)
        if self._base is not None and self._base[0] == key:
            return self._base[1:]
        img = self.frame(look).copy()
        room_w, room_h = max(look.width - 2 * PAD[0], 8), look.height - 2 * PAD[1]
        y, fits = PAD[1], True
        if look.header:
            part = self.header(look, room_w)
            th, tw = part.shape[0], part.shape[1]
            if th > room_h or tw > room_w:
                fits = False
                part = part[:max(0, room_h), :room_w]
                th = part.shape[0]
            if th:
                _blend(img, part, PAD[0], y)
            y += th
        self._base = (key, img, y, fits)
        return img, y, fits

    def compose(self, look: Look) -> tuple[Any, bool]:
        """The picture (numpy RGBA, top row first, SHADOW px wider and taller than
        the body) and whether all the text fitted inside the body."""
        base, y, fits = self._with_header(look)
        img = base.copy()
        room_w, room_h = max(look.width - 2 * PAD[0], 8), look.height - 2 * PAD[1]
        if look.text and fits:
            part = text_image(look.text, room_w, look.text_size, markup=False,
                              color=look.text_color)[0]
            th, tw = part.shape[0], part.shape[1]
            if y + th > PAD[1] + room_h or tw > room_w:
                fits = False
                part = part[:max(0, PAD[1] + room_h - y), :room_w]
            if part.shape[0]:
                _paint(img, part, PAD[0], y, look.text_color, look.body)
        return img, fits


def _blend(img: Any, src: Any, x: int, y: int) -> None:
    """Alpha-blend ``src`` (straight alpha) onto the opaque ``img`` at (x, y)."""
    import numpy as np
    th, tw = src.shape[0], src.shape[1]
    dst = img[y:y + th, x:x + tw]
    a = src[..., 3:4].astype(np.uint16)
    rgb = (src[..., :3].astype(np.uint16) * a + dst[..., :3].astype(np.uint16) * (255 - a)) // 255
    dst[..., :3] = rgb.astype(np.uint8)


def _paint(img: Any, src: Any, x: int, y: int, color: tuple[float, ...],
           body: tuple[float, ...]) -> None:
    """Draw one-colour text (``src``'s alpha is its coverage) onto a region of
    ``img`` that is all ``body`` colour: each pixel is one of 256 blends."""
    import numpy as np
    th, tw = src.shape[0], src.shape[1]
    img[y:y + th, x:x + tw, :3] = np.take(_blends(tuple(color[:3]), tuple(body[:3])),
                                          src[..., 3], axis=0)


@functools.lru_cache(maxsize=64)
def _blends(color: tuple[float, ...], body: tuple[float, ...]) -> Any:
    """The 256 blends of ``color`` over ``body`` (row = coverage)."""
    import numpy as np
    a = np.arange(256, dtype=np.float32)[:, None] / 255.0
    fg = np.array([255 * c for c in color], np.float32)
    bg = np.array([255 * c for c in body], np.float32)
    return np.rint(fg * a + bg * (1 - a)).astype(np.uint8)


def compose(look: Look) -> tuple[Any, bool]:
    """:meth:`Composer.compose` without caching."""
    return Composer().compose(look)


def upload(img: Any, texture: Any = None) -> Any:
    """A texture holding a picture (top row first). Always a new one: Mesa's software
    renderer makes an update of a texture the last frame drew wait for that frame to
    finish, while a new texture is free to fill."""
    import numpy as np
    from kivy.graphics.texture import Texture
    h, w = img.shape[0], img.shape[1]
    texture = Texture.create(size=(w, h), colorfmt="rgba")
    texture.mag_filter = texture.min_filter = "nearest"
    flipped = np.ascontiguousarray(img[::-1])          # textures start at the bottom
    texture.blit_buffer(flipped.data.cast("B"), colorfmt="rgba", bufferfmt="ubyte")
    return texture
