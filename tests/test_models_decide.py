"""Decisions on the embedded engines: calibrated choice and schema walking.

Fast tests run the decision code on a stand-in engine (tests/model_standins.py) with a
real tokenizer; the slow ones run SmolLM2 on the default engine (CTranslate2) and on
the transformers fallback, and measure accuracy on tests/decision_cases.py.
"""
from __future__ import annotations

import random
import threading

import pytest

from a4ps.models.decide import Decider, content_free, with_json_hint
from a4ps.models.errors import GenerationCancelled
from a4ps.models.schema import check_schema, validate
from model_standins import StandInEngine, char_tokenizer

TOOL_REQUEST = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "description": {"type": "string", "maxLength": 120},
    "args": {"anyOf": [{"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "number", "minimum": -5, "maximum": 5}}},
        {"type": "null"}]}},
    "required": ["name", "description", "args"]}
JUDGE = {"type": "object", "properties": {
    "score": {"type": "integer", "minimum": 1, "maximum": 10},
    "verdict": {"enum": ["keep", "drop"]},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    "reason": {"type": "string", "maxLength": 30}}}
SCHEMAS = [TOOL_REQUEST, JUDGE,
           {"type": "object", "properties": {"route": {"type": "string",
                                                       "enum": ["direct", "tool"]}}},
           {"type": "object", "properties": {"n": {"type": "integer", "minimum": -1000,
                                                   "maximum": 1000},
                                             "x": {"type": "number"}}}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("tok"))


def _user(text):
    return [{"role": "system", "content": "You decide."}, {"role": "user", "content": text}]


# -- choose -----------------------------------------------------------------------

def test_calibration_removes_a_bias_the_prompt_does_not_explain(tok):
    """The stand-in likes "dialogue" whatever it is asked (as SmolLM2 did); the
    question itself adds a little evidence for "direct". Raw scores pick the bias,
    calibrated scores pick what the question points to."""
    def prefers(prompt, cont):
        bias = {"dialogue": -1.0, "direct": -4.0, "tool": -6.0}[cont.lower()]
        evidence = 1.5 if cont.lower() == "direct" and "capital" in prompt else 0.0
        return bias + evidence
    d = Decider(StandInEngine(tok, prefers=prefers), tok)
    msgs = _user("Task: What is the capital of France? Answer direct, dialogue or tool.")
    assert d.choose(msgs, ["direct", "dialogue", "tool"], method="sum").value == "dialogue"
    got = d.choose(msgs, ["direct", "dialogue", "tool"])
    assert got.value == "direct" and got.method == "scored-calibrated"
    assert set(got.scores) == {"direct", "dialogue", "tool"}


def test_content_free_prompt_replaces_only_the_last_user_message():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "second"}]
    cf = content_free(msgs)
    assert [m["content"] for m in cf] == ["S", "first", "A", "N/A"]
    assert msgs[-1]["content"] == "second"            # the caller's list is untouched


def test_choose_weighs_every_spelling_of_an_option(tok):
    seen = []

    def prefers(prompt, cont):
        seen.append(cont)
        return -1.0
    Decider(StandInEngine(tok, prefers=prefers), tok).choose(_user("yes?"), ["yes", "no"])
    assert {"yes", "Yes", "no", "No"} <= set(seen)


def test_content_free_scores_are_cached(tok):
    calls = []

    def prefers(prompt, cont):
        calls.append(prompt.endswith("N/A<|im_end|>\n<|im_start|>assistant\n"))
        return -1.0
    d = Decider(StandInEngine(tok, prefers=prefers), tok)
    d.choose(_user("one"), ["a", "b"])
    n_cf = sum(calls)
    d.choose(_user("two"), ["a", "b"])
    assert n_cf > 0 and sum(calls) == n_cf            # the second call reused them


def test_choose_stops_when_cancelled(tok):
    ev = threading.Event()
    ev.set()
    with pytest.raises(GenerationCancelled):
        Decider(StandInEngine(tok), tok).choose(_user("x"), ["a", "b"], cancel=ev)


# -- structured ---------------------------------------------------------------------

def test_structured_writes_the_skeleton_and_asks_the_model_only_for_values(tok):
    writes = {'"name": "': 'multiply_numbers", "description": "x',
              '"description": "': "Multiplies two numbers\nand more",
              '"a":': ' 17, "b": 3'}

    def write(prompt):
        return next((text for tail, text in writes.items() if prompt.endswith(tail)),
                    "nothing")

    def prefers(prompt, cont):
        return {"{": -0.1, " null": -3.0}.get(cont, -1.0)
    eng = StandInEngine(tok, prefers=prefers, writes=write)
    out = Decider(eng, tok).structured(_user("I need 17 times 23."), TOOL_REQUEST)
    assert out["name"] == "multiply_numbers"                  # cut at the closing quote
    assert out["description"] == "Multiplies two numbers"     # cut at the newline
    assert out["args"]["a"] == 17
    assert validate(out, TOOL_REQUEST) == out
    assert eng.closed == len(eng.streamed)                    # every stream was closed


