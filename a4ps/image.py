"""The living image on disk: atomic dill saves, a snapshot ring, recovery, migration.

A save writes a temp file (mode 0600), fsyncs it and renames it over
``live_image.dill``; the image it replaces is kept in ``snapshots/`` (a ring of the
last N). A save whose content equals what is already on disk writes nothing, so an
idle system never pushes good snapshots out of the ring. A failed write raises and
leaves the previous image in place; the caller keeps its changes marked unsaved and
retries (see ``System.save``).

On load the newest readable image wins: a corrupt or truncated one is reported with
its path and reason and set aside, and the previous snapshot is loaded — a good image
is never overwritten by a bad one. An image written by a *newer* A4PS is not corrupt:
loading stops with :class:`ImageTooNew` naming the newest older snapshot one could
start from, and nothing is renamed (falling back silently would roll state back).
Temp files left by a save killed midway are swept at start.

Every image carries a metadata sidecar (``live_image.meta.json``, and
``live_image.<id>.meta.json`` once it moves into the ring): its id, save time,
generation, trigger, size and a summary of what changed since the previous save. The
sidecar moves with its image, so listing snapshots never unpickles one.
``snapshots/kept/`` holds images pinned by :meth:`ImageStore.keep` (named ones are never
pruned; pre-restore/pre-swap/pre-amendment ones keep the newest ``kept``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import dill

from .image_diff import describe_changes

if TYPE_CHECKING:
    from .config import Settings
    from .lock import DataLock

log = logging.getLogger(__name__)

IMAGE_FORMAT = 2
_MAGIC = "a4ps-image"
_CHUNK = 256
_CHUNKED = "$a4ps-chunked"
TRIGGERS = ("autosave", "shutdown", "manual", "pre-restore", "pre-swap", "pre-amendment",
            "named")
META_SUFFIX = ".meta.json"
KEPT_DIR = "kept"


def _dumps(obj: Any) -> bytes:
    """The C pickler for plain data (30x faster than dill's pure-Python one); dill for
    whatever plain pickle refuses (functions, lambdas, closures in slots). Both are
    read back by ``dill.loads``."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        return bytes(dill.dumps(obj, protocol=dill.HIGHEST_PROTOCOL))


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


class ImageTooNew(ImageError):
    """The image was written by a newer A4PS. ``fallback``: the newest snapshot this
    A4PS can read (None when there is none)."""

    def __init__(self, message: str, path: Path, fmt: int, fallback: Path | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.format = fmt
        self.fallback = fallback


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
        raise ImageTooNew(f"image format {fmt} is newer than this A4PS ({IMAGE_FORMAT}); "
                          "upgrade A4PS", Path("?"), fmt)
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
    id: str = ""
    written: bool = True      # False: the content equals the image on disk; nothing written


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
    def from_settings(cls, settings: Settings, *, lock: DataLock | None = None) -> ImageStore:
        """The store for ``settings``' data directory (data/live_image.dill + snapshots/)."""
        return cls(settings.image_path, settings.snapshot_dir, settings.image.snapshot_ring,
                   kept=settings.image.kept_snapshots, lock=lock)

    def __init__(self, path: Path, snapshot_dir: Path, ring: int = 5, *, kept: int = 20,
                 lock: DataLock | None = None) -> None:
        self.path = Path(path)
        self.snapshot_dir = Path(snapshot_dir)
        self.kept_dir = self.snapshot_dir / KEPT_DIR
        self.ring = ring
        self.kept_limit = kept
        # the data directory's one-writer lock (a4ps.lock.DataLock); when set, a save
        # without holding it is refused
        self.lock = lock
        self._write_lock = threading.Lock()
        self._live_is_bad = False
        self._live_is_newer = False          # loaded past a newer-format live image
        self._digest: str | None = None      # of the content the live image holds
        self.last_save: SaveInfo | None = None
        self._last_parts: dict[str, Any] | None = None   # what the live image holds
        self._last_stamp = 0
        self.last_attempt_bytes = 0          # size of the last image we tried to write

    # -- start-up hygiene ----------------------------------------------------------
    def sweep_temp(self) -> list[Path]:
        """Remove temp files left by a save that was killed midway."""
        removed = []
        for d in (self.path.parent, self.snapshot_dir, self.kept_dir):
            if d.is_dir():
                for p in d.glob(f"{self.path.name}.tmp*"):
                    p.unlink(missing_ok=True)
                    removed.append(p)
        if removed:
            log.info("swept %d stale image temp file(s): %s", len(removed), removed)
        return removed

    def snapshots(self) -> list[Path]:
        """Snapshot files, newest first."""
        return self._snapshot_files(self.snapshot_dir)

    def _snapshot_files(self, folder: Path) -> list[Path]:
        """The snapshot files in ``folder`` (the ring or the kept ones), newest first."""
        if not folder.is_dir():
            return []
        snaps = [(int(m.group(1)), p) for p in folder.iterdir()
                 if (m := self._SNAP.match(p.name))]
        return [p for _, p in sorted(snaps, reverse=True)]

    def exists(self) -> bool:
        return self.path.exists() or bool(self.snapshots())

    # -- save -----------------------------------------------------------------------
    def _body(self, parts: dict[str, Any]) -> dict[str, Any]:
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
        return body

    @staticmethod
    def _digest_of(body: dict[str, Any]) -> str:
        return hashlib.blake2b(_dumps(body), digest_size=20).hexdigest()

    def serialize(self, parts: dict[str, Any]) -> bytes:
        return _dumps({"magic": _MAGIC, "format": IMAGE_FORMAT, "saved_at": time.time(),
                       "parts": self._body(parts)})

    def remember(self, parts: dict[str, Any]) -> None:
        """Note that the live image on disk holds ``parts`` (called after a load), so
        saving the same content again writes nothing."""
        self._digest = None if (self._live_is_bad or self._live_is_newer) \
            else self._digest_of(self._body(parts))

    def save(self, parts: dict[str, Any], *, trigger: str = "manual", name: str | None = None,
             note: str | None = None, force: bool = False) -> SaveInfo:
        """Serialise ``parts`` (plain data: call this outside any part's lock) and
        replace the live image atomically. ``trigger`` (one of TRIGGERS), ``name`` and
        ``note`` (a prefix for the summary) go into the image's metadata sidecar.
        Content equal to the live image's is not written again (``written=False``)
        unless ``force``. Raises OSError/ImageError when the write fails; the previous
        image stays as it was."""
        if trigger not in TRIGGERS:
            raise ValueError(f"snapshot trigger {trigger!r} is not one of {TRIGGERS}")
        if self.lock is not None and not self.lock.held:
            raise ImageError(f"not saving {self.path}: this process does not hold the data "
                             f"directory's lock ({self.lock.path})")
        t0 = time.perf_counter()
        body = self._body(parts)
        digest = self._digest_of(body)
        blob = _dumps({"magic": _MAGIC, "format": IMAGE_FORMAT, "saved_at": time.time(),
                       "parts": body})
        t1 = time.perf_counter()
        with self._write_lock:
            if (not force and digest == self._digest and not self._live_is_bad
                    and not self._live_is_newer and self.path.exists()):
                live = self.read_meta(self.path)
                info = SaveInfo(self.path, len(blob), t1 - t0, 0.0, time.time(),
                                live["id"] if live else "", written=False)
                self.last_save = info
                return info
            summary, changes = describe_changes(self._last_parts, parts)
            self.last_attempt_bytes = len(blob)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
            prev = None     # the metadata of the image this save replaces
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with open(fd, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)   # whatever the umask or an older file said
                if self.path.exists():
                    if self._live_is_bad:
                        bad = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
                        os.replace(self.path, bad)
                        log.warning("kept the unreadable image aside as %s", bad)
                        self._live_is_bad = False
                    elif self._live_is_newer:
                        self._pin_newer_live()
                        self._live_is_newer = False
                    else:
                        prev = self._rotate_live()
                os.replace(tmp, self.path)
                self._fsync_dir(self.path.parent)
            finally:
                tmp.unlink(missing_ok=True)
            self._digest = digest
            meta = self._write_live_meta(prev, len(blob), trigger, name,
                                         f"{note}: {summary}" if note else summary, changes)
            for old in self.snapshots()[self.ring:]:
                old.unlink(missing_ok=True)
                self.meta_path(old).unlink(missing_ok=True)
        self._last_parts = parts
        info = SaveInfo(self.path, len(blob), t1 - t0, time.perf_counter() - t1, time.time(),
                        meta["id"])
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
        if fmt > IMAGE_FORMAT:
            raise ImageTooNew(f"{path} was written by a newer A4PS (image format {fmt}; "
                              f"this A4PS reads formats up to {IMAGE_FORMAT})", Path(path), fmt)
        try:
            parts = _unchunk(obj["parts"])
        except Exception as e:
            raise ImageError(f"{path}: a chunk is damaged ({type(e).__name__}: {e})") from None
        return fmt, obj.get("saved_at", 0.0), migrate(fmt, parts)

    def load(self, *, skip_newer: bool = False) -> tuple[dict[str, Any], LoadInfo] | None:
        """The newest readable image, or None when there is none at all.

        Unreadable files are skipped (reported in ``LoadInfo.skipped`` with the reason)
        and the previous snapshot is tried. An image from a newer A4PS stops the search
        with :class:`ImageTooNew`: starting from an older snapshot must be a choice —
        ``skip_newer=True`` is that choice (``--from-snapshot``): newer images are
        skipped, and the next save pins a newer live image in ``snapshots/kept/``
        instead of overwriting it."""
        candidates = ([self.path] if self.path.exists() else []) + self.snapshots()
        skipped: list[tuple[Path, str]] = []
        for i, path in enumerate(candidates):
            try:
                fmt, saved_at, parts = self.read(path)
            except ImageTooNew as e:
                if skip_newer:
                    skipped.append((path, f"{path}: written by a newer A4PS (image format "
                                          f"{e.format}); kept, not loaded"))
                    if path == self.path:
                        self._live_is_newer = True
                    continue
                fallback = self._readable(candidates[i + 1:])
                hint = (f"upgrade A4PS, or start from snapshot {fallback.name} with "
                        f"--from-snapshot {fallback.name}" if fallback is not None
                        else "upgrade A4PS (no older snapshot to start from)")
                raise ImageTooNew(f"{path} was written by a newer A4PS (image format "
                                  f"{e.format}; this one reads up to {IMAGE_FORMAT}): {hint}",
                                  path, e.format, fallback) from None
            except ImageError as e:
                log.error("image %s could not be loaded: %s; trying the previous snapshot",
                          path, str(e).split(": ", 1)[-1])
                skipped.append((path, str(e)))
                if path == self.path:
                    self._live_is_bad = True
                continue
            if skipped:
                log.warning("loaded image %s after skipping %d unreadable one(s)", path, len(skipped))
            self._last_parts = parts
            return parts, LoadInfo(path, fmt, saved_at, skipped)
        if candidates:
            names = ", ".join(f"{p} ({r.split(': ', 1)[-1]})" for p, r in skipped)
            raise ImageError(f"no readable image in {self.path.parent}: {names}; move them "
                             "aside to start from a fresh image, or restore one from a backup")
        return None

    # -- snapshot metadata (time travel) ----------------------------------------------
    @staticmethod
    def meta_path(image: Path) -> Path:
        """The sidecar of an image file: ``live_image[.<id>].meta.json``."""
        stem = image.name[:-len(".dill")] if image.name.endswith(".dill") else image.name
        return image.with_name(stem + META_SUFFIX)

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        """Atomic small-file write; the temp name is one :meth:`sweep_temp` removes."""
        tmp = path.with_name(f"{self.path.name}.tmp.meta.{os.getpid()}.{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def read_meta(self, image: Path) -> dict[str, Any] | None:
        """The sidecar of ``image`` if it is readable and describes this file (same size)."""
        try:
            meta = json.loads(self.meta_path(image).read_text(encoding="utf-8"))
            size = image.stat().st_size
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or not str(meta.get("id") or "").isdigit() \
                or meta.get("size") != size:
            return None
        return meta

    def entry(self, image: Path) -> dict[str, Any]:
        """Metadata of an image file; made up from the file itself when it has no sidecar
        (images older than metadata, or a save interrupted between image and sidecar)."""
        meta = self.read_meta(image)
        if meta is not None:
            return meta
        st = image.stat()
        m = self._SNAP.match(image.name)
        return {"id": m.group(1) if m else str(st.st_mtime_ns), "name": None,
                "ts": st.st_mtime, "generation": 0, "trigger": "unknown", "size": st.st_size,
                "summary": "no metadata (saved before snapshot metadata existed, or the "
                           "save was interrupted)", "changes": {}}

    def _stamp(self, floor: int | None = None) -> int:
        """A new id: nanoseconds, strictly increasing in this store (and above
        ``floor``, default the live image's id)."""
        if floor is None:
            live = self.read_meta(self.path) if self.path.exists() else None
            floor = int(live["id"]) if live else 0
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1, floor + 1)
        return self._last_stamp

    def _rotate_live(self) -> dict[str, Any] | None:
        """Keep the live image in the ring under its own id, its sidecar with it; returns
        that sidecar's metadata (None when it had none). (Caller holds the write lock.)"""
        meta = self.read_meta(self.path)
        ident = meta["id"] if meta else self.entry(self.path)["id"]
        snap = self.snapshot_dir / f"live_image.{ident}.dill"
        if snap.exists() and not os.path.samefile(snap, self.path):
            snap = self.snapshot_dir / f"live_image.{self._stamp()}.dill"
        if not snap.exists():   # (exists: a save killed after linking already kept it)
            os.link(self.path, snap)
        live_meta = self.meta_path(self.path)
        if live_meta.exists():
            os.replace(live_meta, self.meta_path(snap))
        return meta

    def _generation(self) -> int:
        """The newest generation on disk (0 for none)."""
        gens = [m.get("generation") or 0 for p in [self.path, *self.snapshots()]
                if p.exists() and (m := self.read_meta(p)) is not None]
        return max(gens, default=0)

    def _write_live_meta(self, prev: dict[str, Any] | None, size: int, trigger: str,
                         name: str | None, summary: str, changes: dict[str, Any]
                         ) -> dict[str, Any]:
        gen = (prev.get("generation") or 0) if prev else self._generation()
        meta = {"id": str(self._stamp(int(prev["id"]) if prev else 0)), "name": name,
                "ts": time.time(), "generation": gen + 1, "trigger": trigger, "size": size,
                "summary": summary, "changes": changes, "format": IMAGE_FORMAT}
        try:
            self._write_json(self.meta_path(self.path), meta)
        except OSError:
            # the image is saved; only its description is missing (listed as "unknown")
            log.warning("could not write %s", self.meta_path(self.path), exc_info=True)
        return meta

    def _pin_newer_live(self) -> None:
        """Keep a live image written by a newer A4PS as a named snapshot (never pruned)
        before a save replaces it. (Caller holds the write lock.)"""
        ident = str(self._stamp(0))
        self.kept_dir.mkdir(parents=True, exist_ok=True)
        target = self.kept_dir / f"live_image.{ident}.dill"
        os.link(self.path, target)
        self.meta_path(self.path).unlink(missing_ok=True)
        self._write_json(self.meta_path(target), {
            "id": ident, "name": f"newer-a4ps-{ident}", "ts": self.path.stat().st_mtime,
            "generation": 0, "trigger": "named", "size": target.stat().st_size,
            "summary": "written by a newer A4PS; set aside when starting --from-snapshot",
            "changes": {}})
        self._fsync_dir(self.kept_dir)
        log.warning("the image written by a newer A4PS is kept as %s", target)

    def keep(self, trigger: str, name: str | None = None) -> dict[str, Any]:
        """Pin the live image in ``snapshots/kept/`` under ``trigger`` (and ``name``).

        Named snapshots are never pruned; other kept ones beyond ``kept_limit`` (oldest
        first) are. Returns the kept snapshot's metadata."""
        if trigger not in TRIGGERS:
            raise ValueError(f"snapshot trigger {trigger!r} is not one of {TRIGGERS}")
        with self._write_lock:
            if not self.path.exists():
                raise ImageError(f"no image at {self.path} to keep: save one first")
            live = self.entry(self.path)
            self.kept_dir.mkdir(parents=True, exist_ok=True)
            meta = {**live, "trigger": trigger, "name": name}
            target = self.kept_dir / f"live_image.{live['id']}.dill"
            if target.exists():   # this image is kept already: a second pin gets its own id
                meta.update(id=str(self._stamp()), ts=time.time())
                target = self.kept_dir / f"live_image.{meta['id']}.dill"
            os.link(self.path, target)
            self._write_json(self.meta_path(target), meta)
            self._fsync_dir(self.kept_dir)
            unnamed = [p for p in self.kept() if self.entry(p).get("trigger") != "named"]
            for old in unnamed[self.kept_limit:]:
                old.unlink(missing_ok=True)
                self.meta_path(old).unlink(missing_ok=True)
        return meta

    def kept(self) -> list[Path]:
        """Pinned snapshot files, newest first."""
        return self._snapshot_files(self.kept_dir)

    def catalog(self) -> list[dict[str, Any]]:
        """Every snapshot (live image, ring, kept), newest first, one entry per id.

        Each entry is the metadata plus ``path`` and ``where`` ("live" | "ring" |
        "kept"); a kept entry wins over the same image in the ring or live."""
        seen: dict[str, dict[str, Any]] = {}
        files = [(p, "kept") for p in self.kept()]
        if self.path.exists():
            files.append((self.path, "live"))
        files += [(p, "ring") for p in self.snapshots()]
        for path, where in files:
            try:
                e = self.entry(path)
            except OSError:       # pruned between listing and reading
                continue
            seen.setdefault(str(e["id"]), {**e, "path": path, "where": where})
        return sorted(seen.values(), key=lambda e: (e.get("ts") or 0, int(e["id"])), reverse=True)
    def _readable(self, paths: list[Path]) -> Path | None:
        """The first of ``paths`` this A4PS can read."""
        for p in paths:
            try:
                self.read(p)
                return p
            except ImageError:
                continue
        return None


# -- a failing save keeps retrying ----------------------------------------------------

_SPACE_ERRNOS = (28, 122)      # ENOSPC, EDQUOT: retry as soon as space is back


@dataclass
class SaveFailure:
    """A save that failed and is being retried (what ``system.status`` shows)."""
    error: str
    hint: str
    attempts: int
    first_failed_at: float
    last_attempt_at: float
    retry_in_s: float
    errno: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.error, "hint": self.hint, "attempts": self.attempts,
                "first_failed_at": self.first_failed_at,
                "last_attempt_at": self.last_attempt_at, "retry_in_s": self.retry_in_s,
                "next_retry_at": self.last_attempt_at + self.retry_in_s}


class SaveRetry:
    """When to retry a failing save: after 0.5 s, 1 s, 2 s ... up to ``max_s``; and at
    once when the failure was a full disk and enough space is free again (a cheap
    ``statvfs`` poll), so an image is on disk moments after space is freed."""

    def __init__(self, base_s: float = 0.5, max_s: float = 30.0) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.failure: SaveFailure | None = None
        self._next_at = 0.0

    def failed(self, error: BaseException, directory: Path) -> SaveFailure:
        now = time.time()
        attempts = 1 if self.failure is None else self.failure.attempts + 1
        delay = min(self.max_s, self.base_s * 2 ** (attempts - 1))
        code = getattr(error, "errno", None)
        if code in _SPACE_ERRNOS:
            hint = f"the disk holding {directory} is full: free some space; the save is retried as soon as there is room"
        elif code == 27:  # EFBIG
            hint = "the image is larger than this process may write (file size limit)"
        elif isinstance(error, PermissionError):
            hint = f"cannot write to {directory}: fix its permissions"
        else:
            hint = f"the save is retried every {delay:g} s at most; the previous image is intact"
        self.failure = SaveFailure(
            error=f"{type(error).__name__}: {error}", hint=hint, attempts=attempts,
            first_failed_at=now if self.failure is None else self.failure.first_failed_at,
            last_attempt_at=now, retry_in_s=delay, errno=code)
        self._next_at = time.monotonic() + delay
        return self.failure

    def succeeded(self) -> SaveFailure | None:
        """Clear the failure; returns it (None if there was none)."""
        ended, self.failure = self.failure, None
        return ended

    def due(self, store: ImageStore) -> bool:
        """Time to try again?"""
        if self.failure is None or time.monotonic() >= self._next_at:
            return True
        if self.failure.errno in _SPACE_ERRNOS:
            try:
                free = os.statvfs(store.path.parent)
            except OSError:
                return False
            return free.f_bavail * free.f_frsize >= store.last_attempt_bytes + 65_536
        return False
