"""Philosopher: recurring dissonance -> a pending codex amendment (never applied by itself);
an unusable draft is reported as such, never dressed up as ALFRED's proposal; the
clustering threshold is chosen from data.

Real parts: EventBus, Codex, ProtoManager, ModelManager on the scripted backend
(ALFRED's structured drafts, one script entry per decision), HashEmbedder for
similarity; the slow tests use the real MiniLM and SmolLM2.
"""
from __future__ import annotations

import time

import pytest

from a4ps.codex import Codex
from a4ps.events import EventRecorder
import json

from a4ps.services.philosopher import TEMPLATE_MARK, Philosopher

from fakes import FakeClock

SIMILAR = [
    "Should I tell my friend a hard truth about their failing business?",
    "Should I tell my colleague a hard truth about their failing project?",
    "Should I tell my brother a hard truth about his failing marriage?",
    "Should I tell my neighbour a hard truth about their failing garden?",
]
UNRELATED = "What is the boiling point of water at sea level?"
GOOD_DRAFT = json.dumps({"persona": "ROBIN", "principle_id": "honest_care",
                         "text": "Be kind in how you say a hard truth, never by hiding it.",
                         "rationale": "BRICK insists on honesty and ROBIN on kindness; this joins them."})


@pytest.fixture
def backend():
    from a4ps.models.scripted import ScriptedBackend
    return ScriptedBackend([GOOD_DRAFT])


@pytest.fixture
def codex(bus):
    from a4ps.system import CODEX_PATH
    return Codex.from_toml(CODEX_PATH, bus)


@pytest.fixture
def protos(settings, bus, backend, embedder, codex):
    from a4ps.models.manager import ModelManager
    from a4ps.proto import ProtoManager
    from a4ps.system import INVOKE_LLM
    pm = ProtoManager(bus)
    pm.provide("models", ModelManager(settings, bus, backend=backend, embedder=embedder))
    pm.create("persona", {"temperature": 0.0}, methods={"invoke_llm": INVOKE_LLM})
    for name in ("ALFRED", "BRICK", "ROBIN"):
        pm.clone("persona", name, model_name="scripted", system_prompt=codex.system_prompt(name))
    return pm


@pytest.fixture
def phil_settings(settings):
    settings.philosopher.recurrence_count = 3
    settings.philosopher.similarity = 0.5      # the hash embedder is cruder than MiniLM
    return settings


def make(phil_settings, bus, protos, codex, embedder, clock=time.time, memory=None):
    return Philosopher(phil_settings, bus, protos, memory, codex, embedder, clock=clock)


def event(i: int, text: str, d: float = 0.8) -> dict:
    return {"task_id": f"task{i}", "text": text, "dissonance": d,
            "brick": "Facts first: say it plainly.", "robin": "Protect the relationship."}


# -- recurrence -> proposal --------------------------------------------------------------

def test_recurring_similar_dissonance_gives_a_pending_amendment_citing_the_tasks(
        phil_settings, bus, protos, codex, embedder, backend):
    rec = EventRecorder(bus, "codex.proposed")
    p = make(phil_settings, bus, protos, codex, embedder).start()
    try:
        bus.publish("dissonance.high", event(1, SIMILAR[0]))
        bus.publish("dissonance.high", event(2, UNRELATED))      # not part of the pattern
        bus.publish("dissonance.high", event(3, SIMILAR[1]))
        assert p.flush(10)
        assert codex.pending() == [] and backend.calls == []      # 2 similar: not yet
        bus.publish("dissonance.high", event(4, SIMILAR[2]))
        assert p.flush(10)
        [a] = codex.pending()
        assert (a.persona, a.principle_id) == ("ROBIN", "honest_care")
        assert a.proposed_text == "Be kind in how you say a hard truth, never by hiding it."
        assert a.current_text == ""                                # a new principle
        assert a.origin == "philosopher" and a.status == "pending"
        assert sorted(a.sources) == ["task1", "task3", "task4"]
        for tid in ("task1", "task3", "task4"):
            assert tid in a.rationale
        assert "task2" not in a.rationale
        assert "honesty" in a.rationale                           # ALFRED's own reasoning kept
        assert rec.wait_for("codex.proposed", 1).payload["id"] == a.id
        assert codex.version == 1                                 # nothing applied
        assert "hard truth" not in codex.system_prompt("ROBIN")
        # the model saw the evidence and the codex, and was asked for the schema
        prompt = backend.calls[0][1][-1]["content"]
        assert "task1" in prompt and "ROBIN.care" in prompt
        schema = backend.calls[0][2]["decision"]
        assert schema["required"] == ["persona", "principle_id", "text", "rationale"]
        assert schema["properties"]["persona"]["enum"] == ["ALFRED", "BRICK", "ROBIN"]
        # the same evidence is spent: a repeat event does not propose again
        bus.publish("dissonance.high", event(4, SIMILAR[2]))
        assert p.flush(10)
        assert len(codex.pending()) == 1
    finally:
        p.stop()


