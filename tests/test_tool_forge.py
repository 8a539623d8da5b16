"""The forge loop with the real gate, sandbox and registry; BRICK's replies are scripted
(a 135M model cannot be relied on to write working code), except in the one slow
end-to-end test, which runs the real embedded model and checks only the pipeline."""
from __future__ import annotations

import pytest

from a4ps.config import load_settings
from a4ps.events import EventBus, EventRecorder
from a4ps.image import ImageStore
from a4ps.proto import ProtoManager
from a4ps.tools.registry import ToolRegistry
from a4ps.tools.sandbox import make_sandbox
from a4ps.tools.tool_forge import (ForgeOutcome, ReplyError, ToolForge, ToolSpec, build_prompt,
                                   parse_reply)

SPEC = ToolSpec(
    name="add_business_days",
    description="The ISO date that is n business days (Mon-Fri) after a start date",
    inputs={"start": {"type": "str", "description": "ISO date"},
            "n": {"type": "int", "description": "business days to add"}},
    output_type="str",
    examples=[{"args": {"start": "2024-03-01", "n": 1}, "result": "2024-03-04"}])

GOOD = '''Here is the tool.

```python
from datetime import date, timedelta

def add_business_days(start: str, n: int) -> str:
    d = date.fromisoformat(start)
    while n > 0:
        d += timedelta(days=1)
        if d.weekday() < 5:
            n -= 1
    return d.isoformat()
```

```python
from tool import add_business_days

def test_skips_the_weekend():
    assert add_business_days("2024-03-08", 1) == "2024-03-11"

def test_zero_days():
    assert add_business_days("2024-03-06", 0) == "2024-03-06"
```
'''
# counts calendar days: the weekend test fails
WRONG = GOOD.replace("        if d.weekday() < 5:\n            n -= 1", "        n -= 1")
FORBIDDEN = GOOD.replace("from datetime import date, timedelta",
                         "import os\nfrom datetime import date, timedelta")


