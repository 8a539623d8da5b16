"""Protos: Self-style prototype objects, and the ProtoManager that owns them.

A proto has named slots, an optional parent it delegates to (a slot or method missing
here is looked up on the parent, with ``self`` still the receiver), and live methods
whose source is kept as text and compiled, so a method can be edited while the system
runs. The ProtoManager is the only writer: it locks, bumps a per-proto version and
publishes ``proto.changed`` for every change.

Live editing cannot wedge or poison the system:

* **No code runs while an edit is checked.** A method must be one plain ``def`` with
  ``self`` first, no decorators and only literal default values (annotations are
  kept as text), so compiling it runs nothing of the user's (:func:`compile_method`).
* **Slot values are checked before they apply**: nesting depth and (estimated) size
  (:func:`check_slot_value`), and, for personas (protos delegating to ``persona``),
  a typed schema of the slots the graph relies on (:data:`PERSONA_SLOTS`): essential
  ones cannot be deleted, and a user edit of ``model_name`` must name a model the
  backend has. A refused edit changes nothing, not even the version.
* **Method calls from the graph and the services run under a watchdog**
  (:class:`MethodWatchdog`): a call over its budget is abandoned (the caller gets
  :class:`MethodTimeout`), the method is marked faulted so later calls fail at once
  with the reason, and :meth:`ProtoManager.revert_method` puts back the previous
  source (the last few are kept, in the image).

Errors::

    ProtoError (ValueError)      an operation was refused; the message says what to do
      MethodFault                a live method could not be run
        MethodTimeout            this call went over its budget and was abandoned
        MethodFaulted            the method was abandoned before; revert or fix it
"""
from __future__ import annotations

import __future__
import ast
import contextvars
import copy
import ctypes
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import values

if TYPE_CHECKING:
    from .events import EventBus

_INTERNAL = ("_name", "_slots", "_parent", "_methods", "_compiled", "_version", "_manager",
             "_method_history", "_faults")
PERSONA_BASE = "persona"
MAX_METHOD_SOURCE = 65_536
DEFAULT_MAX_SLOT_BYTES = 262_144
DEFAULT_MAX_SLOT_DEPTH = 32


class ProtoError(ValueError):
    """A proto operation was refused; the message says why and what to do."""


class MethodFault(ProtoError):
    """A live method could not be run (see MethodTimeout, MethodFaulted)."""


class MethodTimeout(MethodFault):
    """The call went over its budget and was abandoned."""


class MethodFaulted(MethodFault):
    """The method was abandoned earlier; it fails at once until reverted or edited."""


class MethodAbandoned(BaseException):
    """Raised inside an abandoned method's thread to stop it (not an Exception, so a
    bare ``except Exception`` in the method does not swallow it)."""


# -- checking a method without running it ---------------------------------------------

