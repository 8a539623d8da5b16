"""Can ALFRED the judge tell a good answer from a bad one? (the curator keeps what it
scores high as training data, and the gate compares models by it).

Measured on the labelled set tests/judge_cases.py (a right answer per task, and
wrong, off-topic, empty/one-word, looping, refusing and echoing ones). The judge as it
was (the bare 1..5 ``choose`` on SmolLM2-135M) scored 5 for nearly everything:
pairwise accuracy 0.52, AUROC 0.52. The slow test asserts the floor on the real model.

Fast tests: the cheap checks on a table of shapes (and of right answers that merely
look like them), the metrics, the judge's logic on the scripted backend and on a
stand-in that scores options (named so: it returns the grounding a test gives it).
"""
from __future__ import annotations

import math

import pytest

import judge_cases
from a4ps.fine_tuning import judge_checks
from a4ps.fine_tuning.judge import (SCORE_OPTIONS, Judge, grounding_score)
from a4ps.models.base import Choice
from a4ps.models.scripted import ScriptedBackend

# -- the cheap checks ----------------------------------------------------------------------

FLAGGED = [   # (task, answer, the check that must fail)
    ("Name a colour.", "", "empty"),
    ("Name a colour.", "   \n ... ", "empty"),
    ("How does a bridge work?", "A bridge is a bridge. " * 4, "loop"),
    ("How does a bridge work?", "bridge bridge bridge bridge " * 6, "loop"),
    ("Tell me about rivers.", "the river flows to the sea and the river flows to the sea and "
                              "the river flows to the sea and the river flows", "loop"),
    ("What is the capital of France?", "What is the capital of France?", "echo"),
    ("What is the capital of France?", "what is the capital of france", "echo"),
    ("Translate 'thank you' into Spanish.", "I'm sorry, but I can't help with that.", "refusal"),
    ("Why is the sky blue?", "As an AI language model, I cannot answer.", "refusal"),
    ("Why is the sky blue?", "I am unable to explain that.", "refusal"),
    ("Why is the sky blue?", "Sorry, I don't know how to answer.", "refusal"),
    ("Why is the sky blue?", "Maybe.", "terse"),
    ("Suggest a name for a cat.", "I'm sorry, I can't suggest names.", "refusal"),
    ("What time is it?", "Unfortunately I am not able to tell the time.", "refusal"),
    ("Who wrote Hamlet?", "I won't answer that question.", "refusal"),
    # SmolLM2's own answers (greedy, 48 tokens): it grounds them well, having written them
    ("What is 7 multiplied by 8?", "To solve this problem, we need to find the product of 7 "
                                   "and 8. \n\n7 * 8 = 54\n\nSo, 7 multiplied by 8 is 54.",
     "arithmetic"),
    ("What is 12 plus 30?", "12 plus 30 equals 43.", "arithmetic"),
    ("Who wrote Romeo and Juliet?", "The play Romeo and Juliet by William Shakespeare is the "
                                    "story of a tragic ball scene in the balcony of", "unfinished"),
    ("Why do we sleep?", "Sleep restores the body. During sleep the brain sorts the memories "
                         "of the day, which", "unfinished"),
    # a wrong chain is still read whole; a right chain with a wrong sum after it is caught
    ("What is 1 + 2 + 3?", "1 + 2 + 3 = 7", "arithmetic"),
    ("What is 2 + 3 * 4?", "2 + 3 * 4 = 20", "arithmetic"),
    ("What is 2 + 3 * 4?", "2 + 3 * 4 = 14, and 7 * 8 = 54.", "arithmetic"),
    # Ollama/OpenAI models write curly apostrophes
    ("Translate 'thank you' into Spanish.", "I\u2019m sorry, but I can\u2019t help with that.",
     "refusal"),
    ("Suggest a name for a cat.", "I\u2019m sorry, I can\u2019t suggest names.", "refusal"),
    ("Why is the sky blue?", "I don\u2019t know how to answer that.", "refusal"),
    ("Why is the sky blue?", "I don't want to answer.", "refusal"),
    ("What is the capital of France?", "What is the capital of France? The capital of France?",
     "echo"),
    # a list item cut off on a word no sentence ends on is still unfinished
    ("Give me tips for sleeping well.", "Tips:\n- Keep a regular bedtime\n- Keep the "
                                        "bedroom dark and quiet and put away the", "unfinished"),
    # the checks on a chain in bold, or in brackets
    ("What is 7 times 8?", "**7 * 8 = 54**", "arithmetic"),
    ("What is 7 times 8?", "The product (7 * 8 = 54) is even.", "arithmetic"),
]

