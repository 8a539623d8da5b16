"""The cognitive graph's state schema, and the error a cancelled run raises.

Kept in its own module (imported by name) so LangGraph can resolve the type hints
even when a graph module is loaded by file path, as the LangGraph CLI does for
``langgraph.json``. ``TypedDict`` comes from ``typing_extensions``: on Python < 3.12
pydantic (which LangGraph uses to draw the input/output JSON schemas) refuses
``typing.TypedDict``, and the LangGraph server then shows ``null`` schemas.
"""
from __future__ import annotations

import operator
from typing import Annotated, Any

from typing_extensions import TypedDict


class TaskCancelled(Exception):
    """The task's cancel token was set: the run stopped at a node boundary or mid-turn.

    Not a ModelError: the task did not fail, somebody stopped it. ``node`` names where.
    """

    def __init__(self, task_id: str | None, node: str, detail: str = "") -> None:
        self.task_id = task_id
        self.node = node
        super().__init__(f"task {task_id} cancelled at {node}" + (f": {detail}" if detail else ""))


class CognitiveState(TypedDict, total=False):
    """The graph's state. List keys with ``operator.add`` are appended to by nodes;
    every other key is replaced by the node that returns it."""

    task_id: str
    task: str
    meta: dict[str, Any]            # the task's origin data (motivator goal, ...)
    route: str                      # contrapunto | direct | tool
    route_reason: str
    memories: list[dict[str, Any]]
    turns: Annotated[list[dict[str, Any]], operator.add]    # every utterance, in order
    rounds: Annotated[list[dict[str, Any]], operator.add]   # {round, brick, robin, dissonance}
    problems: Annotated[list[str], operator.add]
    decisions: Annotated[list[dict[str, Any]], operator.add]  # every model decision asked
    brick_text: str                 # BRICK's latest usable words
    robin_text: str
    dissonance: float | None
    stop: str | None                # why the dialogue ended
    tool_request: dict[str, Any] | None
    tool_result: dict[str, Any] | None
    answer: str
    answer_source: str              # which candidate (or fallback) the answer came from
    status: str                     # ok | failed
    error: str | None
    memory_id: str | None

