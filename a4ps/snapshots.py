"""Time travel through the living image: list, compare, pin and restore snapshots.

Every save leaves a snapshot with metadata (:mod:`a4ps.image`); this module is what a
person does with them:

* :meth:`TimeMachine.list` — every snapshot, newest first (``image.snapshots``);
* :meth:`TimeMachine.diff` — protos, slots, methods, codex and tools between a snapshot
  and the live image or another snapshot (``image.diff``);
* :meth:`TimeMachine.snapshot` — a named snapshot the ring never prunes
  (``image.snapshot``); :meth:`TimeMachine.checkpoint` pins one before a model swap,
  a codex amendment or a restore;
* :meth:`TimeMachine.restore` — the snapshot becomes the live state without a restart.
  It reads and checks the snapshot first (nothing changes if it is unreadable), waits
  at a task boundary (:class:`TaskGate`: the task in flight finishes on the state it
  started with, the next one starts on the restored state), pins a ``pre-restore``
  snapshot so the restore can be undone, swaps protos and codex in one step, saves,
  then publishes ``image.restored`` and ``proto.changed`` for every proto it changed.

Errors::

    SnapshotError (ValueError)        bad request: the message says what to do
      + SnapshotNotFound              no snapshot by that id or name
      + SnapshotConflict              name taken; a task did not finish in time
"""
from __future__ import annotations

import builtins
import contextlib
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .codex import Codex
from .image import ImageError, ImageStore
from .image_diff import diff_parts, proto_delta
from .proto import ProtoError, ProtoManager, compile_method

if TYPE_CHECKING:
    from .events import EventBus

log = logging.getLogger(__name__)

SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
WIRE_KEYS = ("id", "name", "ts", "generation", "trigger", "size", "summary", "changes")
MIN_SUFFIX = 4
_FILE_NAME = re.compile(r"^live_image\.(\d+)\.dill$")


class SnapshotError(ValueError):
    """A time-travel request that cannot be done as asked; the message says why."""


class SnapshotNotFound(SnapshotError):
    pass


class SnapshotConflict(SnapshotError):
    pass