NOT_FLAGGED = [   # right answers in the shapes the checks must leave alone
    ("My dog died today.", "I'm sorry to hear that. Losing a dog is losing family; give "
                           "yourself time to grieve."),
    ("I feel sad.", "I am sorry you feel sad. Would you like to talk about what happened?"),
    ("I can't sleep.", "I'm sorry you can't sleep. Try a warm bath and a dark, quiet room."),
    ("My friend is ill.", "I'm sorry, I can't imagine how hard that is. Be there and listen."),
    ("Give me three tips for focus.", "1. Put your phone away. 2. Work in 25-minute blocks. "
                                      "3. Take a short walk between blocks."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 7 times 8?", "56 (7 times 8)."),
    ("What is 7 times 8?", "56"),
    ("Give me a UUID.", "3f2b8c1e-4d5a-4e6f-9a7b-1c2d3e4f5a6b"),
    ("What is the capital of France? Answer in a sentence.", "The capital of France is Paris."),
    ("Can you refuse politely?", "Of course: 'Thank you, but I can't make it this time.'"),
    ("Repeat after me: hello world.", "Hello world, as you asked."),
    ("Write a line of a song.", "Row, row, row your boat, gently down the stream."),
    ("What did she text you?", "She said: 'I can't come tonight, I am ill.'"),
    ("Do you like rain?", "Honestly, I do like rain: the sound of it on the roof is calming."),
    ("What is 7 times 8?", "7 * 8 = 56, and 56 / 8 = 7 checks it."),
    ("What is 10 divided by 3?", "10 / 3 = 3.33 (rounded to two decimals)."),
    ("When was the war?", "It lasted from 1939-1945 is what most books say."),
    ("Show the steps.", "First add the numbers:\n- 1,000 + 2,000 = 3,000\n- then double it"),
    ("Write a short poem.", "Leaves fall in the lane\nthe quiet hush of the rain\n"
                            "and the day goes grey"),
    ("Write a short poem.", "Leaves fall slowly in the narrow lane\nthe quiet hush of the "
                            "falling rain\nand all the day goes soft and grey"),
    # chained arithmetic is read whole, not by its tail ("2 + 3 = 6", "3 * 4 = 14")
    ("What is 1 + 2 + 3?", "1 + 2 + 3 = 6"),
    ("What is 2 + 3 * 4?", "2 + 3 * 4 = 14, since multiplication comes first."),
    ("What is 10 - 2 - 3?", "10 - 2 - 3 = 5"),
    ("What is 2 * 3 + 4?", "2 * 3 + 4 = 10"),
    ("Add them up.", "Step by step: 1 + 2 = 3, then 3 + 3 = 6, so 1 + 2 + 3 = 6."),
    # an answer that restates the task's words in another order answers it
    ("Is the sun a star?", "The sun is a star."),
    ("Is water wet?", "Water is wet."),
    # "I don't/can't <verb>" that is not declining
    ("Is the Earth flat?", "I don't think so: the Earth is round."),
    ("Is this book good?", "I can't recommend this book enough!"),
    ("Is this book good?", "I can\u2019t recommend this book enough!"),
    ("Should I study?", "I can't stress this enough: yes, every day."),
    ("Can I open the window?", "I don't mind at all, go ahead."),
    ("Is it true?", "I don't agree with that, it is a myth."),
    # an expression the check cannot read whole is left alone, not read by a piece
    ("What is 2 to the power 3, plus 1?", "2^3 + 1 = 9"),
    ("What is (1 + 2) * 3?", "(1 + 2) * 3 = 9"),
    ("Show it is six.", "2 * 3 = 3 + 3 = 6"),
    # a markdown list: its items need no full stop
    ("Give me tips for sleeping well.", "Here are some tips for sleeping well:\n"
                                        "- Keep a regular bedtime and wake time every day\n"
                                        "- Keep the bedroom dark, quiet and cool at night "
                                        "and put the phone in another room"),
    ("List the steps to make tea.", "To make tea:\n1. Boil fresh water in the kettle\n"
                                    "2. Pour it on the tea bag in the cup and wait three"
                                    " minutes for it"),
    ("Give me tips.", "Some tips:\n* Drink plenty of water through the day so that"
                      " you are never thirsty at all"),
]


@pytest.mark.parametrize("task,answer,name", FLAGGED)
def test_cheap_checks_flag_the_shapes_a_small_model_misses(task, answer, name):
    flags = judge_checks.check(task, answer)
    assert [f.name for f in flags][:1] == [name], flags
    assert flags[0].reason and flags[0].cap < 4.0


@pytest.mark.parametrize("task,answer", NOT_FLAGGED)
def test_cheap_checks_leave_right_answers_alone(task, answer):
    assert judge_checks.check(task, answer) == []


def test_off_topic_check_needs_a_measured_floor():
    from a4ps.models.embeddings import HashEmbedder
    e = HashEmbedder(dim=256)
    task = "How do bees make honey from nectar?"
    # the stand-in embedder has no measured floor: the check is not used with it
    assert judge_checks.relevance_floor(e) is None
    assert judge_checks.off_topic(task, "Chess is played on a board of 64 squares.", e) is None
    # given a floor, the check compares the similarity with it (hash embeddings: shared words)
    flag = judge_checks.off_topic(task, "Chess is played on a board of 64 squares.", e, floor=0.2)
    assert flag is not None and flag.name == "off_topic" and "similarity" in flag.reason
    assert judge_checks.off_topic(task, "Bees make honey from nectar they store and dry.",
                                  e, floor=0.2) is None
    assert judge_checks.off_topic(task, "Chess rules.", e, floor=0.2) is None   # too short
    assert judge_checks.relevance_floor(None) is None


# -- the metrics ---------------------------------------------------------------------------

def test_discrimination_of_a_blind_judge_is_chance_and_of_a_perfect_one_is_one():
    cs = judge_cases.cases()
    blind = judge_cases.discrimination([(c, 5.0) for c in cs])
    assert blind["pairwise"] == 0.5 and blind["auroc"] == 0.5
    assert all(v == 1.0 for v in blind["kept"].values())        # it keeps every bad answer
    perfect = judge_cases.discrimination([(c, 5.0 if c.kind == "good" else 1.0) for c in cs])
    assert perfect["pairwise"] == 1.0 and perfect["auroc"] == 1.0
    assert perfect["kept"]["good"] == 1.0 and perfect["kept"]["loop"] == 0.0
    inverted = judge_cases.discrimination([(c, 1.0 if c.kind == "good" else 5.0) for c in cs])
    assert inverted["pairwise"] == 0.0
    # no score is no evidence: it ranks below every score and is never kept
    none_bad = judge_cases.discrimination([(c, 2.0 if c.kind == "good" else None) for c in cs])
    assert none_bad["pairwise"] == 1.0 and none_bad["kept"]["good"] == 0.0
    assert none_bad["distribution"]["none"] == len(cs) - len(judge_cases._TASKS)


@pytest.mark.parametrize("held_out", [False, True])
def test_the_labelled_set_has_every_bad_kind_for_every_task(held_out):
    tasks = judge_cases._HELD_OUT if held_out else judge_cases._TASKS
    cs = judge_cases.cases(held_out=held_out)
    assert len(cs) == 7 * len(tasks) and len(tasks) >= 6
    for g in range(len(tasks)):
        assert sorted(c.kind for c in cs if c.group == g) == sorted(("good",) + judge_cases.BAD_KINDS)


# -- the judge's logic ---------------------------------------------------------------------

def _judge(settings, bus, backend, **kw):
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.models.manager import ModelManager
    from a4ps.proto import ProtoManager
    models = ModelManager(settings, bus, backend=backend, embedder=HashEmbedder(dim=32))
    protos = ProtoManager(bus)
    protos.create("ALFRED", {"model_name": "alfred-model", "system_prompt": "You are ALFRED."})
    return Judge(models, protos, **kw)


def test_a_blind_model_is_no_longer_trusted_with_what_the_checks_see(settings, bus):
    """The failure seen on SmolLM2: the model says 5 for everything. With the checks
    the judge still ranks the right answer above every empty, looping, echoing,
    refusing and one-word answer, and the curator's threshold keeps none of them."""
    backend = ScriptedBackend(decide=lambda msgs, asked: "5")
    judge = _judge(settings, bus, backend)
    every = judge_cases.cases() + judge_cases.cases(held_out=True)
    for subset in (judge_cases.cases(), judge_cases.cases(held_out=True)):
        res = judge_cases.measure(lambda t, a: judge.score(t, a).score, subset)
        for kind in ("short", "loop", "refusal", "echo"):
            assert res["per_kind"][kind] == 1.0, (kind, res)
            assert res["kept"][kind] == 0.0, (kind, res)
        assert res["kept"]["good"] == 1.0
    # the model was not asked about the answers the checks rejected outright
    n_hard = sum(1 for c in every
                 if any(f.cap <= 1.0 for f in judge_checks.check(c.task, c.answer)))
    assert len(backend.calls) == len(every) - n_hard


def test_a_rejected_answer_says_why_and_a_capped_one_keeps_the_cap(settings, bus):
    backend = ScriptedBackend(decide=lambda msgs, asked: "5")
    judge = _judge(settings, bus, backend)
    v = judge.score("How does a bridge work?", "A bridge is a bridge. " * 4)
    assert v.score == 1.0 and v.flags == ["loop"] and "repeated 4 times" in v.reason
    assert v.method == "checks" and backend.calls == []
    v = judge.score("Why is the sky blue?", "Maybe.")
    assert v.score == 2.0 and v.flags == ["terse"] and "one-word" in v.reason
    assert v.method.startswith("choose:")          # the model was asked; its 5 was capped
    # a decision the model could not make stays no evidence, with the flags kept
    judge = _judge(settings, bus, ScriptedBackend(decide=lambda msgs, asked: "seven"))
    v = judge.score("Why is the sky blue?", "Maybe.")
    assert v.score is None and "DecisionError" in v.error and v.flags == ["terse"]


def test_a_check_can_be_ignored_where_the_caller_made_the_shape(settings, bus):
    """The gate cuts answers at a token limit itself: it ignores ``unfinished``."""
    cut = ("Sleep restores the body. During sleep the brain sorts the memories of the "
           "day, which")
    backend = ScriptedBackend(decide=lambda msgs, asked: "5")
    assert _judge(settings, bus, backend).score("Why do we sleep?", cut).score == 2.0
    gate = _judge(settings, bus, backend, ignore=("unfinished",))
    assert gate.score("Why do we sleep?", cut).score == 5.0
    assert gate.score("Why do we sleep?", "Sleep. " * 4).flags == ["loop"]   # the rest apply
    with pytest.raises(ValueError,
                       match=r"unknown judge checks \['unfinshed'\]; they are .*'unfinished'"):
        _judge(settings, bus, backend, ignore=("unfinshed",))


def test_checks_can_be_turned_off_for_the_bare_model(settings, bus):
    backend = ScriptedBackend(decide=lambda msgs, asked: "5")
    judge = _judge(settings, bus, backend, checks=False)
    assert judge.score("Name a colour.", "Name a colour.").score == 5.0
    with pytest.raises(ValueError):
        _judge(settings, bus, backend, method="vibes")


class GroundingStandin(ScriptedBackend):
    """A STAND-IN for a backend that scores options (the embedded one): ``choose``
    returns, for each option, the grounding the test's function gives it."""

    scores_options = True

    def __init__(self, grounding):
        super().__init__()
        self.grounding = grounding
        self.asked: list[tuple[list, list]] = []

    def choose(self, messages, options, *, cancel=None):
        self.asked.append((messages, list(options)))
        scores = {o: self.grounding(messages, o) for o in options}
        return Choice(max(options, key=scores.__getitem__), scores, "scored-calibrated")


def test_grounding_is_asked_on_a_backend_that_scores_options(settings, bus):
    backend = GroundingStandin(lambda msgs, o: 30.0 if "Paris" in o else -5.0)
    judge = _judge(settings, bus, backend)
    good = judge.score("What is the capital of France?", "The capital of France is Paris.")
    bad = judge.score("What is the capital of France?", "Bananas grow in tropical places.")
    assert good.method == "grounding:scored-calibrated" and good.scores == {"grounding_nats": 30.0}
    assert good.score == grounding_score(30.0) and good.score > 4.5
    assert bad.score == grounding_score(-5.0) and bad.score < 2
    # asked: the task alone as the user's message, the answer as the one option
    msgs, options = backend.asked[0]
    assert msgs == [{"role": "user", "content": "What is the capital of France?"}]
    assert options == ["The capital of France is Paris."]
    # the checks still cap a grounded score
    v = judge.score("Why is the sky blue?", "Paris.")
    assert v.score == 2.0 and v.flags == ["terse"]
    # forced rubric on the same backend asks the 1..5 choice instead
    backend.asked.clear()
    judge = _judge(settings, bus, backend, method="rubric")
    judge.score("What is the capital of France?", "The capital of France is Paris.")
    assert backend.asked[0][1] == list(SCORE_OPTIONS)


def test_grounding_without_scores_is_no_evidence(settings, bus):
    backend = ScriptedBackend(decide=lambda msgs, asked: asked[0])   # picks, never scores
    judge = _judge(settings, bus, backend, method="grounding")
    v = judge.score("What is the capital of France?", "The capital of France is Paris.")
    assert v.score is None and "rubric" in v.error
    # auto on a backend that only picks: the rubric, as before
    judge = _judge(settings, bus, ScriptedBackend(decide=lambda msgs, asked: "4"))
    assert judge.score("What is the capital of France?", "Paris is the capital.").score == 4.0


def test_grounding_score_is_monotone_in_the_scale_and_four_near_twelve_nats():
    xs = [-50, -5, 0, 5, 10, 12, 12.5, 15, 30, 60]
    ys = [grounding_score(x) for x in xs]
    assert all(1.0 <= y <= 5.0 for y in ys) and ys == sorted(ys)
    assert len(set(ys[:-1])) == len(ys) - 1
    assert grounding_score(12.0) < 4.0 < grounding_score(12.5)
    assert grounding_score(0.0) < 2.0
    assert not math.isnan(grounding_score(1e9))


# -- the real model ------------------------------------------------------------------------

#: the floors the judge must reach on the labelled set with SmolLM2-135M + MiniLM (the
#: judge as it was: pairwise 0.52, AUROC 0.52, every bad kind kept 75-100% at 4.0)
PAIRWISE_FLOOR, AUROC_FLOOR, KIND_FLOOR = 0.85, 0.80, 0.75


@pytest.mark.slow
@pytest.mark.parametrize("held_out", [False, True], ids=["set", "held-out"])
def test_real_judge_tells_good_answers_from_bad(embedded_models, bus, held_out):
    from a4ps.proto import ProtoManager
    protos = ProtoManager(bus)
    protos.create("ALFRED", {"model_name": "smollm2-135m",
                             "system_prompt": "You are ALFRED, the steward."})
    judge = Judge(embedded_models, protos, embedder=embedded_models.embedder)
    res = judge_cases.measure(lambda t, a: judge.score(t, a).score,
                              judge_cases.cases(held_out=held_out))
    print(res)
    assert res["pairwise"] >= PAIRWISE_FLOOR and res["auroc"] >= AUROC_FLOOR, res
    per_kind = res["per_kind"]
    assert isinstance(per_kind, dict)
    for kind, acc in per_kind.items():
        assert acc >= KIND_FLOOR, (kind, res)
    kept = res["kept"]
    assert isinstance(kept, dict)
    for kind in ("off_topic", "short", "loop", "refusal", "echo"):
        assert kept[kind] == 0.0, (kind, res)        # none of these becomes training data
    assert kept["good"] >= 0.6, res                  # and most right answers still do


@pytest.mark.slow
def test_real_checks_leave_right_answers_of_any_topic_alone(minilm):
    """MiniLM: right answers that share little with their task are not called off topic."""
    cases = [("Tell me a joke.", "Why did the scarecrow win an award? Because he was "
                                 "outstanding in his field."),
             ("Compute the SHA-256 hash of the word banana.",
              "b493d48364afe44d11c0165cf470a4164d1e2609911ef998be868d46ade3de4e"),
             ("How does a clock work?", "ANALYSIS: It has three parts: inputs, a process and "
                                        "outputs. Each part depends on the one before."),
             *NOT_FLAGGED]
    for task, answer in cases:
        assert judge_checks.check(task, answer, minilm) == [], (task, answer)
    assert judge_checks.check("What is the capital of France?",
                              "Bananas are rich in potassium and grow in tropical climates.",
                              minilm)[0].name == "off_topic"
