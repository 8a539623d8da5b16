"""The dependency picture in docs/architecture.md ("Layers") holds for the code.

Parses every module under ``a4ps/`` with :mod:`ast` (no imports run) and collects
every import of a project module: at module level, inside functions, under
``TYPE_CHECKING``. Two rules:

* no import circle between project modules (a loop of any length);
* no upward import: a module may import its own layer or one below it.

The layer of each module comes from the ```` ```layers ```` block in the docs, so the
picture a newcomer reads is the one the tests enforce.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "a4ps"
DOC = ROOT / "docs" / "architecture.md"


def project_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package."""
    mods: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The project module ``name`` lives in (``a4ps.x.y.Thing`` -> ``a4ps.x.y``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> dict[str, int]:
    """Project modules ``module`` imports (anywhere in its file) -> first line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target, line in _targets(module, path, node, mods):
                found.setdefault(target, line)
    return found


def import_graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    mods = project_modules()
    return mods, {m: imports_of(m, p, mods) for m, p in mods.items()}


def layer_patterns(doc: Path = DOC) -> list[tuple[int, str]]:
    """(layer number, module pattern) pairs from the docs' ```layers block."""
    block = re.search(r"```layers\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert block, f"{doc} has no ```layers block: add one (see its 'Layers' section)"
    out: list[tuple[int, str]] = []
    for line in block.group(1).splitlines():
        m = re.match(r"\s*L(\d+)\s+[^:]*:\s*(.*)", line)
        if m:
            out += [(int(m.group(1)), pat) for pat in m.group(2).split()]
    return out


def layer_of(module: str, patterns: list[tuple[int, str]]) -> int | None:
    """The layer of the most specific pattern matching ``module`` (exact beats ``*``)."""
    best: tuple[int, int] | None = None            # (specificity, layer)
    for layer, pat in patterns:
        if pat.endswith(".*"):
            prefix = pat[:-2]
            if module == prefix or module.startswith(prefix + "."):
                score = len(prefix)
            else:
                continue
        elif pat == module:
            score = 10_000
        else:
            continue
        if best is None or score > best[0]:
            best = (score, layer)
    return None if best is None else best[1]


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_sees_function_level_imports(tmp_path: Path) -> None:
    """The parser must see imports inside functions, or circles could hide there."""
    mods = {"a4ps": PACKAGE / "__init__.py", "a4ps.x": Path("x.py"),
            "a4ps.y": Path("y.py"), "a4ps.y.z": Path("y/z.py")}
    src = ("import os\nfrom .y import z\n"
           "def f():\n    from a4ps.x import thing\n    from . import y\n")
    probe = tmp_path / "w.py"
    probe.write_text(src)
    found = imports_of("a4ps.w", probe, mods)
    assert set(found) == {"a4ps.x", "a4ps.y", "a4ps.y.z"}
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) \
        == [["a", "b", "c"]]


def test_no_import_circles_between_project_modules() -> None:
    mods, graph = import_graph()
    cycles = find_cycles(graph)
    detail = []
    for comp in cycles:
        edges = [f"  {a} -> {b} ({mods[a].relative_to(ROOT)}:{graph[a][b]})"
                 for a in comp for b in graph[a] if b in comp]
        detail.append("\n".join(edges))
    assert not cycles, ("import circles (move the shared part down a layer, or the "
                        "importing code up):\n" + "\n\n".join(detail))


def test_every_module_has_a_layer_in_the_docs() -> None:
    patterns = layer_patterns()
    missing = [m for m in project_modules() if layer_of(m, patterns) is None]
    assert not missing, ("modules with no layer in docs/architecture.md's ```layers "
                         f"block (add them where they belong): {missing}")


def test_imports_point_down_the_layers() -> None:
    patterns = layer_patterns()
    mods, graph = import_graph()
    upward = []
    for mod, targets in graph.items():
        mine = layer_of(mod, patterns)
        for target, line in targets.items():
            theirs = layer_of(target, patterns)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{mods[mod].relative_to(ROOT)}:{line}: {mod} (L{mine}) "
                              f"imports {target} (L{theirs})")
    assert not upward, ("imports against the layer order in docs/architecture.md "
                        "(talk upward through the EventBus or a Protocol passed in):\n"
                        + "\n".join(sorted(upward)))