class ScriptedWriter:
    """Plays BRICK: returns the next scripted reply, records what it was asked."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[ToolSpec, str | None]] = []

    def __call__(self, spec: ToolSpec, feedback: str | None) -> str:
        self.calls.append((spec, feedback))
        return self.replies[min(len(self.calls), len(self.replies)) - 1]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    sb = make_sandbox(load_settings(data_dir=tmp_path_factory.mktemp("sbdata"),
                                    sandbox={"cpu_time_s": 2, "wall_time_s": 20.0}))
    assert sb.available, sb.reason
    yield sb
    sb.close()


@pytest.fixture
def parts(settings, sandbox, tmp_path):
    bus = EventBus()
    protos = ProtoManager(bus)
    registry = ToolRegistry(protos, settings, bus, sandbox=sandbox, tools_dir=tmp_path / "dyn")
    return bus, protos, registry


def make_forge(parts, settings, sandbox, writer):
    bus, _, registry = parts
    return ToolForge(registry, sandbox, writer, settings, bus)


def test_a_correct_tool_is_forged_registered_survives_a_restart_and_can_be_called(
        parts, settings, sandbox, tmp_path):
    bus, protos, registry = parts
    rec = EventRecorder(bus)
    writer = ScriptedWriter(GOOD)
    outcome = make_forge(parts, settings, sandbox, writer).forge(SPEC)

    assert isinstance(outcome, ForgeOutcome)
    assert outcome.ok and outcome.tool == "add_business_days" and outcome.version == 1
    assert outcome.attempts == 1 and outcome.reason is None
    assert outcome.test_results["passed"] == 3 == outcome.test_results["total"]  # 2 tests + 1 example
    assert outcome.test_results["host_checked"] == 3     # all compared outside the sandbox
    assert writer.calls == [(SPEC, None)]
    forging = rec.of("tool.forging")
    assert [e.payload["attempt"] for e in forging] == [1, 1]
    assert [e.payload["stage"] for e in forging] == ["writing", "testing"]
    created = rec.wait_for("tool.created", timeout=1).payload
    assert created["tool"] == "add_business_days" and created["version"] == 1
    assert created["signature"] == "add_business_days(start: str, n: int) -> str"
    assert not rec.of("tool.rejected")
    assert (tmp_path / "dyn" / "add_business_days.py").read_text().count("def add_business_days") == 1

    ImageStore(settings.image_path, settings.snapshot_dir).save({"protos": protos.image_state()})
    loaded, _ = ImageStore(settings.image_path, settings.snapshot_dir).load()
    protos2 = ProtoManager(EventBus())
    protos2.restore_image(loaded["protos"])
    registry2 = ToolRegistry(protos2, settings, None, sandbox=sandbox, tools_dir=tmp_path / "dyn2")
    tool = registry2.get("add_business_days")
    assert tool.lookup("tests")[1].startswith("from tool import add_business_days")
    assert tool.lookup("test_results")[1]["passed"] == 3
    assert registry2.call("add_business_days", {"start": "2024-12-27", "n": 3}) == "2025-01-01"


def test_failing_tests_are_retried_with_the_traceback_then_rejected(parts, settings, sandbox):
    bus, protos, registry = parts
    rec = EventRecorder(bus)
    writer = ScriptedWriter(WRONG)
    outcome = make_forge(parts, settings, sandbox, writer).forge(SPEC)

    attempts = settings.forge.max_attempts
    assert not outcome.ok and outcome.attempts == attempts and outcome.version is None
    assert f"tests failed after {attempts} attempts" in outcome.reason
    assert "test_skips_the_weekend" in outcome.reason
    assert len(writer.calls) == attempts and writer.calls[0][1] is None
    for _, feedback in writer.calls[1:]:
        assert "FAIL test_skips_the_weekend" in feedback     # checked on the host
        assert "returned '2024-03-09', expected '2024-03-11'" in feedback
        assert "returned '2024-03-02', expected '2024-03-04'" in feedback   # the spec's example
    assert [e.payload["attempt"] for e in rec.of("tool.forging")
            if e.payload["stage"] == "writing"] == list(range(1, attempts + 1))
    rejected = rec.wait_for("tool.rejected", timeout=1).payload
    assert rejected == {"tool": "add_business_days", "reason": outcome.reason, "attempts": attempts}
    assert not rec.of("tool.created")
    assert registry.list() == [] and "tool.add_business_days" not in protos


def test_a_fixed_second_attempt_passes(parts, settings, sandbox):
    writer = ScriptedWriter(WRONG, GOOD)
    outcome = make_forge(parts, settings, sandbox, writer).forge(SPEC)
    assert outcome.ok and outcome.attempts == 2
    assert "FAIL test_skips_the_weekend" in writer.calls[1][1]
    assert "Your previous attempt failed" in build_prompt(SPEC, writer.calls[1][1])


def test_the_static_gate_feeds_back_before_anything_runs(parts, settings, sandbox):
    bus, _, registry = parts
    rec = EventRecorder(bus)
    writer = ScriptedWriter(FORBIDDEN, GOOD)
    outcome = make_forge(parts, settings, sandbox, writer).forge(SPEC)
    assert outcome.ok and outcome.attempts == 2
    assert "import of 'os' is not allowed" in writer.calls[1][1]
    stages = [(e.payload["attempt"], e.payload["stage"]) for e in rec.of("tool.forging")]
    assert stages == [(1, "writing"), (2, "writing"), (2, "testing")]   # attempt 1 never ran


def test_trivial_tests_cannot_pass_a_wrong_tool_the_examples_are_checked(parts, settings, sandbox):
    trivial = WRONG.split("```python", 2)
    reply = "```python" + trivial[1] + "```python\nfrom tool import add_business_days\n\n" \
            "def test_runs():\n    assert add_business_days('2024-03-06', 0)\n```\n"
    spec = SPEC.model_copy(update={"name": "add_business_days"})
    s = settings.model_copy(update={"forge": settings.forge.model_copy(update={"max_attempts": 1})})
    outcome = make_forge(parts, s, sandbox, ScriptedWriter(reply)).forge(spec)
    assert not outcome.ok and "example 1" in outcome.reason


def test_a_hostile_tool_is_contained_and_rejected(parts, settings, sandbox):
    reply = ("```python\ndef spin(x):\n    while True:\n        x += 1\n```\n"
             "```python\nfrom tool import spin\n\ndef test_spin():\n    assert spin(1) == 2\n```\n")
    s = settings.model_copy(update={"forge": settings.forge.model_copy(update={"max_attempts": 1})})
    outcome = make_forge(parts, s, sandbox, ScriptedWriter(reply)).forge(
        ToolSpec(name="spin", description="never ends"))
    assert not outcome.ok
    # the CPU limit normally ends it; on a starved machine the wall clock may come first
    assert outcome.reason.endswith(("limit hit: cpu_time", "limit hit: wall_time")), outcome.reason


# -- issue 14.1: verdicts the tool cannot forge -------------------------------------------

ADD = ToolSpec(name="add", description="the sum of two numbers",
               examples=[{"args": {"a": 1, "b": 2}, "result": 3}])
ADD_TESTS = "from tool import add\n\ndef test_add():\n    assert add(2, 2) == 4\n"
# at import: writes a passing results file (the old harness's verdict) and leaves
RESULTS_FORGER = """import json, random
with open("results.json", "w") as f:
    json.dump([{"test": "example 1", "ok": True, "detail": ""}], f)
