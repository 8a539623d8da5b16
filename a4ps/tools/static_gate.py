"""The static gate: an allow-list over names and attributes, run on generated code
before anything executes it.

The gVisor sandbox is the boundary; this gate is the first layer. It gives the writer
quick, specific feedback ("import of 'os' is not allowed") and keeps the usual routes
out of the language's safety rails from ever running. It reads the code with ``ast``;
nothing is executed (the allowed stdlib modules themselves are imported on the host to
look up what their attributes are).

What code that passes the gate does not contain:

* an import outside ``allowed_imports`` (submodules of an allowed module are allowed),
  a relative or ``*`` import, or an import of a private or dunder name;
* any use of ``eval``, ``exec``, ``compile``, ``__import__``, ``globals``, ``locals``,
  ``vars``, ``setattr``, ``delattr``, ``memoryview``, ``breakpoint``, ``input``,
  ``help``, ``exit``, ``quit`` or ``__builtins__``, called or not;
* ``getattr``, ``hasattr`` or ``open`` except called directly: ``getattr``/``hasattr``
  with a literal public attribute name, ``open`` with a literal relative path inside
  the working directory. So none of them can be aliased (``g = getattr``), passed
  (``functools.reduce(getattr, ...)``, ``map(open, ...)``) or bound as a default
  (``lambda g=getattr: ...``);
* a dunder or underscore-private attribute in any form: ``x.__class__``, ``x._y``,
  ``getattr(x, "__y__")``, ``case C(__dict__=d)`` in a ``match``, ``"{0.__class__}"``
  in a format string (``str.format`` only on a literal whose fields are public), and
  no dunder name except reading ``__name__``/``__doc__``;
* frame, code, generator and traceback attributes (``f_builtins``, ``gi_frame``,
  ``tb_frame``, ``co_code``, ...), or ``get_field``/``vformat``;
* a module used other than as ``module.attribute`` (no ``m = typing``), an attribute
  of a module that is another module outside the allow-list (``typing.sys``,
  ``dataclasses.builtins``, ``dataclasses.inspect.os``, ``statistics.sys``), a
  per-module denied attribute (:data:`MODULE_DENY`: ``string.Formatter``,
  ``typing.get_type_hints``, ``typing.ForwardRef``), or an assignment to a module's
  attribute (``json.dumps = ...``);
* a string annotation (typing and functools evaluate those: ``def f(x: "..."):``).

What it does not promise, and leaves to the sandbox: termination, memory and disk
use, output size, fork bombs; bugs in CPython or in the allowed modules; and every
route Python's dynamism may still open through objects that allowed calls return
(the gate cannot know the type of every expression). Code that passes may still be
hostile: it only ever runs in gVisor, with its outputs judged on the host.
"""
from __future__ import annotations

import ast
import functools
import importlib
import re
import types
from pathlib import PurePosixPath
from typing import Any

# never allowed, in any context, with the reason shown to the writer
DENIED_NAMES: dict[str, str] = {
    "eval": "runs arbitrary code", "exec": "runs arbitrary code",
    "compile": "builds code objects", "__import__": "imports dynamically",
    "globals": "reaches the module namespace", "locals": "reaches the frame namespace",
    "vars": "reaches object namespaces", "breakpoint": "starts a debugger",
    "input": "reads from a terminal that is not there", "help": "starts the pager",
    "setattr": "changes attributes by computed name",
    "delattr": "deletes attributes by computed name",
    "exit": "ends the interpreter", "quit": "ends the interpreter",
    "memoryview": "reads raw memory", "__builtins__": "reaches every builtin",
    "__loader__": "reaches the import machinery", "__spec__": "reaches the import machinery",
}
# allowed only as the callee of a direct call, with their arguments checked
CALL_ONLY = frozenset({"getattr", "hasattr", "open"})
# names that may be read although they start with "__"
ALLOWED_DUNDER_NAMES = frozenset({"__name__", "__doc__"})
# attribute names refused on any object
DENIED_ATTRS: dict[str, str] = {
    "get_field": "resolves attributes by name from a format string",
    "vformat": "resolves attributes by name from a format string",
    "func_globals": "reaches a function's module namespace",
    "func_code": "reaches a function's code object",
}
_INTROSPECTION = re.compile(r"^(f|gi|cr|ag|tb|co)_[a-z_]+$")   # frames, code, generators
# per-module attribute deny lists: public names that re-open what the gate closes
MODULE_DENY: dict[str, dict[str, str]] = {
    "string": {"Formatter": "its get_field reads attributes named in a format string"},
    "typing": {"get_type_hints": "evaluates string annotations",
               "ForwardRef": "evaluates its string"},
}
_FORMAT_ATTRS = frozenset({"format", "format_map"})


