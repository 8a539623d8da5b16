"""The seed tool ``calculate`` (a4ps/tools/seed/calculate.py): its arithmetic and unit
conversion on the host (the module file loaded as it is shipped), the forge's static
gate on its source, seeding into a real registry once and never over a person's
choice, and (slow part) the tool run in the real runsc sandbox: the forge's verdict
on its cases, and the graph's tool route answering a task with it."""
from __future__ import annotations

import importlib.util

import pytest

import graph_parts
from a4ps.cognition.suite import check_answer, load_suite
from a4ps.models.embeddings import HashEmbedder
from a4ps.proto import ProtoManager
from a4ps.tools import static_gate
from a4ps.tools.registry import TOOL_PARENT, ToolRegistry
from a4ps.tools.seed_tools import CALCULATE, SEED_DIR, seed


@pytest.fixture(scope="module")
def calc():
    spec = importlib.util.spec_from_file_location("seed_calculate", SEED_DIR / "calculate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("question, value", [
    ("What is 17 times 23?", 391), ("1234 + 5678", 6912), ("What is 15% of 240?", 36),
    ("What is 2 to the power of 10?", 1024), ("square root of 144", 12),
    ("What is 12 times 12 plus 5?", 149), ("3.5 * 4", 14), ("(2 + 3) x 4", 20),
    ("What is twenty five times four?", 100), ("What is 7 squared?", 49),
    ("100 divided by 8", 12.5), ("-3 + 5", 2), ("17 mod 5", 2),
    ("Convert 5 miles to kilometers.", 8.04672), ("How many minutes are in 3 hours?", 180),
    ("Convert 0 degrees Celsius to Fahrenheit.", 32), ("How many grams in 2.5 kg?", 2500),
    ("Convert 100 degrees Fahrenheit to Celsius.", 37.77777777777778),
    ("Convert 1 gigabyte to megabytes", 1000),
])
def test_calculate_reads_the_question_and_computes_exactly(calc, question, value):
    out = calc.calculate(question)
    assert out["value"] == pytest.approx(value, rel=1e-9)
    assert f"= {calc.show(out['value'])}" in out["answer"]     # the answer states the value


@pytest.mark.parametrize("question", [
    "What is the capital of France?", "", "What is 5 divided by 0?",
    "Convert 5 miles to kilograms.", "2 to the power of 5000"])
def test_calculate_refuses_what_it_cannot_compute_exactly(calc, question):
    with pytest.raises(ValueError):
        calc.calculate(question)


def test_calculate_answers_the_tune_splits_computations(calc):
    """Every arithmetic and unit-conversion task of the tune split, checked by the
    suite's own machine check (the held-out split is not looked at here)."""
    tasks = load_suite(split="tune", kinds=["arithmetic", "conversion"])
    assert tasks
    for task in tasks:
        assert check_answer(task, calc.calculate(task.text)["answer"]).passed, task.id


def test_calculate_passes_the_forges_static_gate(settings):
    assert static_gate.check(CALCULATE.source, settings.sandbox.allowed_imports) == []


def test_seeding_registers_once_and_respects_a_deleted_seed_tool(settings, bus):
    protos = ProtoManager(bus)
    registry = ToolRegistry(protos, settings, bus, embedder=HashEmbedder())
    assert seed(registry) == ["calculate"]
    tool = registry.get("calculate")
    assert tool.get("created_by") == "seed" and "calculate" in registry
    assert seed(registry) == []                         # already there: nothing again
    for name in sorted((p.name for p in protos if p.name.startswith("tool.calculate")),
                       key=len, reverse=True):
        protos.remove(name)                              # a person deletes the seed tool
    assert "calculate" not in registry
    assert seed(registry) == []                          # seeded once: the deletion stands
    assert protos.get(TOOL_PARENT).get("seeded") == ["calculate"]


# -- in the real runsc sandbox -------------------------------------------------------------

def test_the_seed_tool_earns_the_forges_verdict_in_the_sandbox(settings, bus, sandbox):
    from a4ps.tools.seed_tools import verify
    from a4ps.tools.tool_forge import ToolForge
    registry = ToolRegistry(ProtoManager(bus), settings, bus, embedder=HashEmbedder(),
                            sandbox=sandbox)
    forge = ToolForge(registry, sandbox, lambda spec, feedback: "", settings, bus)
    verdict = verify(forge)
    assert verdict["ok"], verdict
    assert {r["test"] for r in verdict["cases"] if r["ok"]} >= {
        "test_calculate_arithmetic", "test_calculate_conversion",
        "test_calculate_refuses_what_it_cannot_compute"}


def test_a_stated_computation_is_answered_by_the_seed_tool_through_the_graph(
        settings, bus, sandbox):
    """Route by the signal, BRICK chooses ``calculate`` (a scripted closed choice), the
    registry calls it in runsc with the task's words, and its answer is the task's."""
    from a4ps.events import EventRecorder
    registry = ToolRegistry(ProtoManager(bus), settings, bus, embedder=HashEmbedder(),
                            sandbox=sandbox)
    seed(registry)
    log: list[str] = []
    parts = graph_parts.build(settings, bus, graph_parts.script(use="calculate", log=log),
                              registry=registry, memory=False)
    rec = EventRecorder(bus)
    try:
        r = parts.graph.run("t-calc", "What is 17 times 23?")
    finally:
        parts.graph.close()
    assert r["route"] == "tool" and r["answer"] == "17 × 23 = 391"
    assert r["answer_source"] == "tool:calculate"
    assert log == ["BRICK/tool choice"]            # no persona turn, no route model call
    route, tool = r["decisions"][:2]
    assert (route["method"], route["evidence"]) == ("signal", "17 times 23")
    assert (tool["kind"], tool["value"]) == ("tool", "calculate")
    [invoked] = [e.payload for e in rec.of("tool.invoked")]
    assert invoked["args"] == {"question": "What is 17 times 23?"} and invoked["ok"]
