"""A fast static check of generated code before anything runs it.

The gVisor sandbox is the real barrier; this gate gives BRICK quick, specific feedback
("import of 'os' is not allowed") instead of an opaque failure inside the sandbox, and
keeps obviously dangerous code from being run at all. It parses with ``ast`` and
refuses: imports outside an allowlist (and relative imports), dynamic code
(``eval``/``exec``/``compile``/``__import__``), reflection that reaches past the
language (``globals``, ``vars``, ``getattr`` with a computed or private name, ...),
dunder attribute access, and ``open`` on anything but a literal relative path inside
the working directory.
"""
from __future__ import annotations

import ast
from pathlib import PurePosixPath

# calls refused outright, with the reason shown to the writer
FORBIDDEN_CALLS: dict[str, str] = {
    "eval": "runs arbitrary code", "exec": "runs arbitrary code",
    "compile": "builds code objects", "__import__": "imports dynamically",
    "globals": "reaches the module namespace", "locals": "reaches the frame namespace",
    "vars": "reaches object namespaces", "breakpoint": "starts a debugger",
    "input": "reads from a terminal that is not there", "help": "starts the pager",
    "setattr": "changes attributes by computed name", "delattr": "deletes attributes by computed name",
    "exit": "ends the interpreter", "quit": "ends the interpreter", "memoryview": "reads raw memory",
}
# refused even when only referenced (``f = eval``), not just called
FORBIDDEN_NAMES = frozenset({"eval", "exec", "compile", "__import__", "globals", "locals",
                             "vars", "breakpoint", "__builtins__"})
# names that are fine to read although they start with "__"
ALLOWED_DUNDER_NAMES = frozenset({"__name__", "__doc__"})


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
    v = _Visitor(set(allowed_imports))
    v.visit(tree)
    return list(dict.fromkeys(v.violations))   # each violation once, in order


def enforce(source: str, allowed_imports: list[str], what: str = "code") -> None:
    """Raise :class:`GateError` when :func:`check` finds anything."""
    violations = check(source, allowed_imports)
    if violations:
        raise GateError(violations, what)


def _module_allowed(module: str, allowed: set[str]) -> bool:
    parts = module.split(".")
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def _literal_str(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


class _Visitor(ast.NodeVisitor):
    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.violations: list[str] = []

    def _bad(self, node: ast.AST, msg: str) -> None:
        self.violations.append(f"line {getattr(node, 'lineno', '?')}: {msg}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not _module_allowed(alias.name, self.allowed):
                self._bad(node, f"import of {alias.name!r} is not allowed "
                                f"(allowed: {', '.join(sorted(self.allowed))})")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self._bad(node, "relative imports are not allowed")
        elif not node.module or not _module_allowed(node.module, self.allowed):
            self._bad(node, f"import from {node.module!r} is not allowed "
                            f"(allowed: {', '.join(sorted(self.allowed))})")
        for alias in node.names:
            if alias.name.startswith("__"):
                self._bad(node, f"importing {alias.name!r} is not allowed")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr.startswith("__") and node.attr.endswith("__"):
            self._bad(node, f"dunder attribute access {node.attr!r} is not allowed")
        elif node.attr in ("f_globals", "f_locals", "f_back", "gi_frame", "cr_frame",
                           "tb_frame", "co_code", "func_globals"):
            self._bad(node, f"frame/code attribute {node.attr!r} is not allowed")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in FORBIDDEN_NAMES:
            self._bad(node, f"use of {node.id!r} is not allowed")
        elif node.id.startswith("__") and node.id not in ALLOWED_DUNDER_NAMES:
            self._bad(node, f"name {node.id!r} is not allowed")

    def visit_Call(self, node: ast.Call) -> None:
        fn = node.func
        name = fn.id if isinstance(fn, ast.Name) else None
        if name in FORBIDDEN_CALLS:
            self._bad(node, f"call to {name}() is not allowed ({FORBIDDEN_CALLS[name]})")
        elif name == "getattr":
            attr = _literal_str(node.args[1]) if len(node.args) > 1 else None
            if attr is None:
                self._bad(node, "getattr() with a computed attribute name is not allowed")
            elif attr.startswith("_"):
                self._bad(node, f"getattr() of private attribute {attr!r} is not allowed")
        elif name == "open":
            self._check_open(node)
        if name is None:
            self.visit(fn)
        for child in [*node.args, *node.keywords]:
            self.visit(child)

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
