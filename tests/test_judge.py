"""The judge: strict reading of free-text scores and votes (a table of real failure
shapes), and ALFRED asked under constraint through ModelManager.choose.

Fast tests use the scripted backend (one script entry per decision; a reply naming no
option is a DecisionError, as from a real model). The slow test asks the real embedded
SmolLM2 for judgements.
"""
from __future__ import annotations

import pytest

from a4ps.fine_tuning.judge import (SCORE_OPTIONS, Judge, free_text_prompt, parse_score,
                                    parse_vote)

# (reply, expected score): every case from the issue, and their siblings
SCORE_TABLE = [
    ("-1", None),                                         # negative: never a score
    ("SCORE: -1", None),
    ("4/10", None),                                       # another scale
    ("Score: 8/10", None),
    ("SCORE: <a number from 1.0 to 5.0>", None),          # an echo of the rubric's template
    ("SCORE: <4>", None),
    ("The final answer is 4.", None),                     # an "answer" number, not a score
    ("The answer is 2 + 2 = 4.", None),
    ("I give it 4. Actually 2.", None),                   # two different scores
    ("Score: 4 because it covers 3 points", None),        # a second number: ambiguous
    ("3,5", None),
    ("7", None),                                          # out of the scale
    ("0", None),
    ("SCORE: 0.5", None),
    ("SCORE: 5.5", None),
    ("", None),
    ("garbage", None),
    ("score: four", None),                                # words are not read
    ("4 stars", None),                                    # a number not given as the score
    ("4", 4.0),
    ("4.", 4.0),
    ("**4.5**", 4.5),
    ("SCORE: 4\nCRITICAL: ROBIN", 4.0),
    ("SCORE: 3.5\nCRITICAL: BRICK", 3.5),
    ("I rate it 4 out of 5.", 4.0),
    ("Rating: 4/5", 4.0),
    ("4/5", 4.0),
    ("Score: 4 (on a 1-5 scale)", 4.0),                   # the stated scale is not a score
    ("I'd give it a 3", 3.0),
    ("My score is 3.", 3.0),
    ("Rated 2.0.", 2.0),
    ("SCORE: 5 SCORE: 5", 5.0),                           # the same score twice is one score
    ("score 1", 1.0),
]


def test_score_table_has_every_case_the_issue_lists():
    replies = [r for r, _ in SCORE_TABLE]
    for case in ("-1", "4/10", "SCORE: <a number from 1.0 to 5.0>", "The final answer is 4.",
                 "I give it 4. Actually 2."):
        assert case in replies
    assert len(SCORE_TABLE) >= 20


@pytest.mark.parametrize("reply,score", SCORE_TABLE)
def test_parse_score_is_strict(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply,vote", [
    ("SCORE: 4\nCRITICAL: ROBIN", "ROBIN"),
    ("score 4. critical - brick, though ROBIN helped", "BRICK"),
    ("BRICK carried it", "BRICK"),
    ("both BRICK and ROBIN", None),
    ("nobody", None),
    ("CRITICAL: <BRICK or ROBIN, whichever persona's contribution mattered more>", None),
    ("CRITICAL: BRICK\nCRITICAL: ROBIN", None),
    ("BRICK or ROBIN", None),
    (None, None),
])
def test_parse_vote_is_strict(reply, vote):
    assert parse_vote(reply) == vote


@pytest.fixture
def judged(settings, bus):
    """A Judge over the scripted backend; ``script`` holds ALFRED's decisions in order."""
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.models.manager import ModelManager
    from a4ps.models.scripted import ScriptedBackend
    from a4ps.proto import ProtoManager
    script: list = []
    backend = ScriptedBackend(lambda msgs: script.pop(0))
    models = ModelManager(settings, bus, backend=backend, embedder=HashEmbedder(dim=32))
    protos = ProtoManager(bus)
    protos.create("ALFRED", {"model_name": "alfred-model", "system_prompt": "You are ALFRED."})
    return Judge(models, protos), script, backend


def test_judge_asks_a_closed_choice_and_reads_the_value(judged):
    judge, script, backend = judged
    script[:] = ["4", "ROBIN"]
    v = judge.assess("What is 2+2?", "2 + 2 = 4", {"BRICK": "2+2=4", "ROBIN": "Happy to help: 4"})
    assert v.score == 4.0 and v.vote == "ROBIN" and v.error is None
    assert v.method.startswith("choose:") and v.flags == [] and v.reason is None
    (model, msgs, kw), (_, msgs2, kw2) = backend.calls
    assert model == "alfred-model" and msgs[0]["content"] == "You are ALFRED."
    assert kw["decision"] == list(SCORE_OPTIONS) and kw2["decision"] == ["BRICK", "ROBIN"]
    assert "BRICK SAID:\n2+2=4" in msgs[-1]["content"]
    assert "FINAL ANSWER:\n2 + 2 = 4" in msgs[-1]["content"]


@pytest.mark.parametrize("reply", ["seven", "4/10 or 5", "SCORE: <n>", "I give it 4. Actually 2."])
def test_a_decision_the_model_could_not_make_is_no_evidence(judged, reply):
    judge, script, _ = judged
    script[:] = [reply]
    v = judge.assess("Name a colour.", "Blue is a colour.")
    assert v.score is None and v.vote is None and "DecisionError" in v.error


def test_a_model_that_is_down_raises_for_the_caller_to_retry(judged):
    from a4ps.models.errors import ModelError
    judge, script, _ = judged
    with pytest.raises(ModelError):
        judge.assess("Name a colour.", "Blue is a colour.")   # empty script: the backend fails


def test_free_text_prompt_is_the_old_form():
    p = free_text_prompt("T", "A")
    assert "SCORE: <a number from 1.0 to 5.0>" in p and "TASK:\nT" in p


@pytest.mark.slow
def test_real_embedded_judge_always_answers_in_the_scale(embedded_models, bus):
    """SmolLM2 asked the rubric under constraint gives a score every time (in free text
    it mostly did not: bench/bench_selfimprove.py measures both). Whether the score
    means anything is tests/test_judge_discrimination.py's question."""
    from a4ps.proto import ProtoManager
    protos = ProtoManager(bus)
    protos.create("ALFRED", {"model_name": "smollm2-135m",
                             "system_prompt": "You are ALFRED, the steward."})
    judge = Judge(embedded_models, protos, method="rubric")
    cases = [("What is the capital of France?", "Paris is the capital of France."),
             ("What is the capital of France?", "Bananas are yellow and I like trains.")]
    for task, answer in cases:       # (each option is a forward pass on the CPU: few cases)
        v = judge.assess(task, answer)
        assert v.score in (1.0, 2.0, 3.0, 4.0, 5.0), v
        assert set(v.scores) == set(SCORE_OPTIONS)           # every option was weighed
        assert v.vote in ("BRICK", "ROBIN")
