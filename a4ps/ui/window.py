"""The window the user last had: size and position, kept in ``<data>/ui_window.json``.

:func:`configure` runs before Kivy opens its window (the launcher calls it first): it
restores the saved geometry (at least 800x600, never larger than a sane maximum),
turns off Kivy's multitouch emulation (right clicks would leave red dots and swallow
the next right click at the same spot) and Esc-quits-the-app. :func:`save` writes the
geometry when the app stops (and after a resize or move settles). Plain JSON, no
Kivy import at module level.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE_NAME = "ui_window.json"
MIN_SIZE = (800, 600)
DEFAULT_SIZE = (1280, 800)
MAX_SIDE = 16384


@dataclass
class Geometry:
    width: int = DEFAULT_SIZE[0]
    height: int = DEFAULT_SIZE[1]
    left: int | None = None
    top: int | None = None

    def sane(self) -> Geometry:
        w = min(max(int(self.width), MIN_SIZE[0]), MAX_SIDE)
        h = min(max(int(self.height), MIN_SIZE[1]), MAX_SIDE)
        left = self.left if isinstance(self.left, int) and -MAX_SIDE < self.left < MAX_SIDE else None
        top = self.top if isinstance(self.top, int) and -MAX_SIDE < self.top < MAX_SIDE else None
        return Geometry(w, h, left, top)


def path_for(data_dir: Path | str | None) -> Path | None:
    return Path(data_dir) / FILE_NAME if data_dir else None


def load(path: Path | None) -> Geometry:
    """The saved geometry, or the default (a missing or broken file is not an error)."""
    if path is None:
        return Geometry()
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return Geometry(**{k: raw.get(k) for k in ("width", "height", "left", "top")
                           if raw.get(k) is not None}).sane()
    except FileNotFoundError:
        return Geometry()
    except (OSError, ValueError, TypeError) as e:
        log.warning("ignoring unreadable window geometry %s (%s)", path, e)
        return Geometry()


def save(path: Path | None, geometry: Geometry) -> None:
    """Write atomically (a crash mid-write leaves the old file)."""
    if path is None:
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ui_window.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(geometry.sane()), f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not save the window geometry to %s: %s", path, e)


def configure(geometry: Geometry) -> None:
    """Kivy settings that must be in place before the window opens."""
    from kivy.config import Config
    g = geometry.sane()
    Config.set("graphics", "width", str(g.width))
    Config.set("graphics", "height", str(g.height))
    Config.set("graphics", "minimum_width", str(MIN_SIZE[0]))
    Config.set("graphics", "minimum_height", str(MIN_SIZE[1]))
    if g.left is not None and g.top is not None:
        Config.set("graphics", "position", "custom")
        Config.set("graphics", "left", str(g.left))
        Config.set("graphics", "top", str(g.top))
    Config.set("input", "mouse", "mouse,disable_multitouch")
    Config.set("kivy", "exit_on_escape", "0")


def current(window: Any) -> Geometry:
    """The geometry of Kivy's window now (in system pixels)."""
    w, h = window.system_size if hasattr(window, "system_size") else window.size
    left, top = getattr(window, "left", None), getattr(window, "top", None)
    return Geometry(int(w), int(h), int(left) if isinstance(left, (int, float)) else None,
                    int(top) if isinstance(top, (int, float)) else None)
