"""Protos: Self-style prototype objects, and the ProtoManager that owns them.

A proto has named slots, an optional parent it delegates to (a slot or method missing
here is looked up on the parent, with ``self`` still the receiver), and live methods
whose source is kept as text and compiled, so a method can be edited while the system
runs. The ProtoManager is the only writer: it locks, bumps a per-proto version and
publishes ``proto.changed`` for every change.
"""
from __future__ import annotations

import ast
import copy
import threading
import textwrap
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .events import json_safe

if TYPE_CHECKING:
    from .events import EventBus

_INTERNAL = ("_name", "_slots", "_parent", "_methods", "_compiled", "_version", "_manager")


class ProtoError(ValueError):
    """A proto operation was refused; the message says why and what to do."""


def compile_method(name: str, source: str) -> Callable[..., Any]:
    """Compile ``source`` (one ``def name(self, ...)``) into a function.

    Raises ProtoError with the line number for a syntax error, or when the source does
    not define exactly the named function.
    """
    if not isinstance(source, str) or not source.strip():
        raise ProtoError(f"method {name!r}: source must be non-empty text")
    source = textwrap.dedent(source)
    try:
        tree = ast.parse(source, filename=f"<method {name}>")
    except SyntaxError as e:
        raise ProtoError(f"method {name!r}: syntax error at line {e.lineno}: {e.msg}") from None
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if len(tree.body) != 1 or len(defs) != 1 or defs[0].name != name:
        raise ProtoError(f"method {name!r}: source must be a single 'def {name}(self, ...)'")
    if not defs[0].args.args:
        raise ProtoError(f"method {name!r}: the first parameter must be self")
    namespace: dict[str, Any] = {"__name__": f"a4ps.proto.live.{name}"}
    exec(compile(tree, f"<method {name}>", "exec"), namespace)  # the image's own code
    return namespace[name]


