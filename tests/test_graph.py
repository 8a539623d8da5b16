"""The cognitive graph on scripted models: routes, convergence, the round limit,
dissonance.high, tools, bad model output, live persona edits, checkpoints and resume
(in-process and across a SIGKILL), langgraph.json, and one end-to-end run on the real
embedded model."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import graph_parts
from a4ps.cognition import prompts
from a4ps.cognition.graph import NODES, CognitiveGraph
from a4ps.events import EventRecorder

ROOT = Path(__file__).resolve().parent.parent

AGREE = "The answer is twelve because three times four is twelve."
LOGIC = ["apples divide into equal integer shares by arithmetic",
         "remainder modulo three leaves one apple unassigned",
         "optimal allocation maximises total utility precisely"]
FEEL = ["friendship matters more than fairness between people",
        "kindness and gratitude make everyone feel welcome",
        "listening with warmth heals hurt hearts tonight"]


@pytest.fixture
def built(settings, bus):
    made = []

    def make(replies, **kw):
        parts = graph_parts.build(settings, bus, replies, **kw)
        made.append(parts)
        return parts
    yield make
    for p in made:
        p.graph.close()
        if p.memory is not None:
            p.memory.close()


def steps(rec):
    return [e.payload for e in rec.of("task.step")]


# -- shape -----------------------------------------------------------------------------

PINNED_EDGES = {
    "__start__ --> alfred_route",
    "alfred_route --> recall",
    "recall -. contrapunto .-> brick",
    "recall -. direct .-> alfred_synthesize",
    "recall -. tool .-> forge",
    "brick -.-> forge",
    "brick -.-> robin",
    "forge --> brick",
    "robin --> measure",
    "measure -. again .-> brick",
    "measure -. synthesize .-> alfred_synthesize",
    "alfred_synthesize --> remember",
    "remember --> __end__",
}


def test_graph_shape_is_pinned(settings, bus):
    g = CognitiveGraph(None, None, None, bus, settings, checkpointer_path=False)
    drawing = g.mermaid()
    edges = {re.sub(r"\s+", " ", line.replace("&nbsp;", " ")).strip().rstrip(";")
             for line in drawing.splitlines() if "->" in line}
    assert edges == PINNED_EDGES, drawing
    compiled = g.compile()
    assert set(NODES) <= set(compiled.get_graph().nodes)


# -- routes and the contrapunto -----------------------------------------------------------

def test_convergence_stops_early_and_is_remembered(built, bus):
    p = built(graph_parts.script(brick=AGREE, robin=AGREE), max_rounds=3)
    rec = EventRecorder(bus)
    r = p.graph.run("t-conv", "What is three times four?")

    assert r["status"] == "ok" and r["error"] is None
    assert r["route"] == "contrapunto"
    assert len(r["rounds"]) == 1 and r["stop"] == "converged"
    assert r["rounds"][0]["dissonance"] == pytest.approx(0.0, abs=1e-6)
    assert r["answer"] == "ALFRED's final answer."
    nodes = [s["node"] for s in steps(rec)]
    assert nodes == ["alfred_route", "recall", "brick", "robin", "measure",
                     "alfred_synthesize", "remember"]
    for s in steps(rec):
        assert {"task_id", "node", "persona", "text", "round", "dissonance"} <= set(s)
        assert s["task_id"] == "t-conv"
    brick = next(s for s in steps(rec) if s["node"] == "brick")
    assert brick["persona"] == "BRICK" and brick["round"] == 1 and brick["text"] == AGREE
    assert not rec.of("dissonance.high")
    # the exchange is now memory, and search finds it
    assert r["memory_id"]
    hits = p.memory.search("three times four", k=3)
    assert any(h.id == r["memory_id"] and h.task_id == "t-conv" for h in hits)
    assert "ALFRED's final answer." in hits[0].text
    # the personas' last words are on their protos (the UI's speech bubbles)
    assert p.protos.get("BRICK").last_utterance == AGREE


def test_divergence_stops_at_round_limit_and_publishes_dissonance_high(built, bus):
    p = built(graph_parts.script(brick=lambda n: LOGIC[n - 1], robin=lambda n: FEEL[n - 1]),
              max_rounds=3, dissonance_threshold=0.2, dissonance_high=0.6)
    rec = EventRecorder(bus)
    r = p.graph.run("t-div", "How should we share seven apples among three friends?")

    assert [x["round"] for x in r["rounds"]] == [1, 2, 3]
    assert r["stop"] == "round limit"
    assert all(x["dissonance"] > 0.6 for x in r["rounds"])
    assert r["final_dissonance"] == r["rounds"][-1]["dissonance"]
    assert [x["brick"] for x in r["rounds"]] == LOGIC
    high = rec.wait_for("dissonance.high", timeout=1)
    assert high.payload["task_id"] == "t-div"
    assert high.payload["dissonance"] == pytest.approx(r["final_dissonance"])
    assert "apples" in high.payload["text"]
    # the motivator's reflection quotes both channels' last words
    assert high.payload["brick"] == LOGIC[-1] and high.payload["robin"] == FEEL[-1]
    measures = [s for s in steps(rec) if s["node"] == "measure"]
    assert [m["round"] for m in measures] == [1, 2, 3]
    # BRICK's later rounds answer what ROBIN said
    brick_calls = [c for c in p.backend.calls if graph_parts.persona_of(c[1]) == "BRICK"]
    assert FEEL[0] in brick_calls[1][1][-1]["content"]


def test_direct_route_skips_the_dialogue(built, bus):
    p = built(graph_parts.script(route="DIRECT", answer="Hello! How can I help?"))
    rec = EventRecorder(bus)
    r = p.graph.run("t-direct", "hello")
    assert r["route"] == "direct" and r["rounds"] == [] and r["final_dissonance"] is None
    assert r["answer"] == "Hello! How can I help?"
    assert [s["node"] for s in steps(rec)] == ["alfred_route", "recall", "alfred_synthesize",
                                               "remember"]
    assert {graph_parts.persona_of(c[1]) for c in p.backend.calls} == {"ALFRED"}


@pytest.mark.parametrize("reply, route", [
    ("DIALOGUE", "contrapunto"), ("  direct.", "direct"), ("Tool", "tool"),
    ("I would say DIRECT", "direct"), ("this needs a dialogue between them", "contrapunto"),
    ("DIRECT or DIALOGUE or TOOL", "contrapunto"), ("Direct. No dialogue needed", "contrapunto"), ("Maybe tool or direct, hmm", "contrapunto"),
    ("", "contrapunto"), ("%%%% ####", "contrapunto"), ("banana", "contrapunto"),
])
def test_route_parsing_is_lenient(reply, route):
    assert prompts.parse_route(reply)[0] == route


def test_garbage_route_reply_defaults_to_the_contrapunto(built):
    p = built(graph_parts.script(route="<|im_end|> @@@ 42", brick=AGREE, robin=AGREE))
    r = p.graph.run("t-garbage-route", "Why is the sky blue?")
    assert r["route"] == "contrapunto" and len(r["rounds"]) == 1
    assert "defaulting to the contrapunto" in r["route_reason"]


def test_caller_can_force_the_route(built):
    p = built(graph_parts.script(route="DIRECT", brick=AGREE, robin=AGREE))
    r = p.graph.run("t-forced", "hello", route="contrapunto")
    assert r["route"] == "contrapunto" and len(r["rounds"]) == 1
    assert not any(graph_parts.is_route(c[1]) for c in p.backend.calls)


def test_persona_edits_apply_to_the_next_call(built):
    p = built(graph_parts.script(brick=AGREE, robin=AGREE))
    p.graph.run("t-edit-1", "first")
    p.protos.update("BRICK", {"system_prompt": "You are BRICK, now speaking like a pirate.",
                              "temperature": 0.3})
    p.backend.calls.clear()
    p.graph.run("t-edit-2", "second")
    brick_calls = [c for c in p.backend.calls if graph_parts.persona_of(c[1]) == "BRICK"]
    assert "pirate" in brick_calls[0][1][0]["content"]
    assert brick_calls[0][2]["temperature"] == 0.3


# -- bad model output ----------------------------------------------------------------------

def test_empty_synthesis_recovers_from_the_dialogue(built, bus):
    p = built(graph_parts.script(brick=AGREE, robin="I agree, it is twelve.", answer=""))
    rec = EventRecorder(bus)
    r = p.graph.run("t-empty-alfred", "What is three times four?")
    assert r["status"] == "ok"
    assert AGREE in r["answer"] and "it is twelve" in r["answer"]
    synth = next(s for s in steps(rec) if s["node"] == "alfred_synthesize")
    assert "empty reply" in synth["problem"] and "BRICK's and ROBIN's last words" in synth["problem"]
    assert any("ALFRED: empty reply" in x for x in r["problems"])


def test_all_empty_output_fails_with_a_clear_reason(built, bus):
    p = built(lambda messages: "   " if not graph_parts.is_route(messages) else "DIALOGUE")
    rec = EventRecorder(bus)
    r = p.graph.run("t-empty", "What is three times four?")
    assert r["status"] == "failed"
    assert "no usable reply from BRICK or ROBIN" in r["error"]
    assert "empty reply" in r["error"]
    assert r["memory_id"] is None and p.memory.count() == 0
    brick = next(s for s in steps(rec) if s["node"] == "brick")
    assert brick["problem"] == "BRICK: empty reply (after one retry)"
    measure = next(s for s in steps(rec) if s["node"] == "measure")
    assert measure["stop"] == "neither BRICK nor ROBIN gave a usable reply"
    # each persona was asked twice (one retry), and the retry said what was wrong
    brick_calls = [c for c in p.backend.calls if graph_parts.persona_of(c[1]) == "BRICK"]
    assert len(brick_calls) == 2 and "unusable: empty reply" in brick_calls[1][1][-1]["content"]


def test_garbage_then_good_reply_recovers_on_the_retry(built, bus):
    calls = {"n": 0}
    inner = graph_parts.script(brick=AGREE, robin=AGREE)

    def reply(messages):
        if graph_parts.persona_of(messages) == "ROBIN" and calls["n"] == 0:
            calls["n"] += 1
            return "!!!! #### $$$$ %%%%"
        return inner(messages)
    p = built(reply)
    r = p.graph.run("t-retry", "What is three times four?")
    assert r["status"] == "ok" and r["rounds"][0]["robin"] == AGREE
    assert r["problems"] == []


def test_model_errors_are_recorded_not_raised(built, bus):
    from a4ps.models.errors import BackendUnavailable

    def reply(messages):
        raise BackendUnavailable("ollama is not running at 127.0.0.1:11434")
    p = built(reply)
    rec = EventRecorder(bus)
    r = p.graph.run("t-down", "anything")
    assert r["status"] == "failed"
    assert "ollama is not running" in r["error"]
    route = next(s for s in steps(rec) if s["node"] == "alfred_route")
    assert "model error" in route["problem"] and route["text"] == "contrapunto"


def test_empty_task_text_is_refused(built):
    p = built(graph_parts.script())
    with pytest.raises(ValueError, match="empty"):
        p.graph.run("t-none", "   ")
    with pytest.raises(ValueError, match="route must be one of"):
        p.graph.run("t-bad-route", "hi", route="sideways")


# -- tools ---------------------------------------------------------------------------------

TOOL_BRICK = ("I need to compute this exactly.\nTOOL: add_numbers - adds two numbers\n"
              'ARGS: {"a": 2, "b": 3}')


def test_tool_request_without_a_forge_reports_honestly_and_continues(built, bus):
    brick = {1: TOOL_BRICK, 2: AGREE}
    p = built(graph_parts.script(brick=lambda n: brick.get(n, AGREE), robin=AGREE))
    rec = EventRecorder(bus)
    r = p.graph.run("t-tool-none", "What is 2 + 3?")
    assert r["status"] == "ok"
    assert r["tool"]["ok"] is False and r["tool"]["reason"] == "no tool forge configured"
    assert r["tool"]["request"] == {"name": "add_numbers", "description": "adds two numbers",
                                    "args": {"a": 2, "b": 3}}
    nodes = [s["node"] for s in steps(rec)]
    assert nodes[:6] == ["alfred_route", "recall", "brick", "forge", "brick", "robin"]
    forge = next(s for s in steps(rec) if s["node"] == "forge")
    assert forge["problem"] == "no tool forge configured"
    brick_calls = [c for c in p.backend.calls if graph_parts.persona_of(c[1]) == "BRICK"]
    assert "could not be met (no tool forge configured)" in brick_calls[1][1][-1]["content"]
    assert "TOOL:" not in brick_calls[1][1][0]["content"]   # no second request offered


def test_tool_request_goes_through_the_forge_and_the_result_reaches_brick(built, bus):
    from a4ps.tools.tool_forge import ForgeOutcome

    class FakeForge:
        def __init__(self):
            self.specs = []

        def forge(self, spec):
            self.specs.append(spec)
            return ForgeOutcome(ok=True, tool=spec.name, version=1, attempts=1)

    class FakeRegistry:
        def __init__(self):
            self.called = []

        def match(self, name, description, args=None):
            return None      # nothing registered yet: the forge makes it

        def call(self, name, args):
            self.called.append((name, args))
            return args["a"] + args["b"]

    forge, registry = FakeForge(), FakeRegistry()
    brick = {1: TOOL_BRICK, 2: "With the tool: 2 + 3 = 5."}
    p = built(graph_parts.script(brick=lambda n: brick.get(n, AGREE), robin="Yes, 5."),
              forge=forge, registry=registry)
    r = p.graph.run("t-tool", "What is 2 + 3?")
    assert forge.specs and forge.specs[0].name == "add_numbers"
    assert forge.specs[0].description == "adds two numbers"
    assert set(forge.specs[0].inputs) == {"a", "b"} and forge.specs[0].examples[0].args == {"a": 2, "b": 3}
    assert registry.called == [("add_numbers", {"a": 2, "b": 3})]
    assert r["tool"]["ok"] and r["tool"]["output"] == 5 and r["tool"]["version"] == 1
    brick_calls = [c for c in p.backend.calls if graph_parts.persona_of(c[1]) == "BRICK"]
    assert "Tool add_numbers returned: 5" in brick_calls[1][1][-1]["content"]


@pytest.mark.parametrize("text, name", [
    ("TOOL: add_numbers - adds", "add_numbers"), ("tool:Sum_All: sums a list", "sum_all"),
    ("TOOL: snake_case_name - what the tool does", None), ("I have no tool", None),
])
def test_tool_request_parsing(text, name):
    req = prompts.parse_tool_request(text)
    assert (req.name if req else None) == name


# -- checkpoints and resume ----------------------------------------------------------------

class Crash(BaseException):
    """Stands in for the process dying: not an Exception, so nothing catches it."""


def test_crash_mid_task_resumes_from_the_last_checkpoint(settings, bus, built):
    log: list[str] = []
    inner = graph_parts.script(brick=lambda n: LOGIC[n - 1], robin=lambda n: FEEL[n - 1], log=log)
    state = {"crash_at": 5}      # route, B1, R1, B2, then die inside R2

    def reply(messages):
        if len(log) + 1 == state["crash_at"]:
            state["crash_at"] = None
            raise Crash()
        return inner(messages)

    p = built(reply, memory=False, max_rounds=3, dissonance_threshold=0.05)
    with pytest.raises(Crash):
        p.graph.run("t-crash", "share apples")
    assert log == ["ALFRED/route", "BRICK", "ROBIN", "BRICK"]
    p.graph.close()

    # "restart": a new graph object on the same checkpoint file
    p2 = built(reply, memory=False, max_rounds=3, dissonance_threshold=0.05)
    assert p2.graph.has_checkpoint("t-crash")
    assert list(p2.graph.checkpoint("t-crash").next) == ["robin"]
    log.clear()
    r = p2.graph.run("t-crash", "share apples", resume=True)
    assert log == ["ROBIN", "BRICK", "ROBIN", "ALFRED"]     # nothing before R2 re-ran
    assert r["status"] == "ok" and [x["round"] for x in r["rounds"]] == [1, 2, 3]
    assert [t["persona"] for t in r["turns"]] == [
        "ALFRED", "BRICK", "ROBIN", "BRICK", "ROBIN", "BRICK", "ROBIN", "ALFRED"]
    assert not p2.graph.has_checkpoint("t-crash")
    # resuming a finished task returns its result without calling any model
    log.clear()
    again = p2.graph.run("t-crash", "share apples", resume=True)
    assert log == [] and again["answer"] == r["answer"]
    # a fresh run of the same id starts over (no turns carried over)
    p2.backend.replies = graph_parts.script(brick=AGREE, robin=AGREE)
    fresh = p2.graph.run("t-crash", "share apples")
    assert [t["persona"] for t in fresh["turns"]] == ["ALFRED", "BRICK", "ROBIN", "ALFRED"]


@pytest.mark.slow   # two fresh interpreters (~3 s of imports each) and a slow fake model
def test_sigkill_mid_task_then_resume(data_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = [sys.executable, str(ROOT / "tests" / "graph_worker.py"), str(data_dir), "t-kill"]
    calls = data_dir / "calls.log"
    proc = subprocess.Popen(worker, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if calls.exists() and len(calls.read_text().splitlines()) >= 4:
                break
            if proc.poll() is not None:
                pytest.fail(f"worker exited early: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.02)
        else:
            pytest.fail("worker made no progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = calls.read_text().splitlines()
    first_pid = first[0].split()[0]
    assert len(first) < 8, "the worker finished before it was killed"

    out = subprocess.run(worker + ["--resume"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = calls.read_text().splitlines()
    second = [ln.split()[1] for ln in lines[len(first):]]
    second_pid = lines[len(first)].split()[0]
    # the resumed run did not start over: no new routing, and fewer calls than a full task
    assert "ALFRED/route" not in second
    assert len(first) + len(second) <= 8 + 1      # at most the node in flight ran twice
    result = json.loads((data_dir / f"result-{second_pid}.json").read_text())
    assert result["status"] == "ok"
    assert [x["round"] for x in result["rounds"]] == [1, 2, 3]
    # turns from before the kill came back from the checkpoint
    assert result["turns"][1]["persona"] == "BRICK"
    assert result["turns"][1]["text"].startswith(f"[{first_pid}]")


# -- langgraph.json --------------------------------------------------------------------------

def test_langgraph_json_loads_the_compiled_graph_without_building_the_system(monkeypatch, data_dir):
    cfg = json.loads((ROOT / "langgraph.json").read_text())
    path, _, attr = cfg["graphs"]["contrapunto"].rpartition(":")
    spec = importlib.util.spec_from_file_location("studio_graph", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)       # by path, as the LangGraph CLI does
    import a4ps.system

    def no_system(*a, **k):
        raise AssertionError("make_graph must not build the System before a node runs")
    monkeypatch.setattr(a4ps.system, "System", no_system)
    monkeypatch.setenv("A4PS_DATA_DIR", str(data_dir))
    graph = getattr(module, attr)()
    assert set(NODES) <= set(graph.get_graph().nodes)
    assert "alfred_route" in graph.get_graph().draw_mermaid()


# -- end to end on the real embedded model -----------------------------------------------------

@pytest.mark.slow
def test_end_to_end_with_the_embedded_model(settings, bus, embedded_models):
    from a4ps.memory import MemoryManager
    models = embedded_models
    protos = graph_parts.seed_personas(bus, models, model_name="smollm2-135m")
    memory = MemoryManager(settings, models.embedder, bus=bus)
    s = settings.model_copy(update={"cognition": settings.cognition.model_copy(
        update={"max_rounds": 1})})
    # short turns: on a busy 2-core machine SmolLM2 makes ~1 token/s
    graph = CognitiveGraph(protos, models, memory, bus, s, turn_max_tokens=12)
    rec = EventRecorder(bus)
    try:
        r = graph.run("t-e2e", "Why do leaves change colour in autumn?", route="contrapunto")
    finally:
        graph.close()
    assert r["status"] == "ok", r["error"]
    personas = [t["persona"] for t in r["turns"]]
    assert "BRICK" in personas and "ROBIN" in personas
    assert r["rounds"] and all(0.0 <= x["dissonance"] <= 1.0 for x in r["rounds"])
    assert r["answer"].strip()
    assert r["model_s"] > 0
    assert [s["node"] for s in steps(rec)][-1] == "remember"
    hits = memory.search("leaves colour autumn", k=3)
    assert any(h.task_id == "t-e2e" for h in hits)
    memory.close()
