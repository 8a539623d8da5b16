"""The pure parts of the cognitive graph: reading claims and final answers out of a
small model's reply, the repetition cut, task.token coalescing, the turn guard, and
the structured decisions on the scripted fake (a DecisionError is no decision)."""
from __future__ import annotations

import pytest

from a4ps.cognition import answers, decisions
from a4ps.cognition.signals import exact_computation
from a4ps.cognition.streaming import TokenStream, TurnGuard
from a4ps.events import EventBus, EventRecorder
from a4ps.models.errors import DecisionError
from fakes import FakeClock


# -- answers ---------------------------------------------------------------------------

def test_claims_drop_boilerplate_and_repeats():
    text = ("Sure! Paris is the capital of France. Paris is the capital of France. "
            "I hope this helps. It has the Eiffel Tower.")
    assert answers.claims(text) == ["Paris is the capital of France.",
                                    "It has the Eiffel Tower."]


def test_decimals_do_not_end_a_sentence():
    assert answers.sentences("It is 37.8 degrees. Warm.") == ["It is 37.8 degrees.", "Warm."]


@pytest.mark.parametrize("text, final", [
    ("Let me think.\nAnswer: 391\nBecause 17*23.", "391"),
    ("Certainly. The capital is Paris. It is big.", "The capital is Paris."),
    ("", ""),
])
def test_final_answer(text, final):
    assert answers.final_answer(text) == final


@pytest.mark.parametrize("a, b, same", [
    ("Answer: 12", "12. It is kind to check together.", True),
    ("The answer is 3.50 dollars.", "It costs 3.5 dollars in all.", True),
    ("Paris.", "paris", True),
    ("Paris is the capital.", "Lyon is the capital.", False),
    ("It is 12.", "It is 13.", False),
])
def test_agreement_on_final_answers(a, b, same):
    assert answers.agree(a, b) is same


def test_numbers_the_task_states_are_not_agreement():
    task = "How should 7 apples be shared among 3 friends?"
    assert not answers.agree("7 apples: give 2 each, keep 1.", "7 apples: share them fairly.", task)
    assert answers.agree("Give 2 each to the 3 friends.", "2 each, and 1 left.", task) is False
    assert answers.agree("2 each.", "Each gets 2.", task)


@pytest.mark.parametrize("text, kept", [
    ("The sky is blue. It scatters light. The sky is blue. It scatters", "The sky is blue. It scatters light."),
    ("c'est la France, c'est la France, c'est la France, c'est", "c'est la France"),
    ("One fine answer. Another fine point.", "One fine answer. Another fine point."),
    ("Yes. Yes. Yes.", "Yes. Yes. Yes."),        # short sentences are not a loop
])
def test_repetition_cut(text, kept):
    assert answers.strip_repeats(text) == kept


# -- streaming -------------------------------------------------------------------------

def test_token_stream_coalesces_and_never_merges_two_turns():
    bus, clock = EventBus(), FakeClock()
    rec = EventRecorder(bus)
    s = TokenStream(bus.publish, "t1", interval_s=0.05, clock=clock)
    s.delta("brick", "BRICK", 1, "Hel")           # first delta: published at once
    s.delta("brick", "BRICK", 1, "lo")            # within 50 ms: buffered
    clock.advance(0.01)
    s.delta("brick", "BRICK", 1, " there")
    clock.advance(0.05)
    s.delta("brick", "BRICK", 1, ".")             # 50 ms later: the buffer goes out
    s.delta("robin", "ROBIN", 1, "Hi")            # a new speaker flushes nothing of BRICK's into it
    s.flush()
    got = [(e.payload["persona"], e.payload["text"], e.payload["seq"]) for e in rec.of("task.token")]
    assert got == [("BRICK", "Hel", 1), ("BRICK", "lo there.", 2), ("ROBIN", "Hi", 3)]
    assert all(e.payload["task_id"] == "t1" and e.payload["round"] == 1 for e in rec.of("task.token"))


def test_turn_guard_stops_on_a_repeat_and_on_the_task_cancel():
    import threading
    cancel = threading.Event()
    g = TurnGuard(None, "brick", "BRICK", 1, cancel)
    for piece in ["The sky is blue.", " Light scatters.", " The sky is blue.", " Again"]:
        g(piece)
    assert g.is_set() and g.repeated and not g.task_cancelled
    assert g.kept() == "The sky is blue. Light scatters."
    g2 = TurnGuard(None, "robin", "ROBIN", 1, cancel)
    assert not g2.is_set()
    cancel.set()
    assert g2.is_set() and g2.task_cancelled


# -- decisions on the scripted fake ------------------------------------------------------

class P:
    """A persona proto stand-in: a model name and a system prompt."""

    def __init__(self, name="ALFRED"):
        self.name, self.model_name = name, "scripted-m"

    def get(self, key, default=None):
        return {"system_prompt": f"You are {self.name}."}.get(key, default)


def manager(decide):
    from a4ps.config import load_settings
    from a4ps.models.manager import ModelManager
    from a4ps.models.scripted import ScriptedBackend
    return ModelManager(load_settings(), EventBus(), backend=ScriptedBackend(decide=decide))


