"""Host-side verdicts: what a forged tool must return, checked outside the sandbox.

The sandbox only reports the tool's outputs (:meth:`Sandbox.call`); whether they are
right is decided here, against expected values that never enter the sandbox, so a
tool cannot read them, and nothing it writes or prints can pass for a verdict.

Cases come from two places:

* the spec's examples (``args`` and, when given, the expected ``result``);
* the writer's tests: a test function whose body is only asserts of the forms
  ``assert name(<literals>) == <literal>`` (or ``!=``, ``is None/True/False``,
  ``assert name(...)``, ``assert not name(...)``) becomes host-checked cases and is not
  sent to the sandbox. Any other test function runs in the sandbox next to the tool
  ("guest" cases): it must pass too, but a tool can influence its outcome, so it never
  counts as a host check.

A tool passes only when every case passes and at least one expected value was checked
here (``host_checked >= 1``).
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from a4ps.tools.registry import ToolSpec
    from a4ps.tools.sandbox import CallResult

_IDENTITY = (None, True, False)


@dataclass
class Case:
    """One call of the tool and what its output must be."""

    label: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    expect: str = "ran"            # ran | eq | ne | truthy | falsy
    value: Any = None

    @property
    def host_checked(self) -> bool:
        return self.expect != "ran"

    def call(self) -> tuple[list[Any], dict[str, Any]]:
        return list(self.args), dict(self.kwargs)


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def cases_from_examples(spec: ToolSpec) -> list[Case]:
    out = []
    for i, ex in enumerate(spec.examples, 1):
        label = f"example {i}: {spec.name}(**{json.dumps(ex.args)})"
        if ex.has_result:
            out.append(Case(label, kwargs=dict(ex.args), expect="eq", value=ex.result))
        else:
            out.append(Case(label, kwargs=dict(ex.args)))
    return out


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None
    if isinstance(value, (set, frozenset)):
        return all(_json_ok(v) for v in value), value
    return _json_ok(value), value


def _tool_call(node: ast.AST, name: str) -> tuple[list[Any], dict[str, Any]] | None:
    """The literal arguments of ``name(...)``, or None when it is not such a call."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name):
        return None
    args, kwargs = [], {}
    for a in node.args:
        ok, v = _literal(a)
        if not ok or isinstance(v, (set, frozenset)):    # arguments travel as JSON
            return None
        args.append(v)
    for k in node.keywords:
        if k.arg is None:
            return None
        ok, v = _literal(k.value)
        if not ok or isinstance(v, (set, frozenset)):
            return None
        kwargs[k.arg] = v
    return args, kwargs


def _assert_case(stmt: ast.Assert, name: str, label: str) -> Case | None:
    test = stmt.test
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        call = _tool_call(test.operand, name)
        return Case(label, *call, expect="falsy") if call else None
    call = _tool_call(test, name)
    if call:
        return Case(label, *call, expect="truthy")
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return None
    left, op, right = test.left, test.ops[0], test.comparators[0]
    call = _tool_call(left, name)
    other = right
    if call is None and isinstance(op, (ast.Eq, ast.NotEq)):
        call, other = _tool_call(right, name), left
    if call is None:
        return None
    ok, value = _literal(other)
    if not ok:
        return None
    if isinstance(op, ast.Eq):
        return Case(label, *call, expect="eq", value=value)
    if isinstance(op, ast.NotEq):
        return Case(label, *call, expect="ne", value=value)
    if isinstance(op, ast.Is) and any(value is x for x in _IDENTITY):
        return Case(label, *call, expect="eq", value=value)
    return None


def split_tests(tests: str, name: str) -> tuple[list[Case], str, list[str]]:
    """(host cases, the test source still to run in the sandbox, its test names).

    Test functions made only of literal asserts on ``name`` become host cases and are
    removed from the source, so their expected values never reach the sandbox.
    """
    if not tests.strip():
        return [], "", []
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return [], tests, ["test module"]   # the import in the sandbox reports the error
    cases: list[Case] = []
    keep: list[ast.stmt] = []
    guest: list[str] = []
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            keep.append(node)
            continue
        found = _function_cases(node, name)
        if found is None:
            keep.append(node)
            guest.append(node.name)
        else:
            cases += found
    if not guest:
        return cases, "", []
    return cases, ast.unparse(ast.Module(body=keep, type_ignores=[])) + "\n", guest


def _function_cases(fn: ast.FunctionDef, name: str) -> list[Case] | None:
    """Host cases for a test function made only of literal asserts; None otherwise."""
    if fn.decorator_list or fn.args.args or fn.args.posonlyargs or fn.args.kwonlyargs \
            or fn.args.vararg or fn.args.kwarg:
        return None
    out = []
    for stmt in fn.body:
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr)
                                          and isinstance(stmt.value, ast.Constant)
                                          and isinstance(stmt.value.value, str)):
            continue
        if not isinstance(stmt, ast.Assert):
            return None
        case = _assert_case(stmt, name, f"{fn.name}: {ast.unparse(stmt.test)}")
        if case is None:
            return None
        out.append(case)
    return out or None


