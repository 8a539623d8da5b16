"""The living image on disk: atomic dill saves, a snapshot ring, recovery, migration.

A save writes a temp file, fsyncs it and renames it over ``live_image.dill``; the
image it replaces is kept in ``snapshots/`` (a ring of the last N). On load the newest
readable image wins: a corrupt or truncated one is reported with its path and reason
and set aside, and the previous snapshot is loaded — a good image is never overwritten
by a bad one. Temp files left by a save killed midway are swept at start.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import dill

log = logging.getLogger(__name__)

IMAGE_FORMAT = 2
_MAGIC = "a4ps-image"
_CHUNK = 256
_CHUNKED = "$a4ps-chunked"


def _dumps(obj: Any) -> bytes:
    """The C pickler for plain data (30x faster than dill's pure-Python one); dill for
    whatever plain pickle refuses (functions, lambdas, closures in slots). Both are
    read back by ``dill.loads``."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        return dill.dumps(obj, protocol=dill.HIGHEST_PROTOCOL)


def _unchunk(parts: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in parts.items():
        if isinstance(value, tuple) and len(value) == 2 and value[0] == _CHUNKED:
            merged: dict[str, Any] = {}
            for blob in value[1]:
                merged.update(dill.loads(blob))
            value = merged
        out[name] = value
    return out


class ImageError(RuntimeError):
    """No image could be read or written; the message names the file and reason."""


def _migrate_1_to_2(parts: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept protos as {name: {"slots", "methods"}} with parents in a slot
    ``_parent`` and no versions, and had no codex part."""
    protos = {}
    for name, st in parts.get("protos", {}).items():
        slots = dict(st.get("slots", {}))
        parent = slots.pop("_parent", None)
        protos[name] = {"slots": slots, "methods": dict(st.get("methods", {})),
                        "parent": parent, "version": 1}
    out = dict(parts)
    out["protos"] = protos
    return out


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _migrate_1_to_2}


def migrate(fmt: int, parts: dict[str, Any]) -> dict[str, Any]:
    if fmt > IMAGE_FORMAT:
        raise ImageError(f"image format {fmt} is newer than this A4PS ({IMAGE_FORMAT}); upgrade A4PS")
    while fmt < IMAGE_FORMAT:
        try:
            step = MIGRATIONS[fmt]
        except KeyError:
            raise ImageError(f"no migration from image format {fmt}") from None
        parts = step(parts)
        fmt += 1
    return parts


@dataclass
class SaveInfo:
    path: Path
    bytes: int
    serialize_s: float
    write_s: float
    at: float


@dataclass
class LoadInfo:
    path: Path
    format: int
    saved_at: float
    skipped: list[tuple[Path, str]]


class ImageStore:
    """Reads and writes the image file and its snapshot ring. Thread-safe."""

    _SNAP = re.compile(r"^live_image\.(\d+)\.dill$")

    @classmethod
    def from_settings(cls, settings: Any) -> ImageStore:
        """The store for ``settings``' data directory (data/live_image.dill + snapshots/)."""
        return cls(settings.image_path, settings.snapshot_dir, settings.image.snapshot_ring)

    def __init__(self, path: Path, snapshot_dir: Path, ring: int = 5) -> None:
        self.path = Path(path)
        self.snapshot_dir = Path(snapshot_dir)
        self.ring = ring
        self._write_lock = threading.Lock()
        self._live_is_bad = False
        self.last_save: SaveInfo | None = None

    # -- start-up hygiene ----------------------------------------------------------
    def sweep_temp(self) -> list[Path]:
        """Remove temp files left by a save that was killed midway."""
        removed = []
        for d in (self.path.parent, self.snapshot_dir):
            if d.is_dir():
                for p in d.glob(f"{self.path.name}.tmp*"):
                    p.unlink(missing_ok=True)
                    removed.append(p)
        if removed:
            log.info("swept %d stale image temp file(s): %s", len(removed), removed)
        return removed

    def snapshots(self) -> list[Path]:
        """Snapshot files, newest first."""
        if not self.snapshot_dir.is_dir():
            return []
        snaps = [(int(m.group(1)), p) for p in self.snapshot_dir.iterdir()
                 if (m := self._SNAP.match(p.name))]
        return [p for _, p in sorted(snaps, reverse=True)]

    def exists(self) -> bool:
        return self.path.exists() or bool(self.snapshots())

    # -- save -----------------------------------------------------------------------
    def serialize(self, parts: dict[str, Any]) -> bytes:
        """Large dict parts are pickled in chunks so the GIL is released between them
        (readers keep running during a save of 10,000 protos)."""
        body = {}
        for name, value in parts.items():
            if isinstance(value, dict) and len(value) > _CHUNK:
                items = list(value.items())
                body[name] = (_CHUNKED, [_dumps(dict(items[i:i + _CHUNK]))
                                         for i in range(0, len(items), _CHUNK)])
            else:
                body[name] = value
        return _dumps({"magic": _MAGIC, "format": IMAGE_FORMAT, "saved_at": time.time(),
                       "parts": body})

    def save(self, parts: dict[str, Any]) -> SaveInfo:
        """Serialise ``parts`` (plain data: call this outside any part's lock) and
        replace the live image atomically."""
        t0 = time.perf_counter()
        blob = self.serialize(parts)
        t1 = time.perf_counter()
        with self._write_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
            try:
                with open(tmp, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                if self.path.exists():
                    if self._live_is_bad:
                        bad = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
                        os.replace(self.path, bad)
                        log.warning("kept the unreadable image aside as %s", bad)
                        self._live_is_bad = False
                    else:
                        snap = self.snapshot_dir / f"live_image.{time.time_ns()}.dill"
                        os.link(self.path, snap)
                os.replace(tmp, self.path)
                self._fsync_dir(self.path.parent)
            finally:
                tmp.unlink(missing_ok=True)
            for old in self.snapshots()[self.ring:]:
                old.unlink(missing_ok=True)
        info = SaveInfo(self.path, len(blob), t1 - t0, time.perf_counter() - t1, time.time())
        self.last_save = info
        return info

    @staticmethod
    def _fsync_dir(d: Path) -> None:
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- load -----------------------------------------------------------------------
    def read(self, path: Path) -> tuple[int, float, dict[str, Any]]:
        """Read and migrate one image file; raise ImageError with the reason."""
        try:
            with open(path, "rb") as f:
                obj = dill.load(f)
        except Exception as e:  # truncated, random bytes, missing class...
            raise ImageError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict) or obj.get("magic") != _MAGIC:
            raise ImageError(f"{path}: not an A4PS image")
        fmt = obj.get("format")
        if not isinstance(fmt, int) or not isinstance(obj.get("parts"), dict):
            raise ImageError(f"{path}: image header is damaged")
        try:
            parts = _unchunk(obj["parts"])
        except Exception as e:
            raise ImageError(f"{path}: a chunk is damaged ({type(e).__name__}: {e})") from None
        return fmt, obj.get("saved_at", 0.0), migrate(fmt, parts)

    def load(self) -> tuple[dict[str, Any], LoadInfo] | None:
        """The newest readable image, or None when there is none at all."""
        candidates = ([self.path] if self.path.exists() else []) + self.snapshots()
        skipped: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                fmt, saved_at, parts = self.read(path)
            except ImageError as e:
                log.error("image %s could not be loaded: %s; trying the previous snapshot",
                          path, str(e).split(": ", 1)[-1])
                skipped.append((path, str(e)))
                if path == self.path:
                    self._live_is_bad = True
                continue
            if skipped:
                log.warning("loaded image %s after skipping %d unreadable one(s)", path, len(skipped))
            return parts, LoadInfo(path, fmt, saved_at, skipped)
        if candidates:
            raise ImageError("no readable image: " + "; ".join(r for _, r in skipped))
        return None