# Function-level imports of project modules that stay, each with its reason.
LAZY_ON_PURPOSE = {
    # the Kivy app and window: importing them starts Kivy (the UI's heavy seam)
    ("a4ps.ui.launch", "a4ps.ui.app"), ("a4ps.ui.launch", "a4ps.ui.window"),
    # building a System pulls numpy and every part; CLI commands that only talk to the
    # daemon must start fast (test_import_cost.py), so the CLI imports it where it builds one
    ("a4ps.cli", "a4ps.system"), ("a4ps.cli", "a4ps.memory"),
    ("a4ps.cli", "a4ps.models.embeddings"), ("a4ps.offline", "a4ps.system"),
}


def function_level_imports() -> list[tuple[str, str, int]]:
    """(module, project module it imports inside a function or class body, line)."""
    mods = project_modules()
    out: list[tuple[str, str, int]] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top: set[int] = set()
        for node in tree.body:      # module level, including under if/try (TYPE_CHECKING)
            if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)):
                top.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                out += [(mod, target, line) for target, line in _targets(mod, path, node, mods)]
    return out


def _targets(mod: str, path: Path, node: ast.Import | ast.ImportFrom,
             mods: dict[str, Path]) -> list[tuple[str, int]]:
    """The project modules one import statement of ``mod`` brings in."""
    is_package = path.name == "__init__.py"
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = mod.split(".") if is_package else mod.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin
                 for a in node.names]
    out = []
    for name in names:
        target = _owner(name, mods) if name.split(".")[0] == "a4ps" else None
        if target and target != mod:
            out.append((target, node.lineno))
    return out


def test_project_imports_are_at_module_top() -> None:
    """The real dependency graph is visible at the top of each file: project modules
    are imported there (heavy third-party libraries stay lazy, behind their seams)."""
    allowed = LAZY_ON_PURPOSE
    hidden = [f"{m} imports {t} inside a function (line {line})"
              for m, t, line in function_level_imports() if (m, t) not in allowed]
    assert not hidden, ("move these imports to the top of the module (if that makes an "
                        "import circle, the layering is wrong):\n" + "\n".join(hidden))


def daemon_spawns(folder: Path) -> list[str]:
    """``file:line`` of every ``Popen([... "a4ps", "daemon" ...])`` under ``folder``."""
    out: list[str] = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args
                    and getattr(node.func, "attr", getattr(node.func, "id", "")) == "Popen"):
                continue
            words = [e.value for e in getattr(node.args[0], "elts", [])
                     if isinstance(e, ast.Constant)]
            if "daemon" in words and "a4ps" in words:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def test_one_helper_starts_daemon_subprocesses() -> None:
    """tests/daemon_process.py is the one place a test or bench spawns `a4ps daemon`
    (one environment, one grace, one readiness wait); the others use its DaemonProcess."""
    spawns = daemon_spawns(ROOT / "tests") + daemon_spawns(ROOT / "bench")
    assert [s.split(":")[0] for s in spawns] == ["tests/daemon_process.py"], (
        "spawn the daemon through tests/daemon_process.DaemonProcess instead: "
        f"{spawns}")


MAX_FUNCTION_LINES = 100


def test_no_function_is_over_100_lines() -> None:
    """Long functions are split into named steps (issue 19: PersonaFinetuner._run and
    train_worker.train were 110 and 108 lines); counted from ``def`` to its last line."""
    long = []
    for mod, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, ("split these into named steps (one job each):\n" + "\n".join(long))