def _literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def check_method_source(name: str, source: str) -> ast.Module:
    """Parse and check ``source`` without running anything; raises ProtoError.

    The restricted form: exactly one plain ``def name(self, ...)``; no decorators
    (they run at definition time); default values only literals (numbers, strings,
    tuples/lists/dicts of literals...), since defaults are evaluated at definition
    time too; annotations are compiled as text, never evaluated."""
    if not isinstance(source, str) or not source.strip():
        raise ProtoError(f"method {name!r}: source must be non-empty text")
    if len(source) > MAX_METHOD_SOURCE:
        raise ProtoError(f"method {name!r}: source is {len(source)} characters; the limit is "
                         f"{MAX_METHOD_SOURCE}")
    source = textwrap.dedent(source)
    try:
        tree = ast.parse(source, filename=f"<method {name}>")
    except SyntaxError as e:
        raise ProtoError(f"method {name!r}: syntax error at line {e.lineno}: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise ProtoError(f"method {name!r}: cannot be parsed ({type(e).__name__}: {e})") from None
    fn = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(fn, ast.FunctionDef) or fn.name != name:
        kind = "an async def" if isinstance(fn, ast.AsyncFunctionDef) else "anything else"
        raise ProtoError(f"method {name!r}: source must be a single 'def {name}(self, ...)', "
                         f"not {kind}")
    if fn.decorator_list:
        raise ProtoError(f"method {name!r}: decorators are not allowed (they would run when "
                         "the method is checked); call the helper inside the body instead")
    params = fn.args.posonlyargs + fn.args.args
    if not params or params[0].arg != "self":
        raise ProtoError(f"method {name!r}: the first parameter must be self")
    for default in [*fn.args.defaults, *(d for d in fn.args.kw_defaults if d is not None)]:
        if not _literal(default):
            raise ProtoError(
                f"method {name!r}: default value at line {default.lineno} is not a literal "
                "(defaults are evaluated when the method is defined); use None and compute "
                "the value in the body")
    return tree


def compile_method(name: str, source: str) -> Callable[..., Any]:
    """Compile ``source`` (one plain ``def name(self, ...)``) into a function.

    Runs only the ``def`` statement itself, which :func:`check_method_source` has made
    free of user code. Raises ProtoError with the reason (line number for syntax)."""
    tree = check_method_source(name, source)
    try:
        code = compile(tree, f"<method {name}>", "exec",
                       flags=__future__.annotations.compiler_flag, dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ProtoError(f"method {name!r}: does not compile ({type(e).__name__}: {e})") from None
    namespace: dict[str, Any] = {"__name__": f"a4ps.proto.live.{name}"}
    exec(code, namespace)  # defines the function; no decorator or default runs user code
    fn: Callable[..., Any] = namespace[name]
    return fn


# -- checking a slot value -------------------------------------------------------------

def check_slot_value(key: str, value: Any, *, max_bytes: int = DEFAULT_MAX_SLOT_BYTES,
                     max_depth: int = DEFAULT_MAX_SLOT_DEPTH) -> int:
    """Refuse a value nested deeper than ``max_depth`` or larger than ``max_bytes``
    (estimated: text and bytes by length, numbers 8, containers 16 plus contents).
    Walks iteratively, stopping at the first limit, so a cyclic or absurd value costs
    at most ``max_bytes / 8`` steps. Returns the estimate."""
    size = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if v is None or isinstance(v, (bool, float)):
            size += 8
        elif isinstance(v, int):
            size += 8 + v.bit_length() // 8
        elif isinstance(v, (str, bytes, bytearray)):
            size += 16 + len(v)
        elif isinstance(v, dict):
            if depth + 1 > max_depth:
                raise ProtoError(f"slot {key!r}: value is nested deeper than {max_depth} "
                                 "levels (protos.max_slot_depth)")
            size += 16
            for k, item in v.items():
                stack.append((k, depth + 1))
                stack.append((item, depth + 1))
        elif isinstance(v, (list, tuple, set, frozenset)):
            if depth + 1 > max_depth:
                raise ProtoError(f"slot {key!r}: value is nested deeper than {max_depth} "
                                 "levels (protos.max_slot_depth)")
            size += 16
            stack.extend((item, depth + 1) for item in v)
        else:          # a proto, or an in-process object: counted, not walked
            size += 64
        if size > max_bytes:
            raise ProtoError(f"slot {key!r}: value is larger than {max_bytes} bytes "
                             "(protos.max_slot_bytes); keep big data in memory or a file")
    return size


class PersonaSlots(BaseModel):
    """Types of the persona slots the graph, the models and the UI rely on (strict:
    ``"0.7"`` is not a temperature). Other slots are free. A slot left unset is None here:
    only the values present are validated (None is never a value a persona may hold
    for an essential slot: :func:`_check_persona_values` refuses it first)."""
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str | None = Field(None, min_length=1, max_length=200)
    system_prompt: str | None = Field(None, min_length=1, max_length=100_000)
    model_name: str | None = Field(None, min_length=1, max_length=1000)
    model_backend: str | None = Field(None, min_length=1, max_length=64)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=64)
    stop: list[str] | None = Field(None, max_length=16)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    model_lineage: list[Any] | None = Field(None)


PERSONA_SLOTS = tuple(PersonaSlots.model_fields)
# a persona must keep these resolving (own or inherited): the graph reads them every turn
ESSENTIAL_PERSONA_SLOTS = ("role", "system_prompt", "model_name", "temperature")


def _check_persona_values(proto_name: str, values: dict[str, Any]) -> None:
    present = {k: v for k, v in values.items() if v is not _MISSING}
    nulls = [k for k, v in present.items() if v is None and k in ESSENTIAL_PERSONA_SLOTS]
    if nulls:
        raise ProtoError(f"{proto_name}.{nulls[0]} cannot be None: the persona needs it")
    for k, v in present.items():
        if k == "stop" and isinstance(v, list):
            bad = [x for x in v if not isinstance(x, str) or not 0 < len(x) <= 200]
            if bad:
                raise ProtoError(f"{proto_name}.stop: each stop string must be 1-200 characters")
    try:
        PersonaSlots.model_validate({k: v for k, v in present.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ProtoError(f"{proto_name}.{loc}: {err['msg']} (got {err.get('input')!r:.80})") from None


_MISSING = object()


def _effective(p: Proto, key: str, changed: Proto | None = None,
               changed_slots: dict[str, Any] | None = None) -> Any:
    """``key`` as ``p`` sees it along its parents, with ``changed`` holding
    ``changed_slots`` instead of its own (a change being checked); _MISSING if none."""
    q: Proto | None = p
    while q is not None:
        own = changed_slots if q is changed and changed_slots is not None else q._slots
        if key in own:
            return own[key]
        q = q._parent
    return _MISSING


def _delegates_to(p: Proto, ancestor: Proto) -> bool:
    q = p._parent
    while q is not None:
        if q is ancestor:
            return True
        q = q._parent
    return False


# -- the watchdog over live method calls -----------------------------------------------

class _Watch:
    """One watched call: how long it ran, how much of that inside services."""
    __slots__ = ("label", "started", "service_s", "in_service_since", "abandoned", "ident")

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.service_s = 0.0
        self.in_service_since: float | None = None
        self.abandoned = False
        self.ident: int | None = None

    def own_s(self, now: float) -> float:
        inside = now - self.in_service_since if self.in_service_since is not None else 0.0
        return now - self.started - self.service_s - inside


_WATCH: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar("a4ps_method_watch",
                                                                       default=None)


class _ServiceProxy:
    """A runtime part as seen from a watched method: time spent in its calls is not the
    method's own time, and an abandoned method stops at its next service call."""

    def __init__(self, part: Any, watch: _Watch) -> None:
        object.__setattr__(self, "_part", part)
        object.__setattr__(self, "_watch", watch)

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._part, attr)
        if not callable(value):
            return value
        watch = self._watch

        def call(*args: Any, **kwargs: Any) -> Any:
            if watch.abandoned:
                raise MethodAbandoned(watch.label)
            t0 = watch.in_service_since = time.monotonic()
            try:
                return value(*args, **kwargs)
            finally:
                watch.service_s += time.monotonic() - t0
                watch.in_service_since = None
                if watch.abandoned:
                    raise MethodAbandoned(watch.label)
        return call


def _raise_in(ident: int) -> bool:
    """Ask the interpreter to raise MethodAbandoned in thread ``ident`` (it lands at
    the thread's next bytecode; a blocking C call finishes first)."""
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                   ctypes.py_object(MethodAbandoned))
    return bool(n == 1)


class MethodWatchdog:
    """Runs live method calls on their own thread under two budgets: ``budget_s`` of
    the method's own time (time inside ``self.service(...)`` calls — models, memory,
    tools — does not count) and ``wall_budget_s`` in all. Over budget the caller gets
    :class:`MethodTimeout` at once, ``on_abandon(proto, method, reason)`` is told, and
    the method's thread is stopped with :class:`MethodAbandoned` as soon as it runs
    Python code of its own again. Calls made from inside a watched method run inline."""

    def __init__(self, budget_s: float = 10.0, wall_budget_s: float = 600.0,
                 on_abandon: Callable[[str, str, str], None] | None = None) -> None:
        self.budget_s = budget_s
        self.wall_budget_s = wall_budget_s
        self.on_abandon = on_abandon
        self._lock = threading.Lock()
        self._abandoned: list[tuple[_Watch, threading.Thread, str]] = []
        self.calls = 0

    @staticmethod
    def watching() -> bool:
        return _WATCH.get() is not None

    def call(self, proto: Proto, key: str, fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any], owner: Proto | None = None) -> Any:
        """``proto.key(*args, **kwargs)`` under the budgets; ``owner``: the proto that
        defines the method (a parent, when ``proto`` inherits it): it is the one that
        gets the fault and the revert."""
        if _WATCH.get() is not None:
            return fn(proto, *args, **kwargs)
        self.calls += 1
        owner = owner or proto
        watch = _Watch(f"{owner.name}.{key}")
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            watch.ident = threading.get_ident()
            _WATCH.set(watch)
            try:
                box["value"] = fn(proto, *args, **kwargs)
            except MethodAbandoned:
                box["abandoned"] = True
            except BaseException as e:  # noqa: BLE001 - handed to the caller as is
                box["error"] = e
            finally:
                done.set()

        thread = threading.Thread(target=contextvars.copy_context().run, args=(run,),
                                  name=f"a4ps-method-{watch.label}", daemon=True)
        thread.start()
        while not done.wait(0.05):
            now = time.monotonic()
            own, wall = watch.own_s(now), now - watch.started
            if own > self.budget_s or wall > self.wall_budget_s:
                reason = (f"{watch.label} was abandoned after {own:.1f} s in its own code "
                          f"(budget {self.budget_s:g} s, protos.method_budget_s)"
                          if own > self.budget_s else
                          f"{watch.label} was abandoned after {wall:.1f} s in all (budget "
                          f"{self.wall_budget_s:g} s, protos.method_wall_budget_s)")
                self._abandon(watch, thread, reason)
                raise MethodTimeout(f"{reason}; revert it with proto.revert_method "
                                    f"(name {owner.name!r}, method {key!r}) or fix its source")
        if "error" in box:
            raise box["error"]
        if box.get("abandoned"):
            raise MethodTimeout(f"{watch.label} was stopped")
        return box.get("value")

    def _abandon(self, watch: _Watch, thread: threading.Thread, reason: str) -> None:
        watch.abandoned = True
        with self._lock:
            self._abandoned.append((watch, thread, reason))
            self._abandoned = [a for a in self._abandoned if a[1].is_alive()][-50:]
        if watch.in_service_since is None and watch.ident is not None:
            _raise_in(watch.ident)
        threading.Thread(target=self._reap, args=(watch, thread), daemon=True,
                         name=f"a4ps-reaper-{watch.label}").start()
        owner, _, method = watch.label.partition(".")
        if self.on_abandon is not None:
            try:
                self.on_abandon(owner, method, reason)
            except Exception:  # noqa: BLE001 - recording the fault must not hide the timeout
                import logging
                logging.getLogger(__name__).exception("recording the fault of %s failed",
                                                      watch.label)

    @staticmethod
    def _reap(watch: _Watch, thread: threading.Thread) -> None:
        """Keep stopping a method that catches MethodAbandoned and carries on."""
        for _ in range(60):
            thread.join(0.5)
            if not thread.is_alive():
                return
            if watch.in_service_since is None and watch.ident is not None:
                _raise_in(watch.ident)

    def status(self) -> dict[str, Any]:
        with self._lock:
            running = [{"method": w.label, "reason": r} for w, t, r in self._abandoned
                       if t.is_alive()]
        return {"budget_s": self.budget_s, "wall_budget_s": self.wall_budget_s,
                "calls": self.calls, "abandoned_still_running": running}