def test_structured_keeps_numbers_in_range_and_strings_short(tok):
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 100},
        "s": {"type": "string", "maxLength": 5}}}
    eng = StandInEngine(tok, writes=lambda p: " 123456" if p.endswith('"n":') else "abcdefghij")
    out = Decider(eng, tok).structured(_user("go"), schema)
    assert out == {"n": 100, "s": "abcde"}


def test_small_integer_ranges_are_scored_value_by_value(tok):
    eng = StandInEngine(tok, prefers=lambda p, c: 0.0 if c.strip() == "7" and "rate" in p
                        else -5.0)
    out = Decider(eng, tok).structured(_user("rate it"), JUDGE)
    assert out["score"] == 7
    assert not any(p.endswith('"score":') for p in eng.stream_prompts)   # never generated


@pytest.mark.parametrize("seed", range(40))
def test_structured_always_validates_whatever_the_model_does(tok, seed):
    """A stand-in that scores and writes at random (quotes, backslashes, digits,
    newlines): every object still validates against its schema."""
    rng = random.Random(seed)
    d = Decider(StandInEngine(tok, rng=rng), tok)
    schema = SCHEMAS[seed % len(SCHEMAS)]
    check_schema(schema)
    out = d.structured(_user(f"case {seed}"), schema)
    assert validate(out, schema) == out


def test_json_hint_tells_the_model_the_fields():
    msgs = with_json_hint(_user("pick"), TOOL_REQUEST)
    assert msgs[-1]["content"].startswith("pick\n\nAnswer in JSON: {\"name\": string")
    assert _user("pick")[-1]["content"] == "pick"


def test_structured_stops_when_cancelled(tok):
    ev = threading.Event()
    ev.set()
    with pytest.raises(GenerationCancelled):
        Decider(StandInEngine(tok), tok).structured(_user("x"), JUDGE, cancel=ev)


# -- the real model (slow) ------------------------------------------------------------

def _route_questions():
    import decision_cases
    return decision_cases.cases()


class _ScoredOnce:
    """The real engine, each (prefix, continuations) scored once: a case's raw sum is
    the calibrated score's first half, so the "sum" pass re-uses its forward passes.
    Everything else (``stream`` for the schema walk) is the engine's own."""

    def __init__(self, engine) -> None:
        self.engine, self.memo = engine, {}

    def score(self, prefix, continuations):
        key = (tuple(prefix), tuple(tuple(c) for c in continuations))
        if key not in self.memo:
            self.memo[key] = self.engine.score(prefix, continuations)
        return self.memo[key]

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def shipped_decider(embedded_models):
    """The embedded backend's own Decider, its engine's forward passes kept for this
    module: the 40 labelled choices the parse test asks through the manager are the
    calibrated measurement's own forward passes (same prompts, same engine), so the
    measurement re-uses them instead of running them a second time (~20 s)."""
    from a4ps.models.embedded import BASE_ID
    embedded_models.load(BASE_ID)
    shipped = embedded_models.backend._decide()
    real = shipped.engine
    shipped.engine = _ScoredOnce(real)
    yield shipped
    shipped.engine = real


@pytest.mark.slow
@pytest.mark.timeout(1800)     # 60 real decisions: about 1 min idle, far more on a busy box
def test_fifty_real_choices_and_structured_decisions_always_parse(embedded_models,
                                                                  shipped_decider):
    """Every labelled choice (40) and every schema x task structured call (20) on
    SmolLM2 (default engine): each returns an allowed option / a valid object.
    Decisions are greedy, so asking a case twice (as the first 50 + 50 loop did for 40
    of its 100 calls) gives the same answer and proves nothing more."""
    from a4ps.models.embedded import BASE_ID
    cases = _route_questions()
    assert len(cases) >= 40
    for _, msgs, options, _ in cases:
        c = embedded_models.choose(BASE_ID, msgs, options)
        assert c.value in options and set(c.scores) == set(options)
    tasks = ["What is 17 times 23?", "Sort these words: pear, apple, fig.",
             "Convert 100 Fahrenheit to Celsius.", "Count the vowels in 'banana'.",
             "Reverse the string 'lighthouse'."]
    for i in range(len(SCHEMAS) * len(tasks)):     # each (schema, task) pair once
        schema = SCHEMAS[i % len(SCHEMAS)]
        task = tasks[i % len(tasks)]
        out = embedded_models.structured(BASE_ID, f"Task: {task}\nDescribe the tool that "
                                                  f"would do it.", schema)
        assert validate(out, schema) == out


@pytest.mark.slow
def test_calibrated_choice_beats_raw_scores_on_the_labelled_set(shipped_decider):
    """The measurement that chose the default: calibrated accuracy on
    tests/decision_cases.py is at least the raw sum's, and clearly above chance."""
    import decision_cases
    d = Decider(shipped_decider.engine, shipped_decider.tok)
    acc = {m: decision_cases.accuracy(lambda msgs, o, mm: d.choose(msgs, o, method=mm).value, m)
           for m in ("calibrated", "sum")}
    chance = 0.40        # the set's mix of 2-, 3- and 4-way choices
    assert acc["calibrated"][0] >= acc["sum"][0], acc
    assert acc["calibrated"][0] > chance + 0.1, acc
