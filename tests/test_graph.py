"""The cognitive graph on scripted models: structured decisions (route, tool request,
answer choice) and what happens when one cannot be made, convergence on final
answers, unusable replies, the round limit, dissonance.high, tools, streaming
(task.token), the repetition stop, cancellation, generation slots, live persona
edits, checkpoints and resume (in-process and across a SIGKILL), and one end-to-end
run on the real embedded model."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import graph_parts
from a4ps.cognition.graph import NODES, CognitiveGraph
from a4ps.cognition.state import TaskCancelled
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


def persona_calls(p, who):
    return [c for c in p.backend.calls if graph_parts.persona_of(c[1]) == who
            and "decision" not in c[2]]


# -- shape -----------------------------------------------------------------------------

PINNED_EDGES = {
    "__start__ --> alfred_route",
    "alfred_route --> recall",
    "recall -. contrapunto .-> brick",
    "recall -. direct .-> alfred_synthesize",
    "recall -. tool .-> tool_request",
    "tool_request -. request .-> forge",
    "tool_request -. none .-> brick",
    "forge -. answered .-> alfred_synthesize",
    "forge -. consult .-> brick",
    "brick --> robin",
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


def test_state_schema_draws_non_null_json_schemas(settings, bus):
    """typing_extensions.TypedDict: pydantic (and the LangGraph server) can draw it on 3.11."""
    compiled = CognitiveGraph(None, None, None, bus, settings, checkpointer_path=False).compile()
    schema_in, schema_out = compiled.get_input_jsonschema(), compiled.get_output_jsonschema()
    assert {"task", "task_id"} <= set(schema_in["properties"])
    assert {"answer", "status", "decisions"} <= set(schema_out["properties"])


# -- the contrapunto and ALFRED's answer -------------------------------------------------

def test_agreement_stops_early_and_the_agreed_answer_is_remembered(built, bus):
    p = built(graph_parts.script(brick=AGREE, robin=AGREE), max_rounds=3)
    rec = EventRecorder(bus)
    r = p.graph.run("t-conv", "What is three times four?")

    assert r["status"] == "ok" and r["error"] is None
    assert r["route"] == "contrapunto"
    assert r["decisions"][0]["kind"] == "route" and r["decisions"][0]["parsed"]
    assert len(r["rounds"]) == 1 and r["stop"] == "converged"
    assert r["rounds"][0]["dissonance"] == 0.0
    assert r["answer"] == AGREE and r["answer_source"] == "agreement"
    nodes = [s["node"] for s in steps(rec)]
    assert nodes == ["alfred_route", "recall", "brick", "robin", "measure",
                     "alfred_synthesize", "remember"]
    for s in steps(rec):
        assert {"task_id", "node", "persona", "text", "round", "dissonance"} <= set(s)
        assert s["task_id"] == "t-conv"
    brick = next(s for s in steps(rec) if s["node"] == "brick")
    assert brick["persona"] == "BRICK" and brick["round"] == 1 and brick["text"] == AGREE
    assert not rec.of("dissonance.high")
    assert r["memory_id"]
    hits = p.memory.search("three times four", k=3)
    assert any(h.id == r["memory_id"] and h.task_id == "t-conv" for h in hits)
    assert p.protos.get("BRICK").last_utterance == AGREE
    # nothing to choose when they agree: ALFRED was asked only the route
    assert [c[2]["decision"] for c in p.backend.calls if "decision" in c[2]] == [
        ["answer", "talk", "calculate"]]


def test_same_final_answer_in_other_words_is_agreement(built):
    p = built(graph_parts.script(brick="Answer: 12\nThree fours make twelve.",
                                 robin="12. It is kind to check the sum together."))
    r = p.graph.run("t-same", "What is three times four?")
    assert r["stop"] == "converged" and r["rounds"][0]["dissonance"] == 0.0


def test_disagreement_runs_to_the_round_limit_and_alfred_chooses_an_answer(built, bus):
    p = built(graph_parts.script(brick=lambda n: LOGIC[n - 1], robin=lambda n: FEEL[n - 1],
                                 pick="ROBIN"),
              max_rounds=3, dissonance_threshold=0.2, dissonance_high=0.6)
    rec = EventRecorder(bus)
    r = p.graph.run("t-div", "How should we share seven apples among three friends?")

    assert [x["round"] for x in r["rounds"]] == [1, 2, 3]
    assert r["stop"] == "round limit"
    assert all(x["dissonance"] > 0.6 for x in r["rounds"])
    assert r["answer"] == FEEL[-1] and r["answer_source"] == "choice:ROBIN"
    choice = r["decisions"][-1]
    assert choice["kind"] == "answer" and choice["parsed"] and choice["value"] == "ROBIN"
    # ALFRED chose among exactly the two last candidates
    asked = [c[2]["decision"] for c in p.backend.calls if "decision" in c[2]][-1]
    assert asked == [LOGIC[-1], FEEL[-1]]
    high = rec.wait_for("dissonance.high", timeout=1)
    assert high.payload["task_id"] == "t-div"
    assert high.payload["dissonance"] == pytest.approx(r["final_dissonance"])
    assert high.payload["brick"] == LOGIC[-1] and high.payload["robin"] == FEEL[-1]
    # BRICK's later rounds answer what ROBIN said
    assert FEEL[0] in persona_calls(p, "BRICK")[1][1][-1]["content"]


def test_direct_route_is_alfred_alone(built, bus):
    p = built(graph_parts.script(route="direct", answer="Hello! How can I help?"))
    rec = EventRecorder(bus)
    r = p.graph.run("t-direct", "hello")
    assert r["route"] == "direct" and r["rounds"] == [] and r["final_dissonance"] is None
    assert r["answer"] == "Hello! How can I help?" and r["answer_source"] == "alfred"
    assert [s["node"] for s in steps(rec)] == ["alfred_route", "recall", "alfred_synthesize",
                                               "remember"]
    assert {graph_parts.persona_of(c[1]) for c in p.backend.calls} == {"ALFRED"}


def test_undecidable_route_is_recorded_not_disguised(built, bus):
    """A reply that names no route is a DecisionError: no decision, said so."""
    p = built(graph_parts.script(route="SUGGESTION if you need", brick=AGREE, robin=AGREE))
    rec = EventRecorder(bus)
    r = p.graph.run("t-noroute", "Why is the sky blue?")
    route = r["decisions"][0]
    assert route["kind"] == "route" and not route["parsed"] and route["value"] is None
    assert "no decision" in route["problem"]
    assert "no decision" in r["route_reason"] and "contrapunto" in r["route_reason"]
    assert any("route: no decision" in x for x in r["problems"])
    step = next(s for s in steps(rec) if s["node"] == "alfred_route")
    assert "no decision" in step["problem"] and step["decision"]["parsed"] is False
    assert r["status"] == "ok" and len(r["rounds"]) == 1


def test_caller_can_force_the_route(built):
    p = built(graph_parts.script(route="direct", brick=AGREE, robin=AGREE))
    r = p.graph.run("t-forced", "hello", route="contrapunto")
    assert r["route"] == "contrapunto" and len(r["rounds"]) == 1
    assert not any(graph_parts.is_route(c[1]) for c in p.backend.calls)


def test_undecidable_answer_choice_falls_back_to_brick_and_says_so(built):
    def decide(messages, asked):
        if graph_parts.is_answer_choice(messages):
            from a4ps.models.errors import DecisionError
            raise DecisionError("no option scored")
        return inner(messages, asked)
    inner = graph_parts.script(brick=LOGIC[0], robin=FEEL[0])
    p = built(decide, max_rounds=1, dissonance_threshold=0.01)
    r = p.graph.run("t-nochoice", "How should we share seven apples?")
    assert r["status"] == "ok" and r["answer"] == LOGIC[0]
    assert r["answer_source"] == "fallback:BRICK"
    assert r["decisions"][-1]["kind"] == "answer" and not r["decisions"][-1]["parsed"]
    assert any("the answer is BRICK's, not ALFRED's choice" in x for x in r["problems"])


def test_persona_edits_and_generation_slots_apply_to_the_next_turn(built):
    p = built(graph_parts.script(brick=AGREE, robin=AGREE))
    p.graph.run("t-edit-1", "first")
    first = persona_calls(p, "BRICK")[0][2]
    assert first["repetition_penalty"] == p.protos.get("BRICK").repetition_penalty
    assert first["no_repeat_ngram_size"] == p.protos.get("BRICK").no_repeat_ngram_size
    assert first["stop"] == p.protos.get("BRICK").stop and first["max_tokens"] == 64
    p.protos.update("BRICK", {"system_prompt": "You are BRICK, now speaking like a pirate.",
                              "temperature": 0.3, "top_p": 0.5, "max_tokens": 20,
                              "stop": ["ARR"]})
    p.backend.calls.clear()
    p.graph.run("t-edit-2", "second")
    call = persona_calls(p, "BRICK")[0]
    assert "pirate" in call[1][0]["content"]
    assert (call[2]["temperature"], call[2]["top_p"], call[2]["max_tokens"], call[2]["stop"]) \
        == (0.3, 0.5, 20, ["ARR"])


# -- unusable replies ----------------------------------------------------------------------

def test_an_unusable_reply_is_not_counted_as_disagreement(built, bus):
    p = built(graph_parts.script(brick=AGREE, robin="   "), max_rounds=3)
    rec = EventRecorder(bus)
    r = p.graph.run("t-half", "What is three times four?")
    assert len(r["rounds"]) == 1 and r["rounds"][0]["dissonance"] is None
    assert r["stop"] == "only BRICK gave a usable reply"
    assert r["answer"] == AGREE and r["answer_source"] == "fallback:BRICK"
    assert not rec.of("dissonance.high")
    measure = next(s for s in steps(rec) if s["node"] == "measure")
    assert measure["dissonance"] is None and "n/a" in measure["text"]


def test_all_empty_output_fails_with_a_clear_reason(built, bus):
    p = built(lambda messages: "contrapunto" if graph_parts.is_route(messages) else "   ")
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
    brick_calls = persona_calls(p, "BRICK")
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
    assert "model error" in route["problem"] and route["decision"]["parsed"] is False


def test_empty_task_text_is_refused(built):
    p = built(graph_parts.script())
    with pytest.raises(ValueError, match="empty"):
        p.graph.run("t-none", "   ")
    with pytest.raises(ValueError, match="route must be one of"):
        p.graph.run("t-bad-route", "hi", route="sideways")


# -- streaming and the repetition stop -----------------------------------------------------

def test_turns_stream_as_task_token_events_in_seq_order(settings, bus, built):
    p = built(graph_parts.script(route="contrapunto", brick=AGREE, robin="I agree: twelve."),
              token_interval_s=0.0)
    rec = EventRecorder(bus)
    r = p.graph.run("t-stream", "What is three times four?")
    tokens = [e.payload for e in rec.of("task.token")]
    assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1))
    assert {t["task_id"] for t in tokens} == {"t-stream"}
    by_turn: dict = {}
    for t in tokens:
        by_turn.setdefault((t["node"], t["persona"], t["round"]), []).append(t["text"])
    assert "".join(by_turn[("brick", "BRICK", 1)]).strip() == AGREE
    assert "".join(by_turn[("robin", "ROBIN", 1)]).strip() == r["rounds"][0]["robin"]


def test_token_events_are_coalesced_to_one_per_interval(bus, settings, built):
    long = " ".join(a + b for a in "bcdfghjklm" for b in ("ar", "en", "ix", "ot", "um", "yl")) + "."
    p = built(graph_parts.script(route="direct", answer=long), latency_s=0.6,
              token_interval_s=0.05)
    rec = EventRecorder(bus)
    t0 = time.monotonic()
    p.graph.run("t-coalesce", "Say many words.")
    wall = time.monotonic() - t0
    tokens = [e.payload for e in rec.of("task.token")]
    assert "".join(t["text"] for t in tokens).strip() == long
    assert len(tokens) < 60                             # not one event per piece
    assert len(tokens) <= wall / 0.05 + 2               # at most one per ~50 ms (+ flush)


def test_a_turn_that_repeats_itself_stops_at_the_repeat_not_the_budget(built):
    loop = "The sky is blue. " + "It is blue because of the light. " * 20
    p = built(graph_parts.script(brick=loop, robin="The sky is blue."))
    r = p.graph.run("t-loop", "Why is the sky blue?", route="contrapunto")
    brick = r["turns"][0]
    assert brick["persona"] == "BRICK" and brick["finish"] == "repetition"
    assert brick["text"] == "The sky is blue. It is blue because of the light."
    # the model was stopped within a few pieces of the repeat, not run to the end
    assert brick["tokens"] < 30


# -- cancellation ------------------------------------------------------------------------

def test_cancel_before_a_node_stops_the_task_and_it_can_resume(built):
    cancel = threading.Event()
    inner = graph_parts.script(brick=AGREE, robin=AGREE)

    def reply(messages):
        if graph_parts.persona_of(messages) == "BRICK":
            cancel.set()        # the user presses cancel while BRICK speaks
        return inner(messages)
    p = built(reply)
    with pytest.raises(TaskCancelled) as info:
        p.graph.run("t-cancel", "What is three times four?", cancel=cancel)
    assert info.value.task_id == "t-cancel" and info.value.node == "brick"
    assert p.graph.has_checkpoint("t-cancel")
    r = p.graph.run("t-cancel", "What is three times four?", resume=True)
    assert r["status"] == "ok" and r["answer"] == AGREE


def test_cancel_mid_generation_stops_the_model_within_a_piece(built):
    cancel = threading.Event()
    words = " ".join(f"w{i}" for i in range(100)) + "."
    p = built(graph_parts.script(brick=words), latency_s=2.0)
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(TaskCancelled):
        p.graph.run("t-cancel-mid", "Say many words.", route="contrapunto", cancel=cancel)
    assert time.monotonic() - t0 < 1.0


def test_a_task_cancelled_before_it_starts_calls_no_model(built):
    cancel = threading.Event()
    cancel.set()
    p = built(graph_parts.script())
    with pytest.raises(TaskCancelled) as info:
        p.graph.run("t-pre", "anything", cancel=cancel)
    assert info.value.node == "alfred_route" and p.backend.calls == []


# -- tools ---------------------------------------------------------------------------------

TOOL = {"name": "Add Numbers", "description": "adds two numbers",
        "args": [{"name": "a", "value": "2"}, {"name": "b", "value": "3"}]}


class FakeForge:
    """Stands in for the gVisor forge: records the spec, reports success."""

    def __init__(self):
        self.specs = []

    def forge(self, spec):
        from a4ps.tools.tool_forge import ForgeOutcome
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


def test_tool_route_asks_brick_for_a_structured_request_and_the_result_reaches_brick(built, bus):
    forge, registry = FakeForge(), FakeRegistry()
    p = built(graph_parts.script(route="tool", tool=TOOL, brick="Answer: 5", robin="5, yes."),
              forge=forge, registry=registry)
    rec = EventRecorder(bus)
    r = p.graph.run("t-tool", "What is 2 + 3?")
    assert [s["node"] for s in steps(rec)][:5] == ["alfred_route", "recall", "tool_request",
                                                   "forge", "brick"]
    request = {"name": "add_numbers", "description": "adds two numbers", "args": {"a": 2, "b": 3}}
    assert r["tool"]["request"] == request
    assert [d["kind"] for d in r["decisions"]] == ["route", "tool_request"]
    assert r["decisions"][1]["parsed"] and r["decisions"][1]["value"] == request
    assert forge.specs[0].name == "add_numbers" and forge.specs[0].description == "adds two numbers"
    assert set(forge.specs[0].inputs) == {"a", "b"} and forge.specs[0].examples[0].args == {"a": 2, "b": 3}
    assert r["tool"]["version"] == 1
    assert registry.called == [("add_numbers", {"a": 2, "b": 3})]
    assert r["tool"]["ok"] and r["tool"]["output"] == 5
    assert "Tool add_numbers returned: 5" in persona_calls(p, "BRICK")[0][1][-1]["content"]
    assert r["answer"] == "Answer: 5"


def test_tool_request_without_a_forge_reports_honestly_and_continues(built, bus):
    p = built(graph_parts.script(route="tool", tool=TOOL, brick=AGREE, robin=AGREE))
    r = p.graph.run("t-tool-none", "What is 2 + 3?")
    assert r["status"] == "ok"
    assert r["tool"]["ok"] is False and r["tool"]["reason"] == "no tool forge configured"
    # the failure is in the result (above), not in front of the personas: they get the task
    assert persona_calls(p, "BRICK")[0][1][-1]["content"] == "What is 2 + 3?"


def test_an_undecidable_tool_request_is_no_request(built, bus):
    p = built(graph_parts.script(route="tool", tool="I would use a calculator",
                                 brick=AGREE, robin=AGREE), forge=FakeForge())
    rec = EventRecorder(bus)
    r = p.graph.run("t-tool-bad", "What is 2 + 3?")
    assert r["tool"] is None and r["status"] == "ok"
    assert not r["decisions"][1]["parsed"] and "no decision" in r["decisions"][1]["problem"]
    assert [s["node"] for s in steps(rec)][2:4] == ["tool_request", "brick"]


def test_a_tool_request_with_no_usable_name_is_no_request(built):
    p = built(graph_parts.script(route="tool", tool={"name": "!!", "description": "",
                                                     "args": []}, brick=AGREE, robin=AGREE))
    r = p.graph.run("t-tool-noname", "Find the weather in Paris")
    # the name is asked again as a closed choice; a reply naming none of the options
    # is still no decision, and no request (test_cognition_parts covers a chosen name)
    assert r["tool"] is None and "tool name: no decision" in r["decisions"][1]["problem"]


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
    assert log == ["ROBIN", "BRICK", "ROBIN", "ALFRED/choice"]     # nothing before R2 re-ran
    assert r["status"] == "ok" and [x["round"] for x in r["rounds"]] == [1, 2, 3]
    assert [t["persona"] for t in r["turns"]] == [
        "BRICK", "ROBIN", "BRICK", "ROBIN", "BRICK", "ROBIN"]
    assert not p2.graph.has_checkpoint("t-crash")
    # resuming a finished task returns its result without calling any model
    log.clear()
    again = p2.graph.run("t-crash", "share apples", resume=True)
    assert log == [] and again["answer"] == r["answer"]
    # a fresh run of the same id starts over (no turns carried over)
    p2.backend.replies = graph_parts.script(brick=AGREE, robin=AGREE)
    fresh = p2.graph.run("t-crash", "share apples")
    assert [t["persona"] for t in fresh["turns"]] == ["BRICK", "ROBIN"]


@pytest.mark.slow   # two fresh interpreters (~3 s of imports each) and a slow fake model
def test_sigkill_mid_task_then_resume(data_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = [sys.executable, str(ROOT / "tests" / "graph_worker.py"), str(data_dir), "t-kill"]
    calls = data_dir / "calls.log"
    first = graph_parts.kill_worker_mid_task(worker, calls, env)
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
    assert result["turns"][0]["persona"] == "BRICK"
    assert result["turns"][0]["text"].startswith(f"[{first_pid}]")


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