class Proto:
    """A prototype object. Read slots as attributes; write through the manager."""

    # set in __init__ through object.__setattr__ (attribute writes go to the manager);
    # declared here so a reader, and the type checker, see what a Proto holds
    _name: str
    _slots: dict[str, Any]
    _parent: Proto | None
    _methods: dict[str, str]
    _compiled: dict[str, Callable[..., Any]]
    _version: int
    _manager: ProtoManager | None
    _method_history: dict[str, list[str | None]]
    _faults: dict[str, str]

    def __init__(self, name: str, slots: dict[str, Any] | None = None,
                 parent: Proto | None = None, methods: dict[str, str] | None = None):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_slots", dict(slots or {}))
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_methods", {})
        object.__setattr__(self, "_compiled", {})
        object.__setattr__(self, "_version", 0)
        object.__setattr__(self, "_manager", None)
        # method -> earlier sources, oldest first (None: it was not defined here)
        object.__setattr__(self, "_method_history", {})
        # method -> why the watchdog abandoned it (calls fail at once until it changes)
        object.__setattr__(self, "_faults", {})
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
        kind, value, owner = self.lookup(key)
        if kind != "method":
            return value
        fault = owner._faults.get(key)
        if fault is not None:
            return _faulted(owner._name, key, fault)
        watchdog = self._manager.watchdog if self._manager is not None else None
        if watchdog is None:
            return value.__get__(self)  # bound to the receiver, not the owner
        receiver = self

        def watched(*args: Any, **kwargs: Any) -> Any:
            return watchdog.call(receiver, key, value, args, kwargs, owner)
        watched.__name__ = key
        return watched

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
        """A runtime part (models, memory, bus...) from the owning manager. Inside a
        watched method call, time spent in the part's calls is not the method's."""
        if self._manager is None:
            raise ProtoError(f"proto {self._name!r} is not attached to a ProtoManager")
        part = self._manager.service(name)
        watch = _WATCH.get()
        return part if watch is None else _ServiceProxy(part, watch)

    def faults(self) -> dict[str, str]:
        return dict(self._faults)

    # -- mutation (through the manager when attached) ----------------------------
    def set_slot(self, key: str, value: Any) -> None:
        if self._manager is not None:
            self._manager.update(self._name, {key: value})
        else:
            self._check_slot_name(key)
            check_slot_value(key, value)
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
                "methods": self._methods, "version": self._version,
                "method_history": self._method_history, "faults": self._faults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "_name", state["name"])
        object.__setattr__(self, "_slots", state["slots"])
        object.__setattr__(self, "_parent", state["parent"])
        object.__setattr__(self, "_methods", state["methods"])
        object.__setattr__(self, "_compiled", {})
        object.__setattr__(self, "_version", state["version"])
        object.__setattr__(self, "_manager", None)
        object.__setattr__(self, "_method_history", dict(state.get("method_history") or {}))
        object.__setattr__(self, "_faults", dict(state.get("faults") or {}))

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
            # what the inspector can offer: revert (how many earlier versions), faults
            "method_history": {k: len(v) for k, v in self._method_history.items() if v},
            "method_faults": dict(self._faults),
        }


