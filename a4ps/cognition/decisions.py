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
* :func:`decide_tool_request` — BRICK: ``{name, description, args}`` for the forge.
* :func:`decide_answer` — ALFRED picks one of the candidate answers the dialogue produced.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from a4ps.cognition import prompts
from a4ps.cognition.signals import exact_computation
from a4ps.models.errors import DecisionError

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


def decide_route(models: Any, alfred: Any, task: str, *, cancel: Any = None) -> Decision:
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


def decide_tool(models: Any, brick: Any, task: str, tools: list[dict[str, Any]], *,
                cancel: Any = None) -> Decision:
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


def decide_tool_request(models: Any, brick: Any, task: str, *, cancel: Any = None) -> Decision:
    """BRICK's tool request under :data:`TOOL_REQUEST_SCHEMA`, as the forge's request shape
    ``{"name": snake_case, "description": str, "args": dict}``; no usable name is no
    decision."""
    raw, problem, spent = _ask("tool request", lambda: models.structured(
        brick.model_name, prompts.tool_request_messages(brick, task), TOOL_REQUEST_SCHEMA,
        cancel=cancel))
    if raw is None:
        return Decision("tool_request", None, problem, seconds=spent)
    name = snake_case(raw.get("name", ""))
    if not name:
        return Decision("tool_request", None,
                        f"tool request: no usable tool name in {raw.get('name')!r}",
                        method="structured", seconds=spent)
    description = " ".join(str(raw.get("description") or "").split()) or name.replace("_", " ")
    return Decision("tool_request", {"name": name, "description": description,
                                     "args": args_dict(raw.get("args") or [])},
                    None, method="structured", seconds=spent)


def decide_answer(models: Any, alfred: Any, task: str, candidates: list[str], *,
                  tool_result: dict[str, Any] | None = None, cancel: Any = None) -> Decision:
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
