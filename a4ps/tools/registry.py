"""The live tool registry: forged tools are protos in the image.

A tool ``mean`` is the proto ``tool.mean`` (parent proto ``tool``) with slots name,
description, signature, spec, source, tests, version, created_by, test_results and
created_at. Forging an existing name keeps the old proto as ``tool.mean.v1`` and moves
``tool.mean`` to version 2 only once the new version has passed its tests, so the old
one stays callable until then. The source is mirrored as plain data files to
``<data_dir>/tools/<name>.py`` for people to read: not a package, not on any import
path, never imported; the image is the source of truth. Calling a tool runs it in the
same sandbox the forge tests in: a forged tool never runs on the host.

:meth:`ToolRegistry.match` finds the tool a request needs (its name, then the
embedding of its description, and parameters that fit the arguments), so a capability
is forged once and then called.
"""
from __future__ import annotations

import builtins
import ast
import keyword
import logging
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..events import json_safe
from .sandbox import SandboxError

if TYPE_CHECKING:
    from a4ps.config import Settings
    from a4ps.events import EventBus
    from a4ps.proto import Proto, ProtoManager
    from a4ps.models.embeddings import Embedder
    from a4ps.tools.sandbox import SandboxRunner

log = logging.getLogger(__name__)

TOOL_PARENT = "tool"
TOOL_MODULE = "tool"                 # the tool's file inside the sandbox: tool.py
# where earlier versions mirrored tool source, inside the package (moved out on sync)
LEGACY_TOOLS_DIR = Path(__file__).resolve().parent / "dynamic_tools"
_MIRROR_HEADER = "# Forged tool "
_CURRENT = re.compile(r"^tool\.([A-Za-z_][A-Za-z0-9_]*)$")
_OLD = re.compile(r"^tool\.([A-Za-z_][A-Za-z0-9_]*)\.v(\d+)$")


class ToolError(RuntimeError):
    """Base of the registry's errors."""


class ToolNotFound(ToolError, LookupError):
    """No tool by that name."""


class ToolCallError(ToolError):
    """A tool call failed; ``stderr`` holds the sandbox's traceback, if any."""

    def __init__(self, message: str, stderr: str = "", result: Any = None) -> None:
        super().__init__(message + (f"\n{stderr.strip()[-2000:]}" if stderr.strip() else ""))
        self.stderr = stderr
        self.result = result


def tool_name(raw: str) -> str:
    """A Python identifier for a requested tool name ("Mean Calc" -> "mean_calc")."""
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", str(raw or "").strip()).strip("_").lower()
    if not name:
        raise ValueError(f"tool name {raw!r} has no letters or digits")
    if name[0].isdigit():
        name = "t_" + name
    if keyword.iskeyword(name) or name in (TOOL_MODULE, "test_" + TOOL_MODULE):
        name += "_tool"
    return name


class ToolInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "any"
    description: str = ""


class ToolExample(BaseModel):
    """One call: ``args`` and (if known) the expected ``result``."""

    model_config = ConfigDict(extra="ignore")
    args: dict[str, Any] = Field(default_factory=dict)
    result: Any = None

    @property
    def has_result(self) -> bool:
        return "result" in self.model_fields_set


class ToolSpec(BaseModel):
    """What a tool should do, as BRICK (or a person) asks for it."""

    model_config = ConfigDict(extra="ignore")
    name: str
    description: str
    inputs: dict[str, ToolInput] = Field(default_factory=dict)
    output_type: str = "any"
    examples: list[ToolExample] = Field(default_factory=list)

    @field_validator("name", mode="before")
    @classmethod
    def _identifier(cls, v: Any) -> str:
        return tool_name(v)

    @field_validator("description")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("a tool needs a description of what it does")
        return v.strip()

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        if isinstance(v, dict):   # {"x": "float"} is short for {"x": {"type": "float"}}
            return {k: ({"type": t} if isinstance(t, str) else t) for k, t in v.items()}
        return v


def _function_def(source: str, name: str) -> ast.FunctionDef | None:
    """The top-level ``def name`` in ``source`` (None when absent or unparsable)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    return next((node for node in tree.body
                 if isinstance(node, ast.FunctionDef) and node.name == name), None)


def signature_of(source: str, name: str) -> str:
    """``name(a: float, b: int = 2) -> float`` from the source's top-level def."""
    node = _function_def(source, name)
    if node is None:
        return f"{name}(...)"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{name}({ast.unparse(node.args)}){ret}"