UNUSABLE = [
    ("I think everyone should just be nicer to each other.", "DecisionError"),      # no JSON
    (json.dumps({"persona": "ROBIN", "principle_id": "x"}), "DecisionError"),       # fields missing
    (json.dumps({"persona": "ALFRED", "principle_id": "<the principle id>",
                 "text": "<one sentence>", "rationale": "r"}), "placeholders"),
    (json.dumps({"persona": "ROBIN", "principle_id": "care", "rationale": "r",
                 "text": "Notice how the question touches the people involved and speak to "
                         "that with warmth."}), "unchanged"),
    (json.dumps({"persona": "BRICK", "principle_id": "rigour", "text": "Be good.",
                 "rationale": "r"}), "too short"),
    ("", "DecisionError"),
]


@pytest.mark.parametrize("reply,why", UNUSABLE)
def test_an_unusable_draft_proposes_nothing_and_says_why(
        phil_settings, bus, protos, codex, embedder, backend, reply, why):
    backend.replies = [reply]
    rec = EventRecorder(bus)
    p = make(phil_settings, bus, protos, codex, embedder)
    out = [p.observe(event(i, t)) for i, t in enumerate(SIMILAR[:3])]
    assert out == [None, None, None] and codex.pending() == []
    [found] = p.status()["unresolved"]
    assert why in found["reason"] and sorted(found["sources"]) == ["task0", "task1", "task2"]
    ev = rec.wait_for("philosopher.no_draft", 1).payload
    assert ev["reason"] == found["reason"] and "task0" in ev["evidence"]
    logs = [e.payload["message"] for e in rec.of("log")]
    assert any("ALFRED's draft was unusable" in m and "a4ps codex propose" in m for m in logs)
    assert p.status()["skipped"]["unusable_draft"] == 1


@pytest.mark.parametrize("reply,why", UNUSABLE[:3])
def test_the_template_fallback_says_it_is_a_template_and_why(
        phil_settings, bus, protos, codex, embedder, backend, reply, why):
    phil_settings.philosopher.template_fallback = True
    backend.replies = [reply]
    p = make(phil_settings, bus, protos, codex, embedder)
    a = [p.observe(event(i, t)) for i, t in enumerate(SIMILAR[:3])][-1]
    assert a is not None and codex.pending() == [a]
    assert a.rationale.startswith(TEMPLATE_MARK + " ALFRED's draft was unusable (")
    assert why in a.rationale and "not ALFRED's proposal" in a.rationale
    assert all(f"task{i}" in a.rationale for i in range(3))
    assert a.persona == "ALFRED" and a.principle_id.startswith("reconcile_")


def test_model_failure_is_an_unusable_draft(phil_settings, bus, protos, codex, embedder, backend):
    backend.replies = []                                    # the backend raises ModelError
    p = make(phil_settings, bus, protos, codex, embedder)
    for i, t in enumerate(SIMILAR[:3]):
        assert p.observe(event(i, t)) is None
    assert "ALFRED could not draft" in p.status()["last_error"]
    assert "ALFRED gave no draft" in p.status()["unresolved"][0]["reason"]


