"""Host-side verdicts: which tests become host checks, how outputs are compared, and
what the verdict says (the sandbox's part is in test_tool_forge.py)."""
from __future__ import annotations

import pytest

from a4ps.tools.registry import ToolSpec
from a4ps.tools.sandbox import CallOutput, CallResult
from a4ps.tools.verdict import Case, cases_from_examples, equal, judge, split_tests

TESTS = '''from tool import area

HELPER = 3

def test_literal():
    """Docstrings and pass are fine."""
    assert area(2, 3) == 6
    assert 12 == area(w=3, h=4)
    assert area(0, 1) is not None or True

def test_forms():
    assert area(1, 1)
    assert not area(0, 5)
    assert area(-1, 2) != 5
    assert area(1.5, 2) == 3.0
    assert area([1], (2,)) == [1, 2]

def test_uses_a_variable():
    x = area(2, 2)
    assert x == 4

def test_set_argument():
    assert area({1, 2}, 1) == 2

def helper():
    return HELPER
'''


def test_literal_asserts_become_host_cases_and_leave_the_sandbox_source():
    cases, guest_src, guest = split_tests(TESTS, "area")
    assert guest == ["test_literal", "test_uses_a_variable", "test_set_argument"]
    # test_literal has a non-literal comparison (`is not None or True`): it stays whole
    labels = [c.label for c in cases]
    assert labels == ["test_forms: area(1, 1)", "test_forms: not area(0, 5)",
                      "test_forms: area(-1, 2) != 5", "test_forms: area(1.5, 2) == 3.0",
                      "test_forms: area([1], (2,)) == [1, 2]"]
    assert [(c.expect, c.args, c.value) for c in cases] == [
        ("truthy", [1, 1], None), ("falsy", [0, 5], None), ("ne", [-1, 2], 5),
        ("eq", [1.5, 2], 3.0), ("eq", [[1], (2,)], [1, 2])]
    assert "def test_forms" not in guest_src and "def helper" in guest_src
    assert "HELPER = 3" in guest_src and "from tool import area" in guest_src


def test_a_module_of_literal_tests_sends_nothing_to_the_sandbox():
    cases, guest_src, guest = split_tests(
        "from tool import f\n\ndef test_a():\n    assert f(1) == 2\n    assert f(x=2) == 3\n", "f")
    assert guest == [] and guest_src == ""
    assert [(c.args, c.kwargs, c.value) for c in cases] == [([1], {}, 2), ([], {"x": 2}, 3)]


def test_examples_with_and_without_results():
    spec = ToolSpec(name="f", description="d", examples=[{"args": {"x": 1}, "result": 2},
                                                         {"args": {"x": 5}}])
    a, b = cases_from_examples(spec)
    assert (a.expect, a.kwargs, a.value, a.host_checked) == ("eq", {"x": 1}, 2, True)
    assert (b.expect, b.host_checked) == ("ran", False)


@pytest.mark.parametrize("got, want, same", [
    (3, 3, True), (3.0000001, 3, True), (3.1, 3, False), (True, 1, False), (1, True, False),
    ([1, 2], (1, 2), True), ([2, 1], {1, 2}, True), ([1, 1], {1, 2}, False),
    ({"1": "a"}, {1: "a"}, True), ("3", 3, False), (None, None, True), ([1], [1, 2], False),
    (float("nan"), float("nan"), True),
])
def test_equal(got, want, same):
    assert equal(got, want) is same


def _result(outputs, **kw):
    return CallResult(**{"exit_code": 0, "reported": True, "outputs": outputs, **kw})


def test_the_verdict_needs_a_host_check():
    cases = [Case("ran only", kwargs={"x": 1})]
    v = judge(cases, [], _result([CallOutput(ok=True, value=7)]))
    assert not v["ok"] and v["host_checked"] == 0
    assert v["summary"].startswith("no expected value was checked outside the sandbox")


def test_the_verdict_names_each_failure():
    cases = [Case("eq", args=[1], expect="eq", value=2), Case("raises", args=[0], expect="eq", value=1),
             Case("missing", args=[5], expect="eq", value=5)]
    res = _result([CallOutput(ok=True, value=3),
                   CallOutput(ok=False, error="ZeroDivisionError: division by zero", traceback="tb"),
                   None], exit_code=137, signal=9)
    v = judge(cases, ["test_guest"], res)
    assert not v["ok"] and v["passed"] == 0 and v["total"] == 4
    details = {c["test"]: c["detail"] for c in v["cases"]}
    assert details["eq"] == "returned 3, expected 2"
    assert details["raises"].startswith("raised ZeroDivisionError")
    assert details["missing"].startswith("no output: the tool's process ended before returning")
    assert details["test_guest"].startswith("did not run")
    assert "FAIL eq\nreturned 3, expected 2" in v["feedback"]


def test_channel_problems_fail_the_verdict():
    cases = [Case("eq", args=[1], expect="eq", value=2)]
    res = _result([CallOutput(ok=True, value=2)],
                  problems=["more than one output for call 0: something besides the harness wrote"])
    v = judge(cases, [], res)
    assert not v["ok"] and v["cases"][-1]["test"] == "output channel"