def equal(got: Any, want: Any) -> bool:
    """JSON output vs an expected value: floats within 1e-6, bools strict, a tuple
    expected as a list, a set as a list with the same items, dict keys as strings."""
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        if isinstance(want, float) and math.isnan(want):
            return isinstance(got, float) and math.isnan(got)
        return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(want, (set, frozenset)):
        if not isinstance(got, list) or len(got) != len(want):
            return False
        return all(any(equal(g, w) for g in got) for w in want)
    if isinstance(want, (list, tuple)):
        return isinstance(got, list) and len(got) == len(want) and all(
            equal(g, w) for g, w in zip(got, want))
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return False
        want_s = {str(k): v for k, v in want.items()}
        return set(got) == set(want_s) and all(equal(got[k], want_s[k]) for k in got)
    return type(got) is type(want) and got == want


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def judge(cases: list[Case], guest: list[str], res: CallResult) -> dict[str, Any]:
    """The verdict on the outputs in ``res``; the shape of ``ForgeOutcome.test_results``."""
    rows: list[dict[str, Any]] = []

    def row(test: str, ok: bool, checked: str, detail: str = "") -> None:
        rows.append({"test": test, "ok": ok, "checked": checked, "detail": detail[-1000:]})

    gone = (f"limit hit: {res.limit_hit}" if res.limit_hit else f"exit {res.exit_code}")
    if res.import_error is not None:
        err = res.import_error
        row("import tool", False, "ran", f"{err.error}\n{err.traceback}".strip())
    for case, out in zip(cases, res.outputs):
        checked = "host" if case.host_checked else "ran"
        if out is None:
            row(case.label, False, checked,
                f"no output: the tool's process ended before returning ({gone})")
        elif not out.ok:
            row(case.label, False, checked, f"raised {out.error}\n{out.traceback}".strip())
        elif case.expect == "ran":
            row(case.label, True, checked)
        else:
            good = {"eq": lambda: equal(out.value, case.value),
                    "ne": lambda: not equal(out.value, case.value),
                    "truthy": lambda: bool(out.value),
                    "falsy": lambda: not out.value}[case.expect]()
            want = {"eq": f"expected {_show(case.value)}", "ne": f"expected anything but {_show(case.value)}",
                    "truthy": "expected a true value", "falsy": "expected a false value"}[case.expect]
            row(case.label, good, checked, "" if good else f"returned {_show(out.value)}, {want}")
    for name in guest:
        out = res.tests.get(name) or res.tests.get("import test_tool")
        if out is None:
            row(name, False, "guest", f"did not run ({gone})")
        elif out.ok:
            row(name, True, "guest")
        else:
            row(name, False, "guest", f"{out.error}\n{out.traceback}".strip())
    for problem in res.problems:
        if not (res.limit_hit and problem.startswith("no report")):
            row("output channel", False, "host", problem)
    passed = sum(1 for r in rows if r["ok"])
    host_checked = sum(1 for c in cases if c.host_checked)
    failed = [r["test"] for r in rows if not r["ok"]]
    ok = bool(rows) and not failed and host_checked > 0 and res.limit_hit is None \
        and res.exit_code == 0
    if ok:
        summary = f"{passed}/{len(rows)} tests passed ({host_checked} checked outside the sandbox)"
    elif res.limit_hit:
        summary = f"the tests were stopped: limit hit: {res.limit_hit}"
    elif failed:
        summary = f"{len(failed)}/{len(rows)} tests failed: {', '.join(failed)}"
    elif host_checked == 0:
        summary = ("no expected value was checked outside the sandbox: write tests as "
                   "`assert name(<literal arguments>) == <literal result>`")
    else:
        summary = f"the tool's process ended with exit {res.exit_code}"
    lines = [summary]
    for r in rows:
        lines.append(("PASS " if r["ok"] else "FAIL ") + r["test"])
        if not r["ok"] and r["detail"]:
            lines.append(r["detail"].rstrip())
    if res.stderr.strip():
        lines.append(res.stderr.strip()[-1500:])
    return {"ok": ok, "passed": passed, "total": len(rows), "host_checked": host_checked,
            "summary": summary, "cases": rows, "problems": list(res.problems),
            "limit_hit": res.limit_hit, "exit_code": res.exit_code, "wall_s": res.wall_s,
            "cpu_s": res.cpu_s, "feedback": "\n".join(lines)}
