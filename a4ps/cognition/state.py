"""The cognitive graph's state schema.

Kept in its own module (imported by name) so LangGraph can resolve the type hints
even when ``graph.py`` is loaded by file path, as the LangGraph CLI does for
``langgraph.json``.
"""
from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict


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
    brick_text: str                 # BRICK's latest usable words
    robin_text: str
    dissonance: float | None
    stop: str | None                # why the dialogue ended
    tool_request: dict[str, Any] | None
    tool_result: dict[str, Any] | None
    answer: str
    status: str                     # ok | failed
    error: str | None
    memory_id: str | None
