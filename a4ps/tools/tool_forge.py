"""The tool forge: spec -> BRICK writes code + tests -> static gate -> sandbox -> registry.

Each attempt publishes ``tool.forging``; a failed attempt's traceback goes back to the
writer for the next one, up to ``settings.forge.max_attempts``; the outcome publishes
``tool.created`` or ``tool.rejected`` with the reason. Besides BRICK's own tests, the
spec's examples are checked too, so trivial tests cannot pass a wrong tool. With the
sandbox unavailable (or ``forge.enabled = false``) the forge refuses up front and runs
nothing: see :attr:`ToolForge.disabled_reason`.

The writer is any ``(spec, feedback) -> str``; the System passes BRICK's model call,
tests pass a script. :func:`build_prompt` documents the reply format to the writer.
"""
from __future__ import annotations

import ast
import json
import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

from a4ps.tools import static_gate
from a4ps.tools.registry import TOOL_MODULE, ToolExample, ToolInput, ToolSpec, tool_name

if TYPE_CHECKING:
    from a4ps.config import Settings
    from a4ps.events import EventBus
    from a4ps.tools.registry import ToolRegistry
    from a4ps.tools.sandbox import Sandbox

__all__ = ["ToolForge", "ForgeOutcome", "ToolSpec", "ToolInput", "ToolExample",
           "build_prompt", "parse_reply", "ReplyError"]

log = logging.getLogger(__name__)

Writer = Callable[[ToolSpec, "str | None"], str]
TESTS_MODULE = f"test_{TOOL_MODULE}"
_FEEDBACK_CHARS = 3000


class ReplyError(ValueError):
    """The writer's reply holds no usable tool code; the message says what was wrong."""


class ForgeOutcome(BaseModel):
    ok: bool
    tool: str | None = None          # the tool's name (as registered, when ok)
    version: int | None = None
    attempts: int = 0
    reason: str | None = None        # why it was rejected or not tried
    test_results: dict[str, Any] | None = None


# -- the prompt and the reply format -------------------------------------------------------

def build_prompt(spec: ToolSpec, feedback: str | None = None, *,
                 allowed_imports: list[str] | None = None) -> str:
    """The request to the writer, including the exact reply format the forge parses."""
    name = spec.name
    if not allowed_imports:   # the settings' default list, not a copy of it
        from a4ps.config import SandboxSettings
        allowed_imports = SandboxSettings().allowed_imports
    allowed = ", ".join(allowed_imports)
    if spec.inputs:
        inputs = "\n".join(f"- {k} ({v.type}): {v.description}".rstrip(": ")
                           for k, v in spec.inputs.items())
    else:
        inputs = "- choose the parameters the description needs"
    examples = "\n".join(
        f"- {name}(**{json.dumps(e.args)})" + (f" == {json.dumps(e.result)}" if e.has_result else "")
        for e in spec.examples) or "- (none given: include your own in the tests)"
    params = ", ".join(spec.inputs) or "..."
    prompt = f"""Write a new Python tool.

Tool name: {name}
What it does: {spec.description}
Inputs:
{inputs}
Returns: {spec.output_type} (JSON data: numbers, strings, booleans, None, lists, dicts)
Examples:
{examples}

Rules:
- Define one function `def {name}({params}):` that returns the result.
- Import only these standard modules: {allowed}.
- No files, network, processes, eval, exec, __import__ or dunder attributes.
- Tests are plain functions named test_..., using assert, importing the tool
  with `from {TOOL_MODULE} import {name}`.

Reply with exactly two fenced code blocks, the tool first, then its tests:

```python
def {name}({params}):
    ...
```

```python
from {TOOL_MODULE} import {name}

def test_{name}():
    assert {name}(...) == ...
```
"""
    if feedback:
        prompt += ("\nYour previous attempt failed:\n" + feedback.strip()[-_FEEDBACK_CHARS:]
                   + "\n\nFix the problem and reply in the same format.\n")
    return prompt


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def _top_defs(code: str) -> list[str] | None:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def parse_reply(reply: str, name: str) -> tuple[str, str]:
    """(tool source, tests source) from a writer's reply (see :func:`build_prompt`).

    Tolerates one block holding both (test_ functions are split off), a missing closing
    fence, a reply that is bare code, and a tool function under another name (an alias
    ``name = other`` is appended when the block defines exactly one public function).
    """
    if not isinstance(reply, str) or not reply.strip():
        raise ReplyError("the reply was empty: reply with a ```python block defining the tool")
    blocks = [b.strip("\n") for lang, b in _FENCE.findall(reply)
              if lang.lower() in ("", "python", "py", "python3")]
    fenced = bool(blocks)
    if not blocks:
        blocks = [reply.strip()]
    source = tests = None
    for block in blocks:
        defs = _top_defs(block)
        if defs is None:
            continue
        tool_defs = [d for d in defs if not d.startswith("test_")]
        test_defs = [d for d in defs if d.startswith("test_")]
        if source is None and tool_defs and not test_defs:
            source = block
        elif test_defs and not tool_defs and tests is None:
            tests = block
        elif test_defs and tool_defs and source is None:
            source, split_tests = _split(block)
            tests = tests or split_tests
    if source is None:
        broken = [b for b in blocks if _top_defs(b) is None]
        if broken and fenced:
            try:
                ast.parse(broken[0])
            except SyntaxError as e:
                raise ReplyError(f"the tool block has a syntax error at line {e.lineno}: "
                                 f"{e.msg}") from None
        raise ReplyError(f"no ```python block defining `def {name}(...)` was found")
    defs = _top_defs(source) or []
    if name not in defs:
        public = [d for d in defs if not d.startswith("_")]
        if len(public) != 1:
            raise ReplyError(f"the tool block must define `def {name}(...)` (found {defs})")
        source = source.rstrip() + f"\n\n{name} = {public[0]}\n"
    return source.rstrip() + "\n", (tests or "").rstrip() + ("\n" if tests else "")