class TaskGate:
    """Tasks pass the gate together; a restore passes it alone.

    A restore waiting for the gate stops new tasks from starting, so it waits for the
    tasks in flight only. Tasks run on the state they started with (the graph reads
    protos at every node, so a restore in the middle would mix two states)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: dict[int, str] = {}
        self._holder: int | None = None
        self._waiting = 0

    @contextlib.contextmanager
    def task(self, label: str = "task") -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(lambda: self._holder in (None, me) and
                                (self._waiting == 0 or self._holder == me))
            self._running[me] = label
        try:
            yield
        finally:
            with self._cond:
                self._running.pop(me, None)
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            self._waiting += 1
            try:
                ok = self._cond.wait_for(
                    lambda: self._holder is None and not (set(self._running) - {me}), timeout)
                if not ok:
                    busy = ", ".join(sorted(set(self._running.values()))) or "another restore"
                    raise SnapshotConflict(
                        f"{busy} is still running after {timeout:g}s; restore waits for the "
                        f"task in flight to finish: try again when it is done, or cancel it "
                        f"(image.restore_wait_s sets the wait)")
                self._holder = me
            finally:
                self._waiting -= 1
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._holder = None
                self._cond.notify_all()

    def running(self) -> builtins.list[str]:
        with self._cond:
            return sorted(self._running.values())


def wire(entry: dict[str, Any]) -> dict[str, Any]:
    """A catalog entry as the ``image.snapshots`` wire shape."""
    return {k: entry.get(k) for k in WIRE_KEYS}


def check_parts(parts: dict[str, Any]) -> None:
    """Raise SnapshotError unless ``parts`` can become the live state (built on scratch
    objects: protos with their parents, every method compiled, the codex)."""
    protos = parts.get("protos")
    if not isinstance(protos, dict) or not protos:
        raise SnapshotError("the snapshot holds no protos; it is not a living image")
    try:
        scratch = ProtoManager()
        scratch.restore_image(protos)
        for proto in scratch:
            for name, source in proto.own_methods().items():
                compile_method(name, source)
        if "codex" in parts:
            Codex({}).restore_image(parts["codex"])
    except (ProtoError, KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"the snapshot cannot become the live state: {e}") from None


def with_versions(live: dict[str, Any], restored: dict[str, Any],
                  changed: dict[str, Any]) -> dict[str, Any]:
    """Restored proto states whose versions move forward: an editor holding a version
    from before the restore gets a conflict instead of writing over the restored state.
    ``changed``: the names whose content differs (from :func:`proto_delta`)."""
    out = {}
    for name, st in restored.items():
        old = live.get(name)
        if old is None:
            out[name] = st
        elif name not in changed:
            out[name] = {**st, "version": old.get("version", st.get("version", 1))}
        else:
            out[name] = {**st, "version": max(int(old.get("version") or 0),
                                              int(st.get("version") or 0)) + 1}
    return out


class TimeMachine:
    """Snapshots of one living image. The System passes in how to read the live state
    (``live_parts``), save it (``save(trigger=, name=, keep=, note=)`` -> {"id", ...})
    and replace it (``apply(parts)``, all or nothing)."""

    def __init__(self, store: ImageStore, bus: EventBus, *,
                 live_parts: Callable[[], dict[str, Any]],
                 save: Callable[..., dict[str, Any]],
                 apply: Callable[[dict[str, Any]], None],
                 gate: TaskGate | None = None, wait_s: float = 60.0) -> None:
        self.store = store
        self.bus = bus
        self.live_parts = live_parts
        self._save = save
        self._apply = apply
        self.gate = gate or TaskGate()
        self.wait_s = wait_s
        self._restore_lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------
    def list(self) -> builtins.list[dict[str, Any]]:
        """Every snapshot, newest first, in the ``image.snapshots`` wire shape."""
        return [wire(e) for e in self.store.catalog()]

    def resolve(self, ref: str) -> dict[str, Any]:
        """A catalog entry by id, name (the newest named so) or unique id ending."""
        ref = str(ref or "").strip()
        if not ref:
            raise SnapshotError("say which snapshot: an id or a name from `a4ps image list`")
        if m := _FILE_NAME.match(Path(ref).name):    # a file name, as start-up errors give
            ref = m.group(1)
        catalog = self.store.catalog()
        for e in catalog:
            if e["id"] == ref:
                return e
        named = [e for e in catalog if e.get("name") == ref]
        if named:
            return named[0]
        if ref.isdigit() and len(ref) >= MIN_SUFFIX:
            tail = [e for e in catalog if e["id"].endswith(ref)]
            if len(tail) == 1:
                return tail[0]
            if len(tail) > 1:
                raise SnapshotError(f"{ref!r} ends {len(tail)} snapshot ids; give more digits")
        raise SnapshotNotFound(f"no snapshot {ref!r}: `a4ps image list` (image.snapshots) "
                               f"shows the ids and names")

    def read(self, entry: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.store.read(entry["path"])[2]
        except (ImageError, OSError) as e:
            raise SnapshotError(f"snapshot {entry['id']} cannot be read ({e}); pick another "
                                f"one from `a4ps image list`") from None

    def diff(self, snapshot: str, against: str | None = None) -> dict[str, Any]:
        """What going from ``snapshot`` to ``against`` (default: the live image) changes."""
        before = self.read(self.resolve(snapshot))
        after = self.live_parts() if against is None else self.read(self.resolve(against))
        return diff_parts(before, after)

    # -- pinning ------------------------------------------------------------------------
    def checkpoint(self, trigger: str, name: str | None = None) -> str:
        """Save the live state and pin it under ``trigger``; returns the snapshot id."""
        return str(self._save(trigger=trigger, name=name, keep=True)["id"])

    def snapshot(self, name: str) -> dict[str, Any]:
        """A named snapshot of the live state, never pruned: ``{"id": ...}``."""
        name = str(name or "").strip()
        if not SNAPSHOT_NAME.match(name):
            raise SnapshotError(f"snapshot name {name!r} must be 1-64 letters, digits, '_', "
                                f"'-' or '.', starting with a letter or digit")
        if name.isdigit():
            raise SnapshotError(f"snapshot name {name!r} looks like an id; add a letter")
        taken = [e for e in self.store.catalog() if e.get("name") == name]
        if taken:
            raise SnapshotConflict(f"a snapshot named {name!r} exists ({taken[0]['id']}); "
                                   f"pick another name")
        return {"id": self.checkpoint("named", name)}

    # -- restoring ----------------------------------------------------------------------
    def restore(self, ref: str) -> dict[str, Any]:
        """Make snapshot ``ref`` the live state: ``{"restored": id, "pre_restore": id}``."""
        entry = self.resolve(ref)
        parts = self.read(entry)
        check_parts(parts)
        with self._restore_lock, self.gate.exclusive(self.wait_s):
            pre = self.checkpoint("pre-restore")
            live = self.live_parts().get("protos") or {}
            delta = proto_delta(live, parts["protos"])
            restored = with_versions(live, parts["protos"], delta[2])
            self._apply({**parts, "protos": restored})
            try:
                self._save(trigger="manual", note=f"restored snapshot {entry['id']}")
            except Exception:   # the restore is live; autosave writes it when it can
                log.exception("saving the restored image failed; autosave will retry")
        self.bus.publish("image.restored", {"snapshot": entry["id"], "pre_restore": pre,
                                            "name": entry.get("name")})
        self._publish_proto_changes(delta, live, restored)
        log.info("restored snapshot %s (pre-restore snapshot %s)", entry["id"], pre)
        return {"restored": entry["id"], "pre_restore": pre}

    def _publish_proto_changes(self, delta: tuple[builtins.list[str], builtins.list[str],
                                                  dict[str, Any]],
                               live: dict[str, Any], restored: dict[str, Any]) -> None:
        added, removed, changed = delta
        for name in removed:
            self.bus.publish("proto.changed", {"name": name, "change": "removed", "keys": [],
                                               "version": live[name].get("version"),
                                               "restored": True})
        for name in added:
            self.bus.publish("proto.changed", {"name": name, "change": "created",
                                               "keys": sorted(restored[name].get("slots") or {}),
                                               "version": restored[name].get("version"),
                                               "restored": True})
        for name, keys in changed.items():
            self.bus.publish("proto.changed", {"name": name, "change": "updated",
                                               "keys": keys["slots"] + keys["methods"] +
                                               keys["parent"],
                                               "version": restored[name].get("version"),
                                               "restored": True})