class Proto:
    """A prototype object. Read slots as attributes; write through the manager."""

    def __init__(self, name: str, slots: dict[str, Any] | None = None,
                 parent: Proto | None = None, methods: dict[str, str] | None = None):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_slots", dict(slots or {}))
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_methods", {})
        object.__setattr__(self, "_compiled", {})
        object.__setattr__(self, "_version", 0)
        object.__setattr__(self, "_manager", None)
        for meth, src in (methods or {}).items():
            self._install_method(meth, src)

    # -- identity -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def parent(self) -> Proto | None:
        return self._parent

    @property
    def version(self) -> int:
        return self._version

    def __repr__(self) -> str:
        return f"<Proto {self._name} v{self._version}>"

    # -- lookup with delegation --------------------------------------------------
    def lookup(self, key: str) -> tuple[str, Any, Proto]:
        """Find ``key`` along the parent chain: (kind, value, owner)."""
        p: Proto | None = self
        while p is not None:
            if key in p._slots:
                return "slot", p._slots[key], p
            if key in p._methods:
                return "method", p._compiled_method(key), p
            p = p._parent
        raise AttributeError(f"proto {self._name!r} has no slot or method {key!r}")

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key in _INTERNAL:
            raise AttributeError(key)
        kind, value, _ = self.lookup(key)
        if kind == "method":
            return value.__get__(self)  # bound to the receiver, not the owner
        return value

    def __setattr__(self, key: str, value: Any) -> None:
        self.set_slot(key, value)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            return default

    def has(self, key: str) -> bool:
        try:
            self.lookup(key)
            return True
        except AttributeError:
            return False

    def own_slots(self) -> dict[str, Any]:
        return dict(self._slots)

    def own_methods(self) -> dict[str, str]:
        return dict(self._methods)

    def service(self, name: str) -> Any:
        """A runtime part (models, memory, bus...) from the owning manager."""
        if self._manager is None:
            raise ProtoError(f"proto {self._name!r} is not attached to a ProtoManager")
        return self._manager.service(name)

    # -- mutation (through the manager when attached) ----------------------------
    def set_slot(self, key: str, value: Any) -> None:
        if self._manager is not None:
            self._manager.update(self._name, {key: value})
        else:
            self._check_slot_name(key)
            self._slots[key] = value
            object.__setattr__(self, "_version", self._version + 1)

    def define_method(self, key: str, source: str) -> None:
        if self._manager is not None:
            self._manager.update(self._name, methods={key: source})
        else:
            self._install_method(key, source)
            object.__setattr__(self, "_version", self._version + 1)

    @staticmethod
    def _check_slot_name(key: str) -> None:
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise ProtoError(f"slot name {key!r} must be an identifier not starting with '_'")

    def _install_method(self, key: str, source: str) -> None:
        self._check_slot_name(key)
        fn = compile_method(key, source)
        self._methods[key] = textwrap.dedent(source)
        self._compiled[key] = fn

    def _compiled_method(self, key: str) -> Callable[..., Any]:
        fn = self._compiled.get(key)
        if fn is None:
            fn = compile_method(key, self._methods[key])
            self._compiled[key] = fn
        return fn

    # -- persistence -----------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # compiled functions and the manager (with its lock and services) stay behind
        return {"name": self._name, "slots": self._slots, "parent": self._parent,
                "methods": self._methods, "version": self._version}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "_name", state["name"])
        object.__setattr__(self, "_slots", state["slots"])
        object.__setattr__(self, "_parent", state["parent"])
        object.__setattr__(self, "_methods", state["methods"])
        object.__setattr__(self, "_compiled", {})
        object.__setattr__(self, "_version", state["version"])
        object.__setattr__(self, "_manager", None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the wire and the inspector): own and inherited slots."""
        inherited: dict[str, Any] = {}
        inherited_methods: dict[str, dict[str, str]] = {}
        p = self._parent
        while p is not None:
            for k, v in p._slots.items():
                if k not in self._slots and k not in inherited:
                    inherited[k] = {"value": plain(v), "from": p._name}
            for k, v in p._methods.items():
                if k not in self._methods and k not in inherited_methods:
                    inherited_methods[k] = {"from": p._name, "source": v}
            p = p._parent
        return {
            "name": self._name,
            "parent": self._parent._name if self._parent else None,
            "version": self._version,
            "slots": {k: plain(v) for k, v in self._slots.items()},
            "methods": dict(self._methods),
            "inherited": inherited,
            "inherited_methods": inherited_methods,
        }


def plain(value: Any) -> Any:
    """Reduce a slot value to msgpack-friendly data for the wire: bytes stay bytes,
    sets become lists, a proto becomes {"$proto": name}, anything else {"$repr": ...}."""
    return json_safe(value, _plain_other)


def _plain_other(value: Any) -> Any:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, Proto):
        return {"$proto": value.name}
    return {"$repr": repr(value)}


class ProtoManager:
    """The only writer of protos: thread-safe, versioned, publishing ``proto.changed``."""

    def __init__(self, bus: EventBus | None = None) -> None:
        self._lock = threading.RLock()
        self._protos: dict[str, Proto] = {}
        self._bus = bus
        self._services: dict[str, Any] = {}
        self._dirty = False
        # name -> plain state, replaced (never mutated) on every change, so that
        # image_state() is a cheap shallow copy taken under the lock
        self._image: dict[str, dict[str, Any]] = {}

    # -- runtime services (never in the image) -----------------------------------
    def provide(self, name: str, part: Any) -> None:
        self._services[name] = part

    def service(self, name: str) -> Any:
        try:
            return self._services[name]
        except KeyError:
            raise ProtoError(f"no runtime service {name!r}; the System provides "
                             f"{sorted(self._services)}") from None

    # -- reading -------------------------------------------------------------------
    def get(self, name: str) -> Proto:
        with self._lock:
            try:
                return self._protos[name]
            except KeyError:
                raise ProtoError(f"no proto named {name!r}") from None

    def find(self, name: str) -> Proto | None:
        with self._lock:
            return self._protos.get(name)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._protos

    def __len__(self) -> int:
        with self._lock:
            return len(self._protos)

    def __iter__(self) -> Iterator[Proto]:
        with self._lock:
            return iter(list(self._protos.values()))

    def names(self) -> list[str]:
        with self._lock:
            return list(self._protos)

    @property
    def dirty(self) -> bool:
        return self._dirty

    def mark_clean(self) -> None:
        self._dirty = False

    # -- writing -------------------------------------------------------------------
    def create(self, name: str, slots: dict[str, Any] | None = None, parent: str | None = None,
               methods: dict[str, str] | None = None) -> Proto:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ProtoError(f"proto name {name!r} must be letters, digits, '_', '-' or '.'")
        for key in slots or {}:
            Proto._check_slot_name(key)
        with self._lock:
            if name in self._protos:
                raise ProtoError(f"a proto named {name!r} already exists")
            parent_proto = self.get(parent) if parent else None
            proto = Proto(name, slots, parent_proto, methods)
            object.__setattr__(proto, "_version", 1)
            object.__setattr__(proto, "_manager", self)
            self._protos[name] = proto
            self._changed(proto, "created", list((slots or {}).keys()))
        return proto

    def clone(self, name: str, new_name: str, **slots: Any) -> Proto:
        """A new proto whose parent is ``name``: it inherits everything it doesn't set."""
        with self._lock:
            self.get(name)
            return self.create(new_name, slots, parent=name)

    def copy(self, name: str, new_name: str) -> Proto:
        """A new proto with a copy of ``name``'s own slots and methods, same parent."""
        with self._lock:
            src = self.get(name)
            return self.create(new_name, copy.deepcopy(src._slots),
                               parent=src._parent._name if src._parent else None,
                               methods=dict(src._methods))

    def update(self, name: str, slots: dict[str, Any] | None = None, *,
               methods: dict[str, str] | None = None, delete: list[str] | None = None,
               expected_version: int | None = None) -> Proto:
        """Change several slots/methods at once: all are validated before any applies."""
        slots, methods, delete = dict(slots or {}), dict(methods or {}), list(delete or [])
        for key in list(slots) + list(methods):
            Proto._check_slot_name(key)
        compiled = {k: compile_method(k, src) for k, src in methods.items()}
        with self._lock:
            proto = self.get(name)
            if expected_version is not None and expected_version != proto._version:
                raise ProtoError(f"proto {name!r} is at version {proto._version}, not "
                                 f"{expected_version}: reload it and try again")
            for key in delete:
                if key not in proto._slots and key not in proto._methods:
                    raise ProtoError(f"proto {name!r} has no own slot {key!r} to delete")
            for key in delete:
                proto._slots.pop(key, None)
                proto._methods.pop(key, None)
                proto._compiled.pop(key, None)
            # replace the dict rather than mutating it, so an image snapshot
            # taken earlier keeps its consistent view
            object.__setattr__(proto, "_slots", {**proto._slots, **slots})
            for key, src in methods.items():
                new_methods = {**proto._methods, key: textwrap.dedent(src)}
                object.__setattr__(proto, "_methods", new_methods)
                proto._compiled[key] = compiled[key]
            object.__setattr__(proto, "_version", proto._version + 1)
            self._changed(proto, "updated", list(slots) + list(methods) + delete)
        return proto

    def set_parent(self, name: str, parent: str | None) -> Proto:
        with self._lock:
            proto = self.get(name)
            new_parent = self.get(parent) if parent else None
            p = new_parent
            while p is not None:
                if p is proto:
                    raise ProtoError(f"making {parent!r} the parent of {name!r} creates a cycle")
                p = p._parent
            object.__setattr__(proto, "_parent", new_parent)
            object.__setattr__(proto, "_version", proto._version + 1)
            self._changed(proto, "updated", ["parent"])
            return proto

    def remove(self, name: str) -> None:
        with self._lock:
            proto = self.get(name)
            children = [p._name for p in self._protos.values() if p._parent is proto]
            if children:
                raise ProtoError(f"cannot remove {name!r}: {children} delegate to it")
            del self._protos[name]
            object.__setattr__(proto, "_manager", None)
            self._changed(proto, "removed", [])

    def _changed(self, proto: Proto, change: str, keys: list[str]) -> None:
        self._dirty = True
        if change == "removed":
            self._image.pop(proto._name, None)
        else:
            self._image[proto._name] = self._state_of(proto)
        if self._bus is not None:
            self._bus.publish("proto.changed", {"name": proto._name, "change": change,
                                                "keys": keys, "version": proto._version})

    # -- image -------------------------------------------------------------------
    @staticmethod
    def _state_of(p: Proto) -> dict[str, Any]:
        return {"slots": p._slots, "methods": p._methods, "version": p._version,
                "parent": p._parent._name if p._parent else None}

    def image_state(self) -> dict[str, Any]:
        """A consistent copy: one shallow dict copy under the lock, no serialising.

        Slot and method dicts are replaced (never mutated) by :meth:`update`, and so
        are the per-proto state entries, so holding references is a stable snapshot.
        """
        with self._lock:
            return dict(self._image)

    def restore_image(self, state: dict[str, Any]) -> None:
        """Replace every proto with those in ``state`` (parents resolved by name)."""
        with self._lock:
            protos: dict[str, Proto] = {}
            for name, st in state.items():
                p = Proto(name, st["slots"])
                object.__setattr__(p, "_methods", dict(st["methods"]))
                object.__setattr__(p, "_version", st["version"])
                object.__setattr__(p, "_manager", self)
                protos[name] = p
            for name, st in state.items():
                parent = st.get("parent")
                if parent:
                    if parent not in protos:
                        raise ProtoError(f"image: proto {name!r} names missing parent {parent!r}")
                    object.__setattr__(protos[name], "_parent", protos[parent])
            self._protos = protos
            self._image = {n: self._state_of(p) for n, p in protos.items()}
            self._dirty = False

    def __getstate__(self) -> dict[str, Any]:
        # locks, the bus and runtime services never travel (an acquired lock would
        # come back acquired)
        return {"protos": self.image_state()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.restore_image(state["protos"])