def _split(block: str) -> tuple[str, str]:
    tree = ast.parse(block)
    lines = block.splitlines()
    tool_parts, test_parts = [], []
    for node in tree.body:
        seg = "\n".join(lines[node.lineno - 1 - len(getattr(node, "decorator_list", [])):
                              node.end_lineno])
        is_test = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
        (test_parts if is_test else tool_parts).append(seg)
    return "\n\n".join(tool_parts) + "\n", "\n\n".join(test_parts) + "\n"


# -- the test harness (runs inside the sandbox) -------------------------------------------

TEST_HARNESS = """\
import json, math, sys, traceback
NAME = {name!r}
EXAMPLES = json.loads({examples!r})
HAS_TESTS = {has_tests!r}
results = []

def _eq(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_eq(a[k], b[k]) for k in a)
    return a == b

def _record(test, ok, detail=""):
    results.append({{"test": test, "ok": ok, "detail": detail}})

_fn = None
try:
    import {tool_module} as _mod
    _fn = getattr(_mod, NAME)
except BaseException:
    _record("import {tool_module}", False, traceback.format_exc(limit=-8))
if _fn is not None:
    for i, ex in enumerate(EXAMPLES):
        label = "example %d: %s(**%s)" % (i + 1, NAME, json.dumps(ex["args"]))
        try:
            got = _fn(**ex["args"])
            if ex["has_result"] and not _eq(got, ex["result"]):
                _record(label, False, "returned %r, expected %r" % (got, ex["result"]))
            else:
                json.dumps(got)
                _record(label, True)
        except BaseException:
            _record(label, False, traceback.format_exc(limit=-8))
    if HAS_TESTS:
        try:
            import {tests_module} as _tests
        except BaseException:
            _record("import {tests_module}", False, traceback.format_exc(limit=-8))
        else:
            for _tname, _obj in list(vars(_tests).items()):
                if _tname.startswith("test_") and callable(_obj):
                    try:
                        _obj()
                        _record(_tname, True)
                    except BaseException:
                        _record(_tname, False, traceback.format_exc(limit=-8))
with open("results.json", "w", encoding="utf-8") as f:
    json.dump(results, f)
for r in results:
    print(("PASS " if r["ok"] else "FAIL ") + r["test"])
    if not r["ok"]:
        print(r["detail"].rstrip())
if not results:
    print("FAIL no tests and no examples ran")
sys.exit(0 if results and all(r["ok"] for r in results) else 1)
"""


