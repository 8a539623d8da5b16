"""The tool forge: spec -> BRICK writes code + tests -> static gate -> sandbox -> registry.

Each attempt publishes ``tool.forging``; a failed attempt's traceback goes back to the
writer for the next one, up to ``settings.forge.max_attempts``; the outcome publishes
``tool.created`` or ``tool.rejected`` with the reason. The sandbox returns only the
tool's outputs; :mod:`a4ps.tools.verdict` compares them with the spec's examples and
BRICK's literal asserts here, on the host, so a tool that tampers with files, prints
or exits cannot pass itself (:meth:`ToolForge.verify`). With the sandbox unavailable
(or ``forge.enabled = false``) the forge refuses up front and runs nothing: see
:attr:`ToolForge.disabled_reason`.

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
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from pydantic import BaseModel

from a4ps.tools import static_gate, verdict
from a4ps.tools.registry import TOOL_MODULE, ToolExample, ToolInput, ToolSpec, tool_name
from a4ps.config import SandboxSettings

if TYPE_CHECKING:
    from a4ps.config import Settings
    from a4ps.events import EventBus
    from a4ps.tools.registry import ToolRegistry
    from a4ps.tools.sandbox import SandboxRunner

__all__ = ["ToolForge", "ForgeOutcome", "ToolSpec", "ToolInput", "ToolExample",
           "build_prompt", "parse_reply", "ReplyError"]

log = logging.getLogger(__name__)

Writer = Callable[[ToolSpec, "str | None"], str]
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
- Tests are plain functions named test_..., importing the tool with
  `from {TOOL_MODULE} import {name}`, made of lines like
  `assert {name}(<literal arguments>) == <literal result>`: those are checked
  outside the sandbox; other tests run next to the tool.

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
    tool_parts: list[str] = []
    test_parts: list[str] = []
    for node in tree.body:
        seg = "\n".join(lines[node.lineno - 1 - len(getattr(node, "decorator_list", [])):
                              node.end_lineno])
        is_test = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
        (test_parts if is_test else tool_parts).append(seg)
    return "\n\n".join(tool_parts) + "\n", "\n\n".join(test_parts) + "\n"


@runtime_checkable
class Forger(Protocol):
    """The forge seam the graph uses: a spec in, an outcome (a registered tool or
    the reason there is none) out (:class:`ToolForge` implements it)."""

    def forge(self, spec: ToolSpec | dict[str, Any]) -> ForgeOutcome: ...


class ToolForge:
    """Forges tools from specs with a writer (BRICK), the gate, the sandbox and the registry."""

    created_by = "BRICK"

    def __init__(self, registry: ToolRegistry, sandbox: SandboxRunner | None, writer: Writer,
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
                res = self.verify(spec, source, tests)
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

    def verify(self, spec: ToolSpec, source: str, tests: str = "") -> dict[str, Any]:
        """The test stage alone: run ``source`` on the cases in the sandbox, judge here.

        The gate is a separate, earlier layer; this verdict does not rely on it.
        """
        host_cases, guest_tests, guest_names = verdict.split_tests(tests, spec.name)
        cases = verdict.cases_from_examples(spec) + host_cases
        assert self.sandbox is not None, "verify() runs only when the forge is enabled"
        res = self.sandbox.call(source, spec.name, [c.call() for c in cases],
                                tests=guest_tests, test_names=guest_names)
        return verdict.judge(cases, guest_names, res)


def spec_from_request(name: str, description: str, **extra: Any) -> ToolSpec:
    """A ToolSpec from loose request fields (the graph's tool requests)."""
    return ToolSpec(name=tool_name(name), description=description, **extra)
