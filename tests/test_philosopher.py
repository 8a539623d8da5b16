"""Philosopher: recurring dissonance -> a pending codex amendment (never applied by itself).

Real parts: EventBus, Codex, ProtoManager with the live invoke_llm, ModelManager on
the scripted backend (ALFRED's replies), HashEmbedder for similarity.
"""
from __future__ import annotations

import time

import pytest

from a4ps.codex import Codex
from a4ps.events import EventRecorder
from a4ps.services.philosopher import TEMPLATE_MARK, Philosopher, parse_draft

from fakes import FakeClock

SIMILAR = [
    "Should I tell my friend a hard truth about their failing business?",
    "Should I tell my colleague a hard truth about their failing project?",
    "Should I tell my brother a hard truth about his failing marriage?",
    "Should I tell my neighbour a hard truth about their failing garden?",
]
UNRELATED = "What is the boiling point of water at sea level?"
GOOD_DRAFT = ("PERSONA: ROBIN\nPRINCIPLE: honest_care\n"
              "TEXT: Be kind in how you say a hard truth, never by hiding it.\n"
              "RATIONALE: BRICK insists on honesty and ROBIN on kindness; this joins them.")


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
        # the model saw the evidence and the codex
        prompt = backend.calls[0][1][-1]["content"]
        assert "task1" in prompt and "ROBIN.care" in prompt and "PERSONA:" in prompt
        # the same evidence is spent: a repeat event does not propose again
        bus.publish("dissonance.high", event(4, SIMILAR[2]))
        assert p.flush(10)
        assert len(codex.pending()) == 1
    finally:
        p.stop()


@pytest.mark.parametrize("reply", [
    "I think everyone should just be nicer to each other.",
    "PERSONA: <ALFRED, BRICK or ROBIN>\nPRINCIPLE: <the principle id>\nTEXT: <one sentence>",
    "PERSONA: NOBODY\nPRINCIPLE: x\nTEXT: Be good to all people always.",
    "",
    "PERSONA: ROBIN\nPRINCIPLE: care\nTEXT: Notice how the question touches the people "
    "involved and speak to that with warmth.",                # no change at all
])
def test_unusable_draft_gives_a_clearly_templated_proposal(
        phil_settings, bus, protos, codex, embedder, backend, reply):
    backend.replies = [reply]
    p = make(phil_settings, bus, protos, codex, embedder)
    out = [p.observe(event(i, t)) for i, t in enumerate(SIMILAR[:3])]
    a = out[-1]
    assert out[:2] == [None, None] and a is not None
    assert a.persona == "ALFRED" and a.principle_id.startswith("reconcile_")
    assert TEMPLATE_MARK in a.rationale
    assert all(f"task{i}" in a.rationale for i in range(3))
    assert "hard truth" in a.proposed_text or "failing" in a.proposed_text
    assert codex.pending() == [a]


def test_model_failure_gives_a_templated_proposal(phil_settings, bus, protos, codex, embedder,
                                                   backend):
    backend.replies = []                                    # the backend raises ModelError
    p = make(phil_settings, bus, protos, codex, embedder)
    for i, t in enumerate(SIMILAR[:3]):
        a = p.observe(event(i, t))
    assert a is not None and TEMPLATE_MARK in a.rationale
    assert "ALFRED could not draft" in p.status()["last_error"]


def test_rejected_amendment_is_never_proposed_again(phil_settings, bus, protos, codex, embedder,
                                                     backend):
    p = make(phil_settings, bus, protos, codex, embedder)
    for i, t in enumerate(SIMILAR[:3]):
        a = p.observe(event(i, t))
    codex.decide(a.id, codex.version, False, by="user", reason="not like that")
    # the same pattern recurs and ALFRED drafts the very same amendment again
    for i, t in enumerate(SIMILAR[:3], start=10):
        b = p.observe(event(i, t))
    assert b is not None and b.proposed_text != a.proposed_text    # the template instead
    codex.decide(b.id, codex.version, False, by="user")
    for i, t in enumerate(SIMILAR[:3], start=20):
        c = p.observe(event(i, t))
    assert c is None                                      # both were rejected: nothing
    rejected = {(x.persona, x.principle_id, x.proposed_text) for x in (a, b)}
    assert all((x.persona, x.principle_id, x.proposed_text) not in rejected
               for x in codex.pending())
    skipped = p.status()["skipped"]
    assert skipped["rejected_before"] == 2 and skipped["refused_by_codex"] == 1
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
    backend.replies = lambda messages: (f"PERSONA: BRICK\nPRINCIPLE: rule_{next(n)}\n"
                                        "TEXT: State the hard truth and its kindest framing.\n")
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


# -- parsing -----------------------------------------------------------------------------

def test_parse_draft_reads_key_lines_markdown_and_json():
    assert parse_draft(GOOD_DRAFT) == {
        "persona": "ROBIN", "principle": "honest_care",
        "text": "Be kind in how you say a hard truth, never by hiding it.",
        "rationale": "BRICK insists on honesty and ROBIN on kindness; this joins them."}
    md = ("Here is my draft:\n**Persona:** BRICK\n- **Principle ID**: rigour\n"
          "**Proposed text:** \"Reason step by step,\n and check the feelings involved.\"\n")
    d = parse_draft(md)
    assert d["persona"] == "BRICK" and d["principle"] == "rigour"
    assert d["text"].startswith("Reason step by step,") and "feelings" in d["text"]
    js = 'Sure: {"persona": "ALFRED", "principle_id": "synthesis", "proposed_text": "Join both.", "rationale": "r"}'
    assert parse_draft(js)["principle"] == "synthesis"
    assert parse_draft("nothing useful") == {}
    assert parse_draft(None) == {}


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