class ToolForge:
    """Forges tools from specs with a writer (BRICK), the gate, the sandbox and the registry."""

    created_by = "BRICK"

    def __init__(self, registry: ToolRegistry, sandbox: Sandbox | None, writer: Writer,
                 settings: Settings, bus: EventBus | None = None) -> None:
        self.registry = registry
        self.sandbox = sandbox
        self.writer = writer
        self.settings = settings
        self.bus = bus
        self._lock = threading.Lock()

    @property
    def disabled_reason(self) -> str | None:
        """Why forging is off (shown in system.status and the UI), or None when on."""
        if not self.settings.forge.enabled:
            return "forging disabled: forge.enabled is false in the settings"
        if self.sandbox is None:
            return "forging disabled: no sandbox is configured"
        if not self.sandbox.available:
            return f"forging disabled: {self.sandbox.reason}"
        return None

    @property
    def allowed_imports(self) -> list[str]:
        return list(self.settings.sandbox.allowed_imports)

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        if self.bus is not None:
            self.bus.publish(topic, payload)

    def forge(self, spec: ToolSpec | dict[str, Any]) -> ForgeOutcome:
        """Write, check and test a tool for ``spec``; register it when its tests pass."""
        try:
            spec = spec if isinstance(spec, ToolSpec) else ToolSpec.model_validate(spec)
        except Exception as e:
            reason = f"invalid tool spec: {e}"
            self._publish("tool.rejected", {"tool": None, "reason": reason, "attempts": 0})
            return ForgeOutcome(ok=False, reason=reason)
        disabled = self.disabled_reason
        if disabled:
            self._publish("tool.rejected", {"tool": spec.name, "reason": disabled, "attempts": 0})
            return ForgeOutcome(ok=False, tool=spec.name, attempts=0, reason=disabled)
        with self._lock:
            return self._forge(spec)

    def _forge(self, spec: ToolSpec) -> ForgeOutcome:
        name = spec.name
        max_attempts = self.settings.forge.max_attempts
        feedback: str | None = None
        reason = "no attempt made"
        results: dict[str, Any] | None = None
        t0 = time.monotonic()
        for attempt in range(1, max_attempts + 1):
            self._publish("tool.forging", {"tool": name, "attempt": attempt,
                                           "max_attempts": max_attempts, "stage": "writing"})
            try:
                reply = self.writer(spec, feedback)
            except Exception as e:
                reason = f"the writer failed on attempt {attempt}: {type(e).__name__}: {e}"
                log.warning("forge %s: %s", name, reason)
                return self._reject(name, reason, attempt)
            try:
                source, tests = parse_reply(reply, name)
            except ReplyError as e:
                reason = feedback = f"attempt {attempt}: {e}"
                continue
            violations = static_gate.check(source, self.allowed_imports)
            if tests:
                violations += [f"tests: {v}" for v in
                               static_gate.check(tests, self.allowed_imports + [TOOL_MODULE])]
            if violations:
                reason = f"attempt {attempt}: refused by the static gate: " + "; ".join(violations)
                feedback = "The static gate refused the code:\n" + "\n".join(violations)
                continue
            self._publish("tool.forging", {"tool": name, "attempt": attempt,
                                           "max_attempts": max_attempts, "stage": "testing"})
            try:
                res = self._run_tests(spec, source, tests)
            except Exception as e:   # the sandbox broke, not the code: stop here
                return self._reject(name, f"the sandbox failed: {type(e).__name__}: {e}", attempt)
            results = res
            if res["ok"]:
                proto = self.registry.register(spec, source, tests, self.created_by, res)
                version = int(proto.lookup("version")[1])
                self._publish("tool.created", {
                    "tool": name, "version": version, "attempts": attempt,
                    "description": spec.description, "signature": proto.lookup("signature")[1],
                    "passed": res["passed"], "total": res["total"],
                    "seconds": round(time.monotonic() - t0, 3)})
                return ForgeOutcome(ok=True, tool=name, version=version, attempts=attempt,
                                    test_results=res)
            reason = f"attempt {attempt}: {res['summary']}"
            feedback = res["feedback"]
        return self._reject(name, f"tests failed after {max_attempts} attempts; last: {reason}",
                            max_attempts, results)

    def _reject(self, name: str, reason: str, attempts: int,
                results: dict[str, Any] | None = None) -> ForgeOutcome:
        self._publish("tool.rejected", {"tool": name, "reason": reason, "attempts": attempts})
        return ForgeOutcome(ok=False, tool=name, attempts=attempts, reason=reason,
                            test_results=results)

    def _run_tests(self, spec: ToolSpec, source: str, tests: str) -> dict[str, Any]:
        examples = [{"args": e.args, "result": e.result, "has_result": e.has_result}
                    for e in spec.examples]
        harness = TEST_HARNESS.format(name=spec.name, examples=json.dumps(examples),
                                      has_tests=bool(tests.strip()), tool_module=TOOL_MODULE,
                                      tests_module=TESTS_MODULE)
        files = {f"{TOOL_MODULE}.py": source}
        if tests.strip():
            files[f"{TESTS_MODULE}.py"] = tests
        res = self.sandbox.run(harness, files=files, collect=["results.json"])
        try:
            cases = json.loads(res.files.get("results.json", "[]"))
        except ValueError:
            cases = []
        passed = sum(1 for c in cases if c.get("ok"))
        ok = res.ok and bool(cases) and passed == len(cases)
        if ok:
            summary = f"{passed}/{len(cases)} tests passed"
        elif res.limit_hit:
            summary = f"the tests were stopped: limit hit: {res.limit_hit}"
        elif not cases:
            summary = f"the tests did not run (exit {res.exit_code})"
        else:
            failed = [c["test"] for c in cases if not c.get("ok")]
            summary = f"{len(failed)}/{len(cases)} tests failed: {', '.join(failed)}"
        feedback = summary + "\n" + (res.stdout.strip() + "\n" + res.stderr.strip()).strip()
        return {"ok": ok, "passed": passed, "total": len(cases), "summary": summary,
                "cases": [{"test": c.get("test"), "ok": bool(c.get("ok")),
                           "detail": str(c.get("detail", ""))[-1000:]} for c in cases],
                "limit_hit": res.limit_hit, "exit_code": res.exit_code,
                "wall_s": res.wall_s, "feedback": feedback[-_FEEDBACK_CHARS:]}


def spec_from_request(name: str, description: str, **extra: Any) -> ToolSpec:
    """A ToolSpec from loose request fields (the graph's tool requests)."""
    return ToolSpec(name=tool_name(name), description=description, **extra)
