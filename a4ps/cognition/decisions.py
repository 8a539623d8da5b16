"""The graph's decisions, asked of a model under constraint.

Every decision goes through ``models.choose`` (a closed choice) or
``models.structured`` (an object in a JSON schema), so a 135M model cannot answer
outside what is allowed. A decision that cannot be made (the backend raises
:class:`~a4ps.models.errors.DecisionError`) is *no decision*: the caller gets a
:class:`Decision` with ``value=None`` and a ``problem`` to record, never a default
that pretends to be the model's answer.

* :func:`decide_route` — ALFRED: ``direct`` | ``contrapunto`` | ``tool``. A hybrid: a
  task that states an exact computation goes to ``tool`` on that signal alone
  (:mod:`a4ps.cognition.signals`, ``method="signal"``, the words that decided in
  ``evidence``); the model decides every other task, as a closed choice among three
  everyday words (:data:`ROUTE_LABELS`: SmolLM2-135M sorts tasks into "answer / talk /
  calculate" far better than into the routes' own names; measured on the suite's tune
  split, see docs/architecture.md).
* :func:`decide_tool` — BRICK: which registered tool the task needs, or ``none``.
* :func:`decide_tool_request` — BRICK: ``{name, description, args}`` for the forge (a
  name he wrote unusably is asked again as a closed choice, so it always parses).
* :func:`decide_answer` — ALFRED picks one of the candidate answers the dialogue produced.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from a4ps.cognition import prompts
from a4ps.cognition.signals import exact_computation
from a4ps.models.errors import DecisionError

if TYPE_CHECKING:
    from a4ps.models.base import CancelToken
    from a4ps.models.manager import ModelManager
    from a4ps.proto import Proto

ROUTES = prompts.ROUTES
ROUTE_LABELS = prompts.ROUTE_LABELS          # route -> the word the model chooses
NO_TOOL = prompts.NO_TOOL

TOOL_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "description": {"type": "string", "maxLength": 160},
        "args": {"type": "array", "maxItems": 4, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 24},
                           "value": {"type": "string", "maxLength": 48}},
            "required": ["name", "value"]}},
    },
    "required": ["name", "description", "args"],
}


@dataclass
class Decision:
    """What a decision produced: ``value`` (None = no decision) and how it went."""
    kind: str
    value: Any
    problem: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    method: str | None = None
    seconds: float = 0.0
    evidence: str | None = None     # what decided, when it was not the model (a signal)

    @property
    def parsed(self) -> bool:
        return self.value is not None

    def record(self) -> dict[str, Any]:
        """Plain data for the state's ``decisions`` list and the step payload."""
        return {"kind": self.kind, "value": self.value, "parsed": self.parsed,
                "problem": self.problem, "method": self.method,
                "scores": {k: round(v, 4) for k, v in self.scores.items()},
                "seconds": round(self.seconds, 4), "evidence": self.evidence}


def _ask(kind: str, fn: Any) -> tuple[Any, str | None, float]:
    import time
    t0 = time.perf_counter()
    try:
        return fn(), None, time.perf_counter() - t0
    except DecisionError as e:
        return None, f"{kind}: no decision ({e})", time.perf_counter() - t0


def decide_route(models: ModelManager, alfred: Proto, task: str, *,
                 cancel: CancelToken | None = None) -> Decision:
    """ALFRED's route: the exact-computation signal, else a closed choice by the model
    among :data:`ROUTE_LABELS` (reported under the routes' names)."""
    evidence = exact_computation(task)
    if evidence is not None:
        return Decision("route", "tool", None, method="signal", evidence=evidence)
    labels = [ROUTE_LABELS[r] for r in ROUTES]
    choice, problem, spent = _ask("route", lambda: models.choose(
        alfred.model_name, prompts.route_messages(alfred, task), labels, cancel=cancel))
    if choice is None:
        return Decision("route", None, problem, seconds=spent)
    route = ROUTES[labels.index(choice.value)]
    scores = {ROUTES[labels.index(k)]: v for k, v in choice.scores.items() if k in labels}
    return Decision("route", route, None, scores, choice.method, spent)


def decide_tool(models: ModelManager, brick: Proto, task: str, tools: list[dict[str, Any]], *,
                cancel: CancelToken | None = None) -> Decision:
    """BRICK's choice among the registered ``tools`` (``{"name", "description"}``) or
    :data:`NO_TOOL` (none fits: a new tool is requested and forged)."""
    names = [str(t["name"]) for t in tools]
    options = names + [NO_TOOL]
    choice, problem, spent = _ask("tool choice", lambda: models.choose(
        brick.model_name, prompts.tool_choice_messages(brick, task, tools), options,
        cancel=cancel))
    if choice is None:
        return Decision("tool", None, problem, seconds=spent)
    return Decision("tool", choice.value, None, dict(choice.scores), choice.method, spent)