def test_route_decision_is_one_of_the_routes_or_no_decision():
    asked = []

    def decide(messages, options):
        asked.append(options)
        return "answer"
    d = decisions.decide_route(manager(decide), P(), "Who wrote Hamlet?")
    assert asked == [["answer", "talk", "calculate"]]       # the words the model weighs
    assert d.parsed and d.value == "direct" and d.method != "signal"
    asked.clear()
    d = decisions.decide_route(manager(lambda m, o: asked.append(o) or "calculate"), P(),
                               "Please think about this with me")
    assert d.value == "tool" and set(d.scores) <= set(decisions.ROUTES)
    d = decisions.decide_route(manager(lambda m, o: "SUGGESTION if you need"), P(), "hi")
    assert not d.parsed and d.value is None and "route: no decision" in d.problem
    assert d.record()["parsed"] is False


def test_tool_request_decision_has_the_forge_shape():
    def decide(messages, schema):
        assert schema == decisions.TOOL_REQUEST_SCHEMA
        return {"name": "Miles to KM!", "description": "  converts   miles ",
                "args": [{"name": "Miles", "value": "5"}, {"name": "unit", "value": "km"},
                         {"name": "miles", "value": "9"}, {"name": "", "value": "x"}]}
    d = decisions.decide_tool_request(manager(decide), P("BRICK"), "Convert 5 miles to km.")
    assert d.value == {"name": "miles_to_km", "description": "converts miles",
                       "args": {"miles": 5, "unit": "km"}}
    # no arguments is still a request, called with {}
    d = decisions.decide_tool_request(manager(lambda m, s: {"name": "today", "description": "",
                                                            "args": []}), P("BRICK"), "Date?")
    assert d.value == {"name": "today", "description": "today", "args": {}}


@pytest.mark.parametrize("task, evidence", [
    ("What is 17 times 23?", "17 times 23"),
    ("What is 15% of 240?", "15% of 240"),
    ("Convert 5 miles to kilometers.", "5 miles to kilometers"),
    ("How many grams are in 2.5 kilograms?", "How many grams are in 2.5 kilograms"),
    ("What is the square root of 144?", "square root of 144"),
])
def test_a_stated_computation_routes_to_the_tool_without_asking_the_model(task, evidence):
    def decide(messages, options):
        raise AssertionError("the model must not be asked")
    d = decisions.decide_route(manager(decide), P(), task)
    assert (d.value, d.method, d.evidence) == ("tool", "signal", evidence)
    assert d.record()["evidence"] == evidence


@pytest.mark.parametrize("task", [
    "Who wrote Hamlet?", "In what year did World War II end?",
    "My friend forgot my birthday and I feel hurt.", "List three primary colours.",
    "If all bloops are razzies, are all bloops lazzies?"])
def test_tasks_without_a_stated_computation_are_the_models_to_route(task):
    assert exact_computation(task) is None


def test_an_unusable_tool_name_is_asked_again_as_a_closed_choice():
    """The CI failure: the embedded decoder wrote '17' as the name for 'What is 17
    times 23?'. The name is then a choice among usable names; it always parses."""
    asked = []

    def decide(messages, asked_for):
        asked.append(asked_for)
        if isinstance(asked_for, dict):
            return {"name": "17", "description": "multiplies two numbers",
                    "args": [{"name": "a", "value": "17"}]}
        return asked_for[1]
    d = decisions.decide_tool_request(manager(decide), P("BRICK"), "What is 17 times 23?")
    options = asked[1]
    assert options[:2] == ["multiplies_two_numbers", "multiplies_two"]
    assert set(decisions.GENERIC_TOOL_NAMES) <= set(options)
    assert all(decisions.snake_case(o) == o for o in options)
    assert d.parsed and d.method == "structured+choose"
    assert d.value == {"name": "multiplies_two", "description": "multiplies two numbers",
                       "args": {"a": 17}}
    # nothing usable anywhere: the plain verbs are still there to choose
    assert decisions.name_options("", "17 + 4 = ?") == list(decisions.GENERIC_TOOL_NAMES)



def test_tool_names_from_words_skip_the_same_request_verbs_everywhere():
    """BRICK's name options and the forge's fallback name read words the same way: a
    request verb ("please compute") never becomes the tool's name."""
    from a4ps.cognition.graph import _request_name
    text = "Please compute the area of a circle"
    assert decisions.name_options(text, "")[0] == "area_circle"
    assert _request_name(None, text) == "area_circle"

def test_an_invalid_tool_request_is_no_decision():
    d = decisions.decide_tool_request(manager(lambda m, s: {"name": "x"}), P("BRICK"), "q")
    assert not d.parsed and "missing keys" in d.problem

    def raises(m, s):
        raise DecisionError("the embedded backend cannot decode to a JSON schema yet")
    d = decisions.decide_tool_request(manager(raises), P("BRICK"), "q")
    assert not d.parsed and "cannot decode" in d.problem


def test_answer_choice_is_one_of_the_candidates():
    d = decisions.decide_answer(manager(lambda m, o: o[1]), P(), "q", ["A is right.", "B is right."])
    assert d.value == "B is right."