def test_rejected_amendment_is_never_proposed_again(phil_settings, bus, protos, codex, embedder,
                                                     backend):
    p = make(phil_settings, bus, protos, codex, embedder)
    for i, t in enumerate(SIMILAR[:3]):
        a = p.observe(event(i, t))
    codex.decide(a.id, codex.version, False, by="user", reason="not like that")
    # the same pattern recurs and ALFRED drafts the very same amendment again
    for i, t in enumerate(SIMILAR[:3], start=10):
        b = p.observe(event(i, t))
    assert b is None and codex.pending() == []
    assert "rejected before" in p.status()["unresolved"][-1]["reason"]
    assert p.status()["skipped"]["rejected_before"] == 1
    assert codex.version == 1


def test_scheduled_review_drafts_from_two_similar_tasks_only_when_due(
        phil_settings, bus, protos, codex, embedder):
    phil_settings.philosopher.interval_s = 3600
    clock = FakeClock()
    p = make(phil_settings, bus, protos, codex, embedder, clock=clock)
    p.observe(event(1, SIMILAR[0]))
    p.observe(event(2, UNRELATED))
    assert p.tick() is None                               # not due yet
    clock.advance(3601)
    assert p.tick() is None                               # due, but no recurrence at all
    assert p.status()["skipped"]["review_without_recurrence"] == 1
    p.observe(event(3, SIMILAR[1]))
    assert codex.pending() == []
    assert p.tick() is None                               # the next review is an hour away
    clock.advance(3601)
    a = p.tick()
    assert a is not None and sorted(a.sources) == ["task1", "task3"]


def test_a_flood_of_recurrences_leaves_at_most_a_few_pending(phil_settings, bus, protos, codex,
                                                            embedder, backend):
    n = iter(range(1000))
    backend.replies = lambda messages: json.dumps({
        "persona": "BRICK", "principle_id": f"rule_{next(n)}", "rationale": "r",
        "text": "State the hard truth and its kindest framing."})
    p = make(phil_settings, bus, protos, codex, embedder)
    for i in range(30):
        p.observe(event(i, SIMILAR[i % 4] + f" case {i}"))
    assert 1 <= len(codex.pending()) <= 3


def test_bad_evidence_is_ignored(phil_settings, bus, protos, codex, embedder):
    p = make(phil_settings, bus, protos, codex, embedder)
    assert p.observe({"text": "no id"}) is None
    assert p.observe({"task_id": "t", "text": "   "}) is None
    assert p.status()["skipped"]["evidence_without_task_or_text"] == 2


def test_reflection_notes_from_memory_inform_the_draft(phil_settings, bus, protos, codex,
                                                       embedder, backend):
    from a4ps.memory import MemoryManager
    memory = MemoryManager(phil_settings, embedder, bus=bus)
    memory.add("Reflection on a hard truth: honesty and kindness can go together.",
               kind="reflection", persona="ALFRED", task_id="r1")
    p = make(phil_settings, bus, protos, codex, embedder, memory=memory)
    for i, t in enumerate(SIMILAR[:3]):
        p.observe(event(i, t))
    prompt = backend.calls[0][1][-1]["content"]
    assert "honesty and kindness can go together" in prompt