def decide_tool_request(models: ModelManager, brick: Proto, task: str, *,
                        cancel: CancelToken | None = None) -> Decision:
    """BRICK's tool request under :data:`TOOL_REQUEST_SCHEMA`, as the forge's request shape
    ``{"name": snake_case, "description": str, "args": dict}``.

    The schema's ``name`` is free text, and a 135M model sometimes writes no name there
    at all (``'17'`` for "What is 17 times 23?"). Then the name is asked again as a
    closed choice (:func:`name_options`: names made of the words of BRICK's own
    description and of the task, and a few plain verbs), so a request that was decoded
    always carries a usable snake_case name (``method="structured+choose"``)."""
    raw, problem, spent = _ask("tool request", lambda: models.structured(
        brick.model_name, prompts.tool_request_messages(brick, task), TOOL_REQUEST_SCHEMA,
        cancel=cancel))
    if raw is None:
        return Decision("tool_request", None, problem, seconds=spent)
    method = "structured"
    description = " ".join(str(raw.get("description") or "").split())
    name = snake_case(raw.get("name", ""))
    if not name:
        options = name_options(description, task)
        choice, problem, more = _ask("tool name", lambda: models.choose(
            brick.model_name, prompts.tool_name_messages(brick, task, description), options,
            cancel=cancel))
        spent += more
        if choice is None:
            return Decision("tool_request", None, problem, method=method, seconds=spent)
        name, method = choice.value, "structured+choose"
    return Decision("tool_request", {"name": name,
                                     "description": description or name.replace("_", " "),
                                     "args": args_dict(raw.get("args") or [])},
                    None, method=method, seconds=spent)


#: names always offered when the model's own name was unusable (plain verbs a tool does)
GENERIC_TOOL_NAMES = ("calculate", "convert_units", "look_up", "count_items", "format_text")
#: words that never name a tool: function words, and request verbs ("please compute")
_NAME_STOPWORDS = frozenset(
    "a an the is are was were be of to in on at by for with and or what which who how "
    "many much do does did this that it its my your me i you please can could would "
    "should there here from into as than then so if some give tell find get compute "
    "calculate".split())


def content_words(text: str) -> list[str]:
    """The words of ``text`` (lower case, letters only) that could name a tool."""
    return [w for w in re.findall(r"[a-z]+", str(text or "").lower())
            if w not in _NAME_STOPWORDS and len(w) > 1]


def name_options(description: str, task: str) -> list[str]:
    """Candidate snake_case tool names: the first content words of ``description`` and
    of ``task`` (two and three words), then :data:`GENERIC_TOOL_NAMES`. Never empty."""
    out: list[str] = []
    for text in (description, task):
        words = content_words(text)
        for n in (3, 2):
            name = snake_case("_".join(words[:n]))
            if name and len(words) >= n:
                out.append(name)
    out.extend(GENERIC_TOOL_NAMES)
    return list(dict.fromkeys(out))


def decide_answer(models: ModelManager, alfred: Proto, task: str, candidates: list[str], *,
                  tool_result: dict[str, Any] | None = None,
                  cancel: CancelToken | None = None) -> Decision:
    """ALFRED's choice of the best answer among the (distinct) candidates."""
    choice, problem, spent = _ask("answer choice", lambda: models.choose(
        alfred.model_name, prompts.answer_choice_messages(alfred, task, tool_result),
        candidates, cancel=cancel))
    if choice is None:
        return Decision("answer", None, problem, seconds=spent)
    return Decision("answer", choice.value, None, dict(choice.scores), choice.method, spent)


def snake_case(raw: Any, min_len: int = 2) -> str:
    """``"Convert Miles-to km"`` -> ``"convert_miles_to_km"``; '' if nothing usable."""
    words = re.findall(r"[a-z0-9]+", str(raw or "").lower())
    name = "_".join(words)[:64].strip("_")
    name = re.sub(r"^[0-9_]+", "", name)
    return name if len(name) >= min_len else ""


def args_dict(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """``[{"name": "miles", "value": "5"}]`` -> ``{"miles": 5}`` (numbers and JSON literals
    parsed, the first of two equal names kept, nameless pairs dropped)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key = snake_case(pair.get("name"), min_len=1)
        if not key or key in out:
            continue
        out[key] = _value(str(pair.get("value", "")).strip())
    return out


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