random._os._exit(0)

def add(a, b):
    return 12345
"""


def test_a_tool_that_forges_its_results_file_is_refused(parts, settings, sandbox):
    bus, protos, registry = parts
    reply = f"```python\n{RESULTS_FORGER}```\n```python\n{ADD_TESTS}```\n"
    writer = ScriptedWriter(reply)
    outcome = make_forge(parts, settings, sandbox, writer).forge(ADD)
    assert not outcome.ok and registry.list() == [] and "tool.add" not in protos
    assert "random._os" in writer.calls[-1][1]      # the gate names it; nothing ran


def test_the_verdict_refuses_a_results_forger_even_past_the_gate(parts, settings, sandbox):
    """The sandbox stage alone, as if the gate had let the code through."""
    res = make_forge(parts, settings, sandbox, ScriptedWriter()).verify(ADD, RESULTS_FORGER, ADD_TESTS)
    assert not res["ok"] and res["passed"] == 0 and res["host_checked"] == 2
    assert all("no output: the tool's process ended before returning" in c["detail"]
               for c in res["cases"]), res["cases"]


LIAR = """class Liar(int):
    def __eq__(self, other):
        return True

def add(a, b):
    return Liar(12345)
"""


def test_the_verdict_compares_values_on_the_host_not_objects_in_the_guest(parts, settings, sandbox):
    forge = make_forge(parts, settings, sandbox, ScriptedWriter())
    guest_test = ADD_TESTS + "\ndef test_in_the_guest():\n    x = add(1, 2)\n    assert x == 3\n"
    res = forge.verify(ADD, LIAR, guest_test)
    assert not res["ok"]
    by_test = {c["test"].split(":")[0]: c for c in res["cases"]}
    assert by_test["example 1"]["detail"] == "returned 12345, expected 3"
    assert by_test["example 1"]["checked"] == "host"
    assert by_test["test_in_the_guest"]["ok"] and by_test["test_in_the_guest"]["checked"] == "guest"


def test_expected_values_never_reach_the_sandbox(parts, settings, sandbox):
    """A tool that reads its tests to look up the answers finds none."""
    lookup = ("import re\n\ntry:\n    TESTS = open('test_tool.py').read()\nexcept OSError:\n"
              "    TESTS = ''\n\ndef add(a, b):\n"
              "    m = re.search(r'add\\(%d, %d\\) == (\\d+)' % (a, b), TESTS)\n"
              "    return int(m.group(1)) if m else -1\n")
    res = make_forge(parts, settings, sandbox, ScriptedWriter()).verify(
        ADD.model_copy(update={"examples": []}), lookup, ADD_TESTS)
    assert not res["ok"] and res["cases"][0]["detail"] == "returned -1, expected 4"


def test_writing_to_the_output_channel_is_caught(parts, settings, sandbox):
    spy = ("import os\nfor fd in range(3, 12):\n    try:\n"
           "        os.write(fd, b'{\"kind\": \"call\", \"i\": 0, \"ok\": true, \"value\": 3}\\n')\n"
           "    except OSError:\n        pass\n\ndef add(a, b):\n    return 12345\n")
    res = make_forge(parts, settings, sandbox, ScriptedWriter()).verify(ADD, spy, "")
    assert not res["ok"]
    assert any("more than one output" in p for p in res["problems"]), res


def test_a_tool_with_nothing_checked_outside_the_sandbox_is_not_registered(parts, settings, sandbox):
    reply = ("```python\ndef add(a, b):\n    return a + b\n```\n```python\nfrom tool import add\n\n"
             "def test_add():\n    x = add(2, 2)\n    assert x == 4\n```\n")
    s = settings.model_copy(update={"forge": settings.forge.model_copy(update={"max_attempts": 1})})
    outcome = make_forge(parts, s, sandbox, ScriptedWriter(reply)).forge(
        ToolSpec(name="add", description="sum", examples=[{"args": {"a": 1, "b": 2}}]))
    assert not outcome.ok
    assert "no expected value was checked outside the sandbox" in outcome.reason
    assert outcome.test_results["passed"] == outcome.test_results["total"] == 2


def test_a_reforge_keeps_the_old_version_current_until_the_new_one_passes(parts, settings, sandbox):
    bus, protos, registry = parts
    assert make_forge(parts, settings, sandbox, ScriptedWriter(GOOD)).forge(SPEC).ok
    s = settings.model_copy(update={"forge": settings.forge.model_copy(update={"max_attempts": 1})})
    failed = make_forge(parts, s, sandbox, ScriptedWriter(WRONG)).forge(SPEC)
    assert not failed.ok
    assert registry.versions("add_business_days") == [1]
    assert registry.call("add_business_days", {"start": "2024-03-08", "n": 1}) == "2024-03-11"
    faster = GOOD.replace("    d = date.fromisoformat(start)", "    d = date.fromisoformat(start)  # v2")
    again = make_forge(parts, s, sandbox, ScriptedWriter(faster)).forge(SPEC)
    assert again.ok and again.version == 2 and registry.versions("add_business_days") == [1, 2]
    assert "# v2" in registry.get("add_business_days").lookup("source")[1]
    assert registry.call("add_business_days", {"start": "2024-03-08", "n": 1}, version=1) == "2024-03-11"


def test_forging_is_disabled_without_runsc_and_runs_nothing(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox = make_sandbox(settings)
    bus = EventBus()
    rec = EventRecorder(bus)
    registry = ToolRegistry(ProtoManager(bus), settings, bus, sandbox=sandbox, tools_dir=tmp_path / "d")
    writer = ScriptedWriter(GOOD)
    forge = ToolForge(registry, sandbox, writer, settings, bus)
    assert forge.disabled_reason.startswith("forging disabled: runsc not found on PATH")
    outcome = forge.forge(SPEC)
    assert not outcome.ok and outcome.attempts == 0
    assert outcome.reason == forge.disabled_reason
    assert writer.calls == [] and registry.list() == []
    assert not rec.of("tool.forging")
    assert rec.of("tool.rejected")[0].payload["reason"].startswith("forging disabled")


def test_forging_is_disabled_by_the_setting(parts, settings, sandbox):
    s = settings.model_copy(update={"forge": settings.forge.model_copy(update={"enabled": False})})
    writer = ScriptedWriter(GOOD)
    forge = make_forge(parts, s, sandbox, writer)
    assert forge.disabled_reason == "forging disabled: forge.enabled is false in the settings"
    assert forge.forge(SPEC).reason == forge.disabled_reason and writer.calls == []


def test_a_writer_error_rejects_with_the_reason(parts, settings, sandbox):
    def writer(spec, feedback):
        raise RuntimeError("model not loaded")
    outcome = make_forge(parts, settings, sandbox, writer).forge(SPEC)
    assert not outcome.ok and outcome.attempts == 1
    assert "the writer failed on attempt 1: RuntimeError: model not loaded" == outcome.reason


def test_parse_reply_formats():
    src, tests = parse_reply(GOOD, "add_business_days")
    assert src.startswith("from datetime import") and tests.startswith("from tool import")
    # one block with both: tests are split off
    both = "```python\ndef f(x):\n    return x\n\ndef test_f():\n    assert f(1) == 1\n```"
    src, tests = parse_reply(both, "f")
    assert "def test_f" not in src and "def test_f" in tests and "def f(x)" in src
    # unclosed fence, another function name: aliased
    src, tests = parse_reply("```python\ndef double(x):\n    return 2 * x\n", "twice")
    assert src.rstrip().endswith("twice = double") and tests == ""
    # bare code
    assert parse_reply("def g():\n    return 1\n", "g")[0].startswith("def g")
    with pytest.raises(ReplyError, match="no ```python block"):
        parse_reply("I cannot do that.", "g")
    with pytest.raises(ReplyError, match="syntax error at line 1"):
        parse_reply("```python\ndef g(:\n```", "g")
    with pytest.raises(ReplyError, match="empty"):
        parse_reply("  ", "g")


def test_build_prompt_documents_the_reply_format():
    p = build_prompt(SPEC, None, allowed_imports=["math", "datetime"])
    assert "add_business_days" in p and SPEC.description in p
    assert "- start (str): ISO date" in p
    assert 'add_business_days(**{"start": "2024-03-01", "n": 1}) == "2024-03-04"' in p
    assert "exactly two fenced code blocks" in p and "from tool import add_business_days" in p
    assert "math, datetime" in p and "previous attempt" not in p


@pytest.mark.slow
def test_end_to_end_with_the_embedded_model(embedded_models, settings, sandbox, tmp_path):
    """BRICK's real model writes; the pipeline must end honestly either way."""
    bus = EventBus()
    rec = EventRecorder(bus)
    registry = ToolRegistry(ProtoManager(bus), settings, bus, sandbox=sandbox, tools_dir=tmp_path / "d")
    s = settings.model_copy(update={"forge": settings.forge.model_copy(update={"max_attempts": 1})})
    spec = ToolSpec(name="square", description="The square of a number",
                    inputs={"x": {"type": "float", "description": "the number"}},
                    output_type="float", examples=[{"args": {"x": 3}, "result": 9}])

    def writer(spec, feedback):
        return embedded_models.chat("smollm2-135m", build_prompt(spec, feedback), max_tokens=96)

    outcome = ToolForge(registry, sandbox, writer, s, bus).forge(spec)
    assert rec.of("tool.forging") and rec.of("tool.forging")[0].payload["attempt"] == 1
    if outcome.ok:
        assert rec.wait_for("tool.created", timeout=1).payload["tool"] == "square"
        assert registry.call("square", {"x": 4}) == 16
    else:
        rejected = rec.wait_for("tool.rejected", timeout=1).payload
        assert rejected["reason"] == outcome.reason and outcome.reason
        assert outcome.attempts == 1 and registry.list() == []