@runtime_checkable
class ToolLookup(Protocol):
    """The tool seam the graph uses: find a tool that serves a request, call it
    (:class:`ToolRegistry` implements it)."""

    def match(self, name: str | None, description: str | None,
              args: dict[str, Any] | None = None) -> dict[str, Any] | None: ...

    def call(self, name: str, args: dict[str, Any] | None = None, *,
             version: int | None = None, timeout: float | None = None) -> Any: ...


class ToolCatalog(ToolLookup, Protocol):
    """A tool seam that can also list its tools and give one's proto (the graph's
    tool menu uses it when the registry offers it; :class:`ToolRegistry` does)."""

    def list(self) -> builtins.list[dict[str, Any]]: ...

    def get(self, name: str) -> Proto: ...


class ToolRegistry:
    """Forged tools as protos; :meth:`call` runs one in the sandbox."""

    def __init__(self, protos: ProtoManager, settings: Settings, bus: EventBus | None = None,
                 embedder: Embedder | None = None, sandbox: SandboxRunner | None = None, *,
                 tools_dir: str | Path | None = None) -> None:
        self.protos = protos
        self.settings = settings
        self.bus = bus
        self.embedder = embedder
        self.sandbox = sandbox
        self.tools_dir = Path(tools_dir) if tools_dir else Path(settings.tools_dir)
        self._lock = threading.RLock()
        self._vectors: dict[tuple[str, int, str], Any] = {}

    # -- reading ----------------------------------------------------------------------
    def _current(self) -> builtins.list[Proto]:
        return sorted((p for p in self.protos if _CURRENT.match(p.name)), key=lambda p: p.name)

    def get(self, name: str) -> Proto:
        """The current version of tool ``name`` (raises ToolNotFound)."""
        try:
            key = tool_name(name)
        except ValueError:
            raise ToolNotFound(f"no tool named {name!r}") from None
        proto = self.protos.find(f"tool.{key}")
        if proto is None:
            known = ", ".join(p.name[5:] for p in self._current()) or "none yet"
            raise ToolNotFound(f"no tool named {name!r} (tools: {known}); forge it first")
        return proto

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except ToolNotFound:
            return False

    def versions(self, name: str) -> builtins.list[int]:
        key = tool_name(name)
        old = [int(m.group(2)) for p in self.protos
               if (m := _OLD.match(p.name)) and m.group(1) == key]
        cur = self.protos.find(f"tool.{key}")
        return sorted(old + ([int(_s(cur, "version", 1))] if cur is not None else []))

    def get_version(self, name: str, version: int) -> Proto:
        key = tool_name(name)
        cur = self.protos.find(f"tool.{key}")
        if cur is not None and int(_s(cur, "version", 1)) == version:
            return cur
        old = self.protos.find(f"tool.{key}.v{version}")
        if old is None:
            raise ToolNotFound(f"tool {key!r} has no version {version} (has {self.versions(key)})")
        return old

    def describe(self, proto: Proto) -> dict[str, Any]:
        results = _s(proto, "test_results") or {}
        return {"name": _s(proto, "name"), "description": _s(proto, "description"),
                "signature": _s(proto, "signature"), "version": _s(proto, "version"),
                "created_by": _s(proto, "created_by"), "created_at": _s(proto, "created_at"),
                "tests_passed": results.get("passed"), "tests_total": results.get("total"),
                "versions": self.versions(_s(proto, "name"))}

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every tool's current version, as plain data (wire, UI, CLI)."""
        return [self.describe(p) for p in self._current()]

    def find(self, query: str, k: int = 3) -> builtins.list[dict[str, Any]]:
        """The ``k`` tools whose descriptions are nearest ``query`` (best first).

        A query that is a tool's exact name ranks that tool first.
        """
        tools = self._current()
        if not tools or k <= 0:
            return []
        texts = [f"{_s(p, 'name')}: {_s(p, 'description')}" for p in tools]
        scores = self._similarities(str(query), tools, texts)
        try:
            exact = f"tool.{tool_name(query)}"
        except ValueError:
            exact = None
        ranked = sorted(zip(tools, scores), key=lambda ps: (ps[0].name != exact, -ps[1]))
        return [{**self.describe(p), "score": 1.0 if p.name == exact else round(float(s), 4)}
                for p, s in ranked[:k]]

    def _similarities(self, query: str, tools: builtins.list[Proto],
                      texts: builtins.list[str]) -> builtins.list[float]:
        if self.embedder is None:
            return [_overlap(query, t) for t in texts]
        try:
            import numpy as np
            with self._lock:
                missing = [(p, t) for p, t in zip(tools, texts)
                           if (p.name, p.version, t) not in self._vectors]
                if missing:
                    vecs = _embed(self.embedder, [t for _, t in missing])
                    for (p, t), vec in zip(missing, vecs):
                        self._vectors[(p.name, p.version, t)] = vec
                mat = np.stack([self._vectors[(p.name, p.version, t)] for p, t in zip(tools, texts)])
            q = _embed(self.embedder, [query])[0]
            mat = mat / (np.linalg.norm(mat, axis=1, keepdims=True) + 1e-12)
            q = q / (np.linalg.norm(q) + 1e-12)
            return [float(x) for x in mat @ q]
        except Exception:
            log.warning("tool search: embedding failed; using word overlap", exc_info=True)
            return [_overlap(query, t) for t in texts]

    def match(self, name: str | None, description: str | None,
              args: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The registered tool that serves a request, or None (then forge one).

        By name first (the requested name, exactly), then by the similarity of its
        description to the request's (``forge.reuse_similarity``); either way the
        tool's parameters must fit ``args`` (every argument known, nothing required
        missing). Returns :meth:`describe` plus ``how`` ("name" | "description") and
        ``score``.
        """
        args = dict(args or {})
        key = None
        if name:
            try:
                key = tool_name(name)
            except ValueError:
                key = None
        if key is not None:
            proto = self.protos.find(f"tool.{key}")
            if proto is not None and self._fits(proto, args):
                return {**self.describe(proto), "how": "name", "score": 1.0}
        text = (description or "").strip()
        if not text:
            return None
        threshold = float(self.settings.forge.reuse_similarity)
        for hit in self.find(text, k=5):
            if hit["score"] < threshold:
                break
            proto = self.protos.find(f"tool.{hit['name']}")
            if proto is not None and self._fits(proto, args):
                return {**hit, "how": "description"}
        return None

    @staticmethod
    def _fits(proto: Proto, args: dict[str, Any]) -> bool:
        params = parameters_of(_s(proto, "source") or "", _s(proto, "name"))
        if params is None:
            return False
        names, required, var_kw = params
        return (var_kw or set(args) <= set(names)) and all(r in args for r in required)

    # -- writing ----------------------------------------------------------------------
    def register(self, spec: Any, source: str, tests: str, created_by: str,
                 test_results: dict[str, Any] | None = None) -> Proto:
        """Add tool ``spec.name`` (a new version when it exists; the old one is kept)."""
        spec = spec if isinstance(spec, ToolSpec) else ToolSpec.model_validate(spec)
        name = spec.name
        slots = {"name": name, "description": spec.description,
                 "signature": signature_of(source, name),
                 "spec": spec.model_dump(mode="json"), "source": source, "tests": tests,
                 "created_by": created_by, "test_results": json_safe(test_results or {}),
                 "created_at": time.time()}
        with self._lock:
            if TOOL_PARENT not in self.protos:
                self.protos.create(TOOL_PARENT, {"kind": "tool"})
            current = self.protos.find(f"tool.{name}")
            if current is None:
                proto = self.protos.create(f"tool.{name}", {**slots, "version": 1}, parent=TOOL_PARENT)
            else:
                old_version = int(_s(current, "version", 1))
                keep = f"tool.{name}.v{old_version}"
                if keep not in self.protos:
                    self.protos.copy(current.name, keep)
                proto = self.protos.update(current.name, {**slots, "version": old_version + 1})
            self._mirror(name, source, proto)
        return proto

    def _mirror(self, name: str, source: str, proto: Proto) -> None:
        try:
            self.tools_dir.mkdir(parents=True, exist_ok=True)
            path = self.tools_dir / f"{name}.py"
            header = (f"{_MIRROR_HEADER}{name} v{_s(proto, 'version')} by {_s(proto, 'created_by')}."
                      f" The live image holds the source of truth; this copy is for reading.\n")
            tmp = path.with_suffix(".py.tmp")
            tmp.write_text(header + source if not source.startswith(_MIRROR_HEADER) else source,
                           encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            log.warning("could not mirror tool %s to %s", name, self.tools_dir, exc_info=True)

    def sync_files(self) -> int:
        """Rewrite every tool's mirror from the image (after a load); returns the count.

        Mirrors an earlier version wrote inside the package are moved out first.
        """
        self.move_legacy_mirrors()
        tools = self._current()
        for p in tools:
            self._mirror(_s(p, "name"), _s(p, "source") or "", p)
        return len(tools)

    def move_legacy_mirrors(self, legacy: Path = LEGACY_TOOLS_DIR) -> builtins.list[Path]:
        """Move tool mirrors out of the package (``a4ps/tools/dynamic_tools/``, where an
        importable package made them code the host could run) into
        ``<tools_dir>/from-package/``; remove the emptied directory. Returns the moves."""
        if not legacy.is_dir() or legacy.resolve() == self.tools_dir.resolve():
            return []
        moved = []
        dest = self.tools_dir / "from-package"
        for path in sorted(legacy.iterdir()):
            if path.name == "__pycache__" and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                continue
            if path.suffix not in (".py", ".tmp") or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
                if path.name == "__init__.py" and not text.startswith(_MIRROR_HEADER):
                    if len(text) < 400 and "def " not in text:   # the old package marker
                        path.unlink()
                    continue
                if not text.startswith(_MIRROR_HEADER):
                    continue
                dest.mkdir(parents=True, exist_ok=True)
                target = dest / path.name
                shutil.move(str(path), str(target))
                moved.append(target)
            except OSError:
                log.warning("could not move the legacy tool mirror %s", path, exc_info=True)
        try:
            legacy.rmdir()
        except OSError:
            pass
        if moved:
            log.info("moved %d tool mirror(s) out of the package into %s", len(moved), dest)
        return moved

    # -- calling ----------------------------------------------------------------------
    def call(self, name: str, args: dict[str, Any] | None = None, *,
             version: int | None = None, timeout: float | None = None) -> Any:
        """Run tool ``name`` (its current version, or ``version``) with ``args`` in the
        sandbox; its JSON-decoded result."""
        proto = self.get(name) if version is None else self.get_version(name, version)
        key = _s(proto, "name")
        args = dict(args or {})
        self._check_args(proto, args)
        if self.sandbox is None:
            raise ToolCallError(f"cannot call tool {key!r}: no sandbox configured")
        if not self.sandbox.available:
            raise ToolCallError(f"cannot call tool {key!r}: sandbox unavailable: {self.sandbox.reason}")
        try:
            res = self.sandbox.call(_s(proto, "source") or "", key, [args], timeout=timeout)
        except ValueError as e:
            raise ToolCallError(f"arguments for {key!r} must be JSON data: {e}") from None
        except SandboxError as e:
            raise ToolCallError(f"tool {key!r}: {e}") from e
        out = res.outputs[0] if res.outputs else None
        if res.import_error is not None:
            raise ToolCallError(f"tool {key!r} failed to load: {res.import_error.error}",
                                res.import_error.traceback + res.stderr)
        if out is None:
            why = f"limit hit: {res.limit_hit}" if res.limit_hit else f"exit {res.exit_code}"
            raise ToolCallError(f"tool {key!r} returned nothing ({why})", res.stderr)
        if res.problems:
            raise ToolCallError(f"tool {key!r}: {'; '.join(res.problems)}", res.stderr)
        if not out.ok:
            raise ToolCallError(f"tool {key!r} raised {out.error}", out.traceback + res.stderr)
        return out.value

    @staticmethod
    def _check_args(proto: Proto, args: dict[str, Any]) -> None:
        """Refuse arguments the tool's function cannot take, before starting a sandbox."""
        if not isinstance(args, dict):
            raise ToolCallError("tool arguments must be a mapping of name to value")
        params = parameters_of(_s(proto, "source") or "", _s(proto, "name"))
        if params is None:
            return
        names, required, var_kw = params
        unknown = sorted(set(args) - set(names)) if not var_kw else []
        missing = [n for n in required if n not in args]
        if unknown or missing:
            raise ToolCallError(
                f"tool {_s(proto, 'name')!r} is {_s(proto, 'signature')}: "
                + "; ".join(x for x in (f"unknown argument(s) {unknown}" if unknown else "",
                                        f"missing argument(s) {missing}" if missing else "") if x))


def parameters_of(source: str, name: str) -> tuple[list[str], list[str], bool] | None:
    """(keyword-passable names, required names, takes **kwargs) of ``def name``."""
    node = _function_def(source, name)
    if node is None:
        return None
    a = node.args
    pos = a.posonlyargs + a.args
    names = [x.arg for x in a.args + a.kwonlyargs]
    n_req = len(pos) - len(a.defaults)
    required = [x.arg for x in pos[:n_req] if x not in a.posonlyargs]
    required += [x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    return names, required, a.kwarg is not None


def _s(proto: Proto, key: str, default: Any = None) -> Any:
    """A slot's value ("name" and "version" are also Proto properties: read the slot)."""
    try:
        return proto.lookup(key)[1]
    except AttributeError:
        return default


def _embed(embedder: Any, texts: list[str]) -> Any:
    import numpy as np
    if hasattr(embedder, "embed"):
        out = embedder.embed(texts)
    elif hasattr(embedder, "encode"):
        out = embedder.encode(texts)
    else:
        out = embedder(texts)
    return np.asarray(out, dtype=np.float32)


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 1}


def _overlap(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / math.sqrt(len(wa) * len(wb)) if wa and wb else 0.0