class GateError(ValueError):
    """The static gate refused the code; ``violations`` lists each reason."""

    def __init__(self, violations: list[str], what: str = "code") -> None:
        self.violations = list(violations)
        super().__init__(f"{what} refused by the static gate: " + "; ".join(self.violations))


def check(source: str, allowed_imports: list[str]) -> list[str]:
    """Every violation in ``source`` (empty when it may run), each naming the culprit."""
    if not isinstance(source, str):
        return ["source must be text"]
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"syntax error at line {e.lineno}: {e.msg}"]
    allowed = frozenset(allowed_imports)
    v = _Visitor(allowed, _module_names(tree, allowed))
    v.visit(tree)
    return list(dict.fromkeys(v.violations))   # each violation once, in order


def enforce(source: str, allowed_imports: list[str], what: str = "code") -> None:
    """Raise :class:`GateError` when :func:`check` finds anything."""
    violations = check(source, allowed_imports)
    if violations:
        raise GateError(violations, what)


def _module_allowed(module: str, allowed: frozenset[str] | set[str]) -> bool:
    parts = module.split(".")
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def _literal_str(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


_MISSING = object()     # an attribute the host cannot look up (resolved no further)
_REFUSED = object()     # a link the gate refused (already reported)


@functools.lru_cache(maxsize=512)
def _import(name: str) -> Any:
    """An allowed module, imported on the host to look up its attributes."""
    try:
        return importlib.import_module(name)
    except Exception:     # not installed here: nothing to look up
        return _MISSING


@functools.lru_cache(maxsize=4096)
def _attribute(module: str, attr: str) -> Any:
    mod = _import(module)
    if mod is _MISSING:
        return _MISSING
    value = getattr(mod, attr, _MISSING)
    if value is _MISSING:
        sub = _import(f"{module}.{attr}")       # a submodule not yet imported
        return sub
    return value


def _module_names(tree: ast.AST, allowed: frozenset[str]) -> dict[str, str]:
    """Names bound to modules by the code's imports -> the module's full name."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if a.name == "*" or not _module_allowed(node.module, allowed):
                    continue
                value = _attribute(node.module, a.name)
                if isinstance(value, types.ModuleType):
                    names[a.asname or a.name] = value.__name__
    return names


def _chain(node: ast.AST) -> tuple[ast.Name, list[str]] | None:
    """``a.b.c`` -> (Name a, ["b", "c"]); None when the chain starts elsewhere."""
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return node, attrs[::-1]
    return None


def _format_fields_ok(fmt: str) -> str | None:
    """None when a literal format string reads no private attribute; else the field."""
    import string
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return None             # str.format raises on it at run time
    for _, field, spec, _ in parsed:
        for text in (field or "", spec or ""):   # a spec may nest fields: "{0:{1.x}}"
            if "__" in text or re.search(r"\.\s*_", text):
                return text
    return None


class _Visitor(ast.NodeVisitor):
    def __init__(self, allowed: frozenset[str], modules: dict[str, str]) -> None:
        self.allowed = allowed
        self.modules = modules
        self.violations: list[str] = []

    def _bad(self, node: ast.AST, msg: str) -> None:
        self.violations.append(f"line {getattr(node, 'lineno', '?')}: {msg}")

    # -- imports ------------------------------------------------------------------------
    def _allowed_text(self) -> str:
        return ", ".join(sorted(self.allowed))

    def _bound(self, node: ast.AST, name: str) -> None:
        if name in DENIED_NAMES or name in CALL_ONLY or name.startswith("__"):
            self._bad(node, f"binding the name {name!r} is not allowed")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not _module_allowed(alias.name, self.allowed):
                self._bad(node, f"import of {alias.name!r} is not allowed "
                                f"(allowed: {self._allowed_text()})")
            elif any(p.startswith("_") for p in alias.name.split(".")):
                self._bad(node, f"import of private module {alias.name!r} is not allowed")
            if alias.asname:
                self._bound(node, alias.asname)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self._bad(node, "relative imports are not allowed")
            return
        if not node.module or not _module_allowed(node.module, self.allowed):
            self._bad(node, f"import from {node.module!r} is not allowed "
                            f"(allowed: {self._allowed_text()})")
            return
        for alias in node.names:
            if alias.name == "*":
                self._bad(node, f"`from {node.module} import *` is not allowed: name what you use")
                continue
            if alias.name.startswith("_"):
                self._bad(node, f"importing {alias.name!r} is not allowed (private or dunder)")
                continue
            self._module_attribute(node, node.module, alias.name)
            if alias.asname:
                self._bound(node, alias.asname)
            elif alias.name in DENIED_NAMES or alias.name in CALL_ONLY:
                self._bound(node, alias.name)

    def _module_attribute(self, node: ast.AST, module: str, attr: str) -> Any:
        """Check ``module.attr``; its value (a module, anything else, or _REFUSED)."""
        where = f"{module}.{attr}"
        if attr.startswith("_"):
            self._bad(node, f"private attribute {where!r} is not allowed")
            return _REFUSED
        deny = MODULE_DENY.get(module, {}).get(attr)
        if deny:
            self._bad(node, f"{where!r} is not allowed ({deny})")
            return _REFUSED
        value = _attribute(module, attr)
        if isinstance(value, types.ModuleType) and not _module_allowed(value.__name__, self.allowed):
            self._bad(node, f"{where!r} is the module {value.__name__!r}, which is not allowed "
                            f"(allowed: {self._allowed_text()})")
            return _REFUSED
        return value

    # -- names --------------------------------------------------------------------------
    def visit_Name(self, node: ast.Name) -> None:
        name = node.id
        if name in DENIED_NAMES:
            self._bad(node, f"use of {name!r} is not allowed ({DENIED_NAMES[name]})")
        elif name in CALL_ONLY:
            self._bad(node, f"{name!r} may only be called directly "
                            f"(not aliased, passed or stored)")
        elif name.startswith("__") and not (name in ALLOWED_DUNDER_NAMES
                                            and isinstance(node.ctx, ast.Load)):
            self._bad(node, f"name {name!r} is not allowed")
        elif name in self.modules:
            self._bad(node, f"the module {name!r} may only be used as `{name}.attribute` "
                            f"(an alias hides what is reached through it)")

    def visit_Global(self, node: ast.Global) -> None:
        for name in node.names:
            self._bound(node, name)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        for name in node.names:
            self._bound(node, name)

    # -- attributes ---------------------------------------------------------------------
    def _attr_name(self, node: ast.AST, attr: str, where: str | None = None) -> bool:
        """Generic attribute-name rules; False (and a violation) when refused."""
        shown = repr(where or attr)
        if attr.startswith("__") and attr.endswith("__"):
            self._bad(node, f"dunder attribute access {shown} is not allowed")
        elif attr.startswith("_"):
            self._bad(node, f"private attribute {shown} is not allowed")
        elif attr in DENIED_ATTRS:
            self._bad(node, f"attribute {shown} is not allowed ({DENIED_ATTRS[attr]})")
        elif _INTROSPECTION.match(attr):
            self._bad(node, f"frame/code attribute {shown} is not allowed")
        else:
            return True
        return False

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _chain(node)
        if chain is not None and chain[0].id in self.modules:
            self._module_chain(node, chain[0], chain[1])
            return
        if self._attr_name(node, node.attr) and node.attr in _FORMAT_ATTRS:
            fmt = _literal_str(node.value)
            if fmt is None:
                self._bad(node, f".{node.attr}() is allowed only on a literal string "
                                f"(use an f-string)")
            else:
                field = _format_fields_ok(fmt)
                if field is not None:
                    self._bad(node, f"format field {field!r} reads a private attribute")
        self.visit(node.value)

    def _module_chain(self, node: ast.Attribute, base: ast.Name, attrs: list[str]) -> None:
        """``module.a.b...``: each link through modules is looked up for real."""
        path = self.modules[base.id]
        value: Any = _import(path)
        parent = value
        for attr in attrs:
            where = f"{path}.{attr}"
            if not self._attr_name(node, attr, where):
                return
            parent = value
            if isinstance(value, types.ModuleType):
                value = self._module_attribute(node, value.__name__, attr)
                if value is _REFUSED:
                    return
            else:
                value = _MISSING       # past the modules: the generic rules only
            path = where
        if isinstance(node.ctx, (ast.Store, ast.Del)) and isinstance(parent, types.ModuleType):
            self._bad(node, f"changing the module attribute {path!r} is not allowed")

    # -- calls --------------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        fn = node.func
        name = fn.id if isinstance(fn, ast.Name) else None
        if name in DENIED_NAMES:
            self._bad(node, f"call to {name}() is not allowed ({DENIED_NAMES[name]})")
        elif name in ("getattr", "hasattr"):
            if self._check_getattr(node, name):     # a module's attribute: checked whole
                for child in node.args[2:]:
                    self.visit(child)
                return
        elif name == "open":
            self._check_open(node)
        else:
            self.visit(fn)
        rest: list[ast.AST] = [*node.args, *node.keywords]
        for part in rest:
            self.visit(part)

    def _check_getattr(self, node: ast.Call, name: str) -> bool:
        """Check a getattr/hasattr call; True when its object was a module chain."""
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args) \
                or len(node.args) not in ((2, 3) if name == "getattr" else (2,)):
            self._bad(node, f"{name}() takes an object and a literal attribute name here")
            return False
        attr = _literal_str(node.args[1])
        if attr is None:
            self._bad(node, f"{name}() with a computed attribute name is not allowed")
            return False
        target = node.args[0]
        chain = _chain(target) if isinstance(target, (ast.Name, ast.Attribute)) else None
        if chain is not None and chain[0].id in self.modules:
            synthetic = ast.copy_location(ast.Attribute(value=target, attr=attr, ctx=ast.Load()), node)
            self._module_chain(synthetic, chain[0], [*chain[1], attr])
            return True
        if not attr.isidentifier():
            self._bad(node, f"{name}() of {attr!r} is not an attribute name")
        elif attr.startswith("_") and not attr.startswith("__"):
            self._bad(node, f"{name}() of private attribute {attr!r} is not allowed")
        else:
            self._attr_name(node, attr)
        return False

    def _check_open(self, node: ast.Call) -> None:
        target = node.args[0] if node.args else next(
            (k.value for k in node.keywords if k.arg == "file"), None)
        path = _literal_str(target)
        if path is None:
            self._bad(node, "open() with a computed path is not allowed: pass data as "
                            "arguments, or open a literal file name in the working directory")
            return
        p = PurePosixPath(path)
        if p.is_absolute() or ".." in p.parts or path.startswith("~"):
            self._bad(node, f"open({path!r}) is outside the working directory")

    # -- patterns and annotations ----------------------------------------------------------
    def visit_MatchClass(self, node: ast.MatchClass) -> None:
        for attr in node.kwd_attrs:      # `case C(attr=...)` reads C's attribute
            self._attr_name(node, attr)
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self._bound(node, node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._bound(node, node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self._bound(node, node.rest)
        self.generic_visit(node)

    def _annotation(self, node: ast.AST | None) -> None:
        if node is None:
            return
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                self._bad(sub, "string annotations are not allowed (they are evaluated "
                               "later): write the type itself")
                break

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None:
                self._annotation(arg.annotation)
        if not isinstance(node, ast.Lambda):
            self._annotation(node.returns)
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._annotation(node.annotation)
        self.generic_visit(node)