def _faulted(owner: str, key: str, fault: str) -> Callable[..., Any]:
    def faulted(*_a: Any, **_k: Any) -> Any:
        raise MethodFaulted(f"{owner}.{key} is disabled: {fault}; revert it with "
                            f"proto.revert_method (name {owner!r}, method {key!r}) or edit it")
    faulted.__name__ = key
    return faulted


def plain(value: Any) -> Any:
    """A slot value as msgpack-friendly data for the wire and the inspector: the one
    reducer (:func:`a4ps.values.plain`) with the inspector's extra, a proto becomes a
    reference ``{"$proto": name}``. Nesting deeper than 64 levels (only an image from
    before the slot checks can hold that) is cut, so listing such a proto never fails."""
    return values.plain(value, ref=_proto_ref)


def _proto_ref(value: Any) -> dict[str, str] | None:
    return {"$proto": value.name} if isinstance(value, Proto) else None


class ProtoManager:
    """The only writer of protos: thread-safe, versioned, publishing ``proto.changed``."""

    def __init__(self, bus: EventBus | None = None, *,
                 max_slot_bytes: int = DEFAULT_MAX_SLOT_BYTES,
                 max_slot_depth: int = DEFAULT_MAX_SLOT_DEPTH, method_history: int = 5,
                 watchdog: MethodWatchdog | None = None) -> None:
        self._lock = threading.RLock()
        self._protos: dict[str, Proto] = {}
        self._bus = bus
        self._services: dict[str, Any] = {}
        self.max_slot_bytes = max_slot_bytes
        self.max_slot_depth = max_slot_depth
        self.method_history = method_history
        # live method calls run under it (None: called directly, e.g. in unit tests)
        self.watchdog = watchdog
        if watchdog is not None and watchdog.on_abandon is None:
            watchdog.on_abandon = self.record_fault
        # changes counted, and the count the last successful save covered: the image
        # is dirty until a save that started after the last change has succeeded
        self._changes = 0
        self._clean_at = 0
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
        return self._changes != self._clean_at

    @property
    def change_mark(self) -> int:
        """Take this *before* reading :meth:`image_state` for a save; pass it to
        :meth:`mark_clean` once that save is on disk."""
        return self._changes

    def mark_clean(self, mark: int | None = None) -> None:
        """The image on disk holds every change up to ``mark`` (default: all)."""
        self._clean_at = self._changes if mark is None else mark

    # -- writing -------------------------------------------------------------------
    def create(self, name: str, slots: dict[str, Any] | None = None, parent: str | None = None,
               methods: dict[str, str] | None = None) -> Proto:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ProtoError(f"proto name {name!r} must be letters, digits, '_', '-' or '.'")
        for key in slots or {}:
            Proto._check_slot_name(key)
        self._check_values(slots or {})
        with self._lock:
            if name in self._protos:
                raise ProtoError(f"a proto named {name!r} already exists")
            parent_proto = self.get(parent) if parent else None
            if self._is_persona(name, parent_proto) and slots:
                _check_persona_values(name, {k: v for k, v in slots.items()
                                             if k in PERSONA_SLOTS})
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
               expected_version: int | None = None, origin: str = "system") -> Proto:
        """Change several slots/methods at once: all are checked before any applies,
        and a refused change leaves the proto exactly as it was.

        ``origin="user"`` (an inspector edit) also checks that a new ``model_name``
        names a model the backend has; the system's own updates (start-up repair, a
        fine-tune swap) are trusted with that."""
        if not isinstance(slots or {}, dict) or not isinstance(methods or {}, dict):
            raise ProtoError("slots and methods must be maps of name -> value / source")
        if not isinstance(delete or [], (list, tuple)):
            raise ProtoError("delete must be a list of slot or method names")
        slots, methods, delete = dict(slots or {}), dict(methods or {}), list(delete or [])
        for key in list(slots) + list(methods):
            Proto._check_slot_name(key)
        for key in delete:
            if not isinstance(key, str):
                raise ProtoError(f"cannot delete {key!r}: names are strings")
        self._check_values(slots)
        compiled = {k: compile_method(k, src) for k, src in methods.items()}
        with self._lock:
            proto = self.get(name)
            if expected_version is not None and expected_version != proto._version:
                raise ProtoError(f"proto {name!r} is at version {proto._version}, not "
                                 f"{expected_version}: reload it and try again")
            for key in delete:
                if key not in proto._slots and key not in proto._methods:
                    raise ProtoError(f"proto {name!r} has no own slot {key!r} to delete")
            new_slots = {k: v for k, v in proto._slots.items() if k not in delete}
            new_slots.update(slots)
            self._check_persona_change(proto, new_slots, set(slots) | set(delete))
            if origin == "user" and "model_name" in slots \
                    and slots["model_name"] != proto._slots.get("model_name"):
                self._check_model_name(name, slots["model_name"])
            # everything is checked: apply. Dicts are replaced rather than mutated, so
            # an image snapshot taken earlier keeps its consistent view
            history = dict(proto._method_history)
            for key in delete:
                if key in proto._methods:
                    history[key] = self._remember(history.get(key), proto._methods[key])
            new_methods = {k: v for k, v in proto._methods.items() if k not in delete}
            for key, src in methods.items():
                src = textwrap.dedent(src)
                if proto._methods.get(key) != src:      # re-saving the same source: no entry
                    history[key] = self._remember(history.get(key), proto._methods.get(key))
                new_methods[key] = src
            faults = {k: v for k, v in proto._faults.items()
                      if k not in methods and k not in delete}
            object.__setattr__(proto, "_slots", new_slots)
            object.__setattr__(proto, "_methods", new_methods)
            object.__setattr__(proto, "_method_history", history)
            object.__setattr__(proto, "_faults", faults)
            compiled_now = {k: f for k, f in proto._compiled.items() if k not in delete}
            compiled_now.update(compiled)
            object.__setattr__(proto, "_compiled", compiled_now)
            object.__setattr__(proto, "_version", proto._version + 1)
            self._changed(proto, "updated", list(slots) + list(methods) + delete)
        return proto

    def _remember(self, past: list[str | None] | None, source: str | None) -> list[str | None]:
        return ([*(past or []), source])[-self.method_history:]

    def revert_method(self, name: str, method: str,
                      expected_version: int | None = None) -> Proto:
        """Put back the method's previous source (or remove the proto's own method when
        it did not have one before, so the inherited one applies again). Clears a
        fault. The reverted-from source is not kept: reverting again goes further back."""
        with self._lock:
            proto = self.get(name)
            if expected_version is not None and expected_version != proto._version:
                raise ProtoError(f"proto {name!r} is at version {proto._version}, not "
                                 f"{expected_version}: reload it and try again")
            past = list(proto._method_history.get(method) or [])
            if not past:
                raise ProtoError(f"{name}.{method} has no earlier version to revert to"
                                 + ("; edit it or delete it instead" if method in proto._methods
                                    else ""))
            previous = past.pop()
            methods = dict(proto._methods)
            compiled = dict(proto._compiled)
            if previous is None:
                methods.pop(method, None)
                compiled.pop(method, None)
            else:
                compiled[method] = compile_method(method, previous)
                methods[method] = previous
            history = {**proto._method_history, method: past}
            if not past:
                del history[method]
            object.__setattr__(proto, "_methods", methods)
            object.__setattr__(proto, "_compiled", compiled)
            object.__setattr__(proto, "_method_history", history)
            object.__setattr__(proto, "_faults", {k: v for k, v in proto._faults.items()
                                                  if k != method})
            object.__setattr__(proto, "_version", proto._version + 1)
            self._changed(proto, "updated", [method])
        return proto

    def record_fault(self, name: str, method: str, reason: str) -> None:
        """The watchdog abandoned ``name.method``: later calls fail at once with
        ``reason`` until the method is edited or reverted (kept in the image)."""
        with self._lock:
            proto = self.find(name)
            if proto is None or method not in proto._methods:
                return
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            object.__setattr__(proto, "_faults", {**proto._faults, method: f"{reason} ({stamp})"})
            object.__setattr__(proto, "_version", proto._version + 1)
            self._changed(proto, "updated", [method])

    # -- checks -------------------------------------------------------------------
    def _check_values(self, slots: dict[str, Any]) -> None:
        for key, value in slots.items():
            check_slot_value(key, value, max_bytes=self.max_slot_bytes,
                             max_depth=self.max_slot_depth)

    def _is_persona(self, name: str, parent: Proto | None) -> bool:
        if name == PERSONA_BASE:
            return True
        p = parent
        while p is not None:
            if p._name == PERSONA_BASE:
                return True
            p = p._parent
        return False

    def _check_persona_change(self, proto: Proto, new_slots: dict[str, Any],
                              touched: set[str]) -> None:
        """Persona slots the change touches keep their types, and essential ones keep
        resolving, on this proto and on every persona delegating to it."""
        keys = [k for k in touched if k in PERSONA_SLOTS]
        if not keys:
            return
        affected = [proto] + [p for p in self._protos.values() if _delegates_to(p, proto)]
        for q in affected:
            if not self._is_persona(q._name, q._parent):
                continue
            for k in keys:
                if (k in ESSENTIAL_PERSONA_SLOTS and q._name != PERSONA_BASE
                        and _effective(q, k) is not _MISSING
                        and _effective(q, k, proto, new_slots) is _MISSING):
                    raise ProtoError(f"{q._name}.{k} cannot be deleted: the persona needs it "
                                     "(set a new value instead)")
            _check_persona_values(q._name, {k: _effective(q, k, proto, new_slots)
                                            for k in keys})

    def _check_model_name(self, proto_name: str, model: Any) -> None:
        if not isinstance(model, str) or not model:
            return   # the type check reports it
        models = self._services.get("models")
        backend = getattr(models, "backend", None)
        if backend is None:
            return
        try:
            backend.estimate_bytes(model)
        except Exception as e:
            raise ProtoError(f"{proto_name}.model_name: {e}") from None
        base, sep, adapter = model.partition("+lora:")
        if sep and not Path(adapter).is_dir():
            raise ProtoError(f"{proto_name}.model_name: adapter directory {adapter} does not "
                             "exist (see `a4ps models lineage`)")

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
        self._changes += 1
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
        state = {"slots": p._slots, "methods": p._methods, "version": p._version,
                 "parent": p._parent._name if p._parent else None}
        if p._method_history:
            state["method_history"] = p._method_history
        if p._faults:
            state["faults"] = p._faults
        return state

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
                object.__setattr__(p, "_method_history", dict(st.get("method_history") or {}))
                object.__setattr__(p, "_faults", dict(st.get("faults") or {}))
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
            self._clean_at = self._changes

    def __getstate__(self) -> dict[str, Any]:
        # locks, the bus and runtime services never travel (an acquired lock would
        # come back acquired)
        return {"protos": self.image_state()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(self)   # a fresh manager (locks, services) before the protos
        self.restore_image(state["protos"])