def test_evidence_is_recalled_from_memory_after_a_restart(phil_settings, bus, protos, codex,
                                                          embedder, backend):
    from a4ps.memory import MemoryManager
    memory = MemoryManager(phil_settings, embedder, bus=bus)
    for i, t in enumerate(SIMILAR[:3]):      # what the graph's remember node stores
        memory.add(f"Task: {t}\nAnswer: it depends", kind="interaction", persona="ALFRED",
                   task_id=f"old{i}", dissonance=0.9,
                   meta={"brick": "Say it.", "robin": "Spare them."})
    memory.add(f"Task: {SIMILAR[3]}\nAnswer: yes", kind="interaction", persona="ALFRED",
               task_id="calm", dissonance=0.1)
    p = make(phil_settings, bus, protos, codex, embedder, memory=memory).start()
    try:
        assert p.flush(10)
        [a] = codex.pending()
        assert sorted(a.sources) == ["old0", "old1", "old2"]
        assert "Say it." in backend.calls[0][1][-1]["content"]
    finally:
        p.stop()
    # another restart: those tasks are cited by an amendment already, so nothing new
    p2 = make(phil_settings, bus, protos, codex, embedder, memory=memory).start()
    try:
        assert p2.flush(10)
        assert len(codex.pending()) == 1 and p2.status()["tracked"] == 0
    finally:
        p2.stop()


def test_dissonance_on_a_reflection_task_is_not_evidence(phil_settings, bus, protos, codex,
                                                         embedder):
    p = make(phil_settings, bus, protos, codex, embedder)
    for i, t in enumerate(SIMILAR[:3]):
        assert p.observe({**event(i, t), "origin": "reflection"}) is None
    assert p.observe({**event(9, SIMILAR[0]), "meta": {"kind": "reflection"}}) is None
    assert codex.pending() == [] and p.status()["tracked"] == 0


# -- the threshold, from data; the real models ------------------------------------------

def test_choose_threshold_caps_false_merges():
    from a4ps.services.similarity import SimilarityReport, choose_threshold
    rep = SimilarityReport(paraphrase=[0.9, 0.8, 0.6, 0.45],
                           other_dilemma=[0.1, 0.2, 0.3, 0.55], unrelated=[0.0] * 996)
    t = choose_threshold(rep, max_false_merge=0.001)
    assert t == 0.31 and rep.rates(t) == (1.0, 0.001)       # 1 of 1000 others merged
    assert choose_threshold(rep, max_false_merge=0.0) == 0.56


@pytest.mark.slow
def test_the_shipped_threshold_is_the_one_the_shipped_embedder_calls_for(settings, minilm):
    """Paraphrases of the same dilemma vs different dilemmas vs unrelated tasks, with
    MiniLM: the default philosopher.similarity is what choose_threshold picks, it
    merges most paraphrases (the old 0.75 merged under a quarter) and almost nothing else."""
    from a4ps.services.similarity import choose_threshold, load_calibration, similarity_report
    rep = similarity_report(minilm, *load_calibration())     # the session's (the product's)
    shipped = settings.philosopher.similarity
    assert abs(choose_threshold(rep) - shipped) <= 0.02
    recall, false_merge = rep.rates(shipped)
    assert recall >= 0.8 and false_merge <= 0.002
    assert rep.rates(0.75)[0] < 0.4                  # what the old threshold missed
    s = rep.summary()
    assert s["paraphrase"]["median"] > s["other_dilemma"]["p95"] > s["unrelated"]["median"]


@pytest.mark.slow
def test_real_embedded_alfred_draft_is_reported_not_dressed(phil_settings, bus, codex,
                                                            embedded_models, minilm):
    """SmolLM2 asked for a structured draft: a usable one is proposed as ALFRED's; an
    unusable one (or a backend that cannot decode to a schema yet) is reported."""
    from a4ps.proto import ProtoManager
    phil_settings.philosopher.similarity = 0.51
    pm = ProtoManager(bus)
    pm.provide("models", embedded_models)
    pm.create("ALFRED", {"model_name": "smollm2-135m", "system_prompt": codex.system_prompt("ALFRED")})
    rec = EventRecorder(bus)
    p = Philosopher(phil_settings, bus, pm, None, codex, minilm)
    out = [p.observe(event(i, t)) for i, t in enumerate(SIMILAR[:3])]
    if out[-1] is not None:                          # a usable, schema-valid draft
        a = out[-1]
        assert TEMPLATE_MARK not in a.rationale and a.persona in codex.personas
    else:
        [found] = p.status()["unresolved"]
        assert found["reason"] and rec.of("philosopher.no_draft")
        assert codex.pending() == []
