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


class TaskCancelled(Exception):
    """A run stopped because its cancel token was set (``graph.run(..., cancel=...)``).

    Raised at the first node boundary after the token is set (or at once, from inside
    a generation the token stopped). The task's checkpoint holds every node finished
    before it, so a re-queued task resumes where it stopped.
    """

    def __init__(self, task_id: str, node: str | None = None, reason: str | None = None) -> None:
        self.task_id, self.node, self.reason = str(task_id), node, reason
        where = f" after {node}" if node else ""
        super().__init__(f"task {task_id} cancelled{where}" + (f": {reason}" if reason else ""))
