"""Prompt building for the contrapunto and for the graph's decisions.

The persona's *character* (system prompt, model, generation settings) lives on its
proto and is read at every call, so an edit in the inspector changes the next turn.
This module only adds the task framing for each step, and as little of it as works:
measured on the suite's tune split, SmolLM2-135M answers a task best when the task is
the user's message as it was written. Framing it ("Task: ...", "answer in one
sentence") made it restate the task ("The task is to ...") instead of answering it,
and showing ROBIN BRICK's answer first made ROBIN copy it. So a persona's first turn
is its system prompt and the task; context (memories, a tool's result, the other
persona's answer in later rounds) is added only when there is some. Decisions (route,
tool, tool request, answer choice) are asked under constraint through
:mod:`a4ps.cognition.decisions`; nothing here parses free text into a decision.
"""
from __future__ import annotations

import json
import re
from typing import Any

Message = dict[str, str]

ROUTES = ("direct", "contrapunto", "tool")
# the words the model chooses among for each route (single tokens in SmolLM2's
# vocabulary, in both spellings: one forward pass scores all three)
ROUTE_LABELS = {"direct": "answer", "contrapunto": "talk", "tool": "calculate"}
ROUTE_ASK = ("Say how each message should be handled: answer (a short fact or a format "
             "instruction), talk (feelings, advice or a puzzle to reason through), "
             "calculate (arithmetic or a unit conversion).")
NO_TOOL = "none"
TOOL_ASK = "Which tool does the message need? Answer with the tool's name."


def _system(proto: Any, extra: str = "") -> Message:
    base = str(proto.get("system_prompt") or f"You are {proto.name}.").strip()
    return {"role": "system", "content": f"{base}\n\n{extra}".strip()}


def _memories_block(memories: list[dict[str, Any]]) -> str:
    if not memories:
        return ""
    lines = [f"- {m.get('text', '')[:400]}" for m in memories]
    return "What you remember from earlier tasks:\n" + "\n".join(lines) + "\n\n"


def _tool_block(tool_result: dict[str, Any] | None) -> str:
    if not tool_result:
        return ""
    if tool_result.get("ok") and "output" in tool_result:
        return (f"Tool {tool_result.get('name')} returned: "
                f"{json.dumps(tool_result['output'], default=str)[:600]}\n\n")
    if tool_result.get("ok"):
        return f"Tool {tool_result.get('name')} is now available.\n\n"
    # a tool that failed adds nothing to the prompt (its step and the task's problems
    # record why): told "your tool request could not be met", SmolLM2 answered about
    # the tool instead of the task (tune split: format-02, reasoning-04)
    return ""


def _context(memories: list[dict[str, Any]] | None, tool_result: dict[str, Any] | None) -> str:
    return _memories_block(memories or []) + _tool_block(tool_result)


def _with_context(context: str, task: str) -> str:
    """The task as written when there is no context; after context, the task is named
    as such, so it is not read as one more memory or tool line."""
    return f"{context}Task: {task}" if context else task


def route_messages(alfred: Any, task: str) -> list[Message]:
    """For ``models.choose`` over ROUTE_LABELS: a short decision prompt and the task as
    written (the persona's long character prompt only slowed this decision: the model
    scores every option after the whole prompt, and chose no better with it)."""
    return [{"role": "system", "content": f"You are {alfred.name}. {ROUTE_ASK}"},
            {"role": "user", "content": task}]


def tool_choice_messages(brick: Any, task: str, tools: list[dict[str, Any]]) -> list[Message]:
    """For ``models.choose`` over the tools' names and NO_TOOL."""
    menu = "\n".join(f"- {t['name']}: {str(t.get('description') or '')[:200]}" for t in tools)
    return [{"role": "system", "content": (
        f"You are {brick.name}. The tools you have:\n{menu}\n- {NO_TOOL}: no tool above "
        f"fits the message.\n\n{TOOL_ASK}")},
        {"role": "user", "content": task}]


def tool_request_messages(brick: Any, task: str) -> list[Message]:
    """For ``models.structured`` under decisions.TOOL_REQUEST_SCHEMA."""
    return [_system(brick), {"role": "user", "content": (
        f"Task: {task}\n\n"
        "Describe the small Python function that computes what this task needs: a "
        "snake_case name, one sentence saying what it does, and the arguments (name and "
        "value) to call it with for this task. Reply in JSON.")}]


def tool_name_messages(brick: Any, task: str, description: str) -> list[Message]:
    """For ``models.choose`` over candidate tool names (decisions.name_options)."""
    what = f" It should: {description}" if description else ""
    return [_system(brick), {"role": "user", "content": (
        f"Task: {task}\n\nName the small Python function this task needs.{what} "
        "Answer with its snake_case name.")}]


def brick_messages(brick: Any, task: str, *, memories: list[dict[str, Any]],
                   robin_said: str | None, tool_result: dict[str, Any] | None) -> list[Message]:
    """BRICK's turn: the task as written; context first when there is some, and from
    the second round on ROBIN's last answer to weigh."""
    content = _with_context(_context(memories, tool_result), task)
    if robin_said:
        content += (f"\n\nROBIN answered:\n{robin_said}\n\n"
                    "Check ROBIN's answer against your own, then give your answer.")
    return [_system(brick), {"role": "user", "content": content}]


def robin_messages(robin: Any, task: str, *, brick_said: str | None,
                   memories: list[dict[str, Any]],
                   tool_result: dict[str, Any] | None = None) -> list[Message]:
    """ROBIN's turn: in the first round the task alone (an independent second view, not
    a copy of BRICK's); from the second round on, BRICK's answer to respond to."""
    content = _with_context(_context(memories, tool_result), task)
    if brick_said:
        content += (f"\n\nBRICK answered:\n{brick_said}\n\n"
                    "Say where you agree with BRICK or see it differently, with care for "
                    "the people involved, then give your answer.")
    return [_system(robin), {"role": "user", "content": content}]


def answer_choice_messages(alfred: Any, task: str,
                           tool_result: dict[str, Any] | None = None) -> list[Message]:
    """For ``models.choose`` over the dialogue's candidate answers: each candidate is
    scored as the reply to the task as asked, calibrated against a content-free prompt,
    so the answer the task itself makes likelier wins. Only the persona's name, not its
    character prompt: on the tune split that chose the passing candidate in 10 of 12
    disagreeing pairs, against 7 with ALFRED's whole prompt (and 8 when the task was
    framed "Give the best answer to this task")."""
    return [{"role": "system", "content": f"You are {alfred.name}."},
            {"role": "user", "content": _with_context(_tool_block(tool_result), task)}]


def direct_messages(alfred: Any, task: str, *, memories: list[dict[str, Any]],
                    tool_result: dict[str, Any] | None = None) -> list[Message]:
    """ALFRED alone (the direct route): his system prompt and the task as written."""
    return [_system(alfred), {"role": "user",
                              "content": _with_context(_context(memories, tool_result), task)}]


def plain_messages(persona: Any, task: str) -> list[Message]:
    """The persona's system prompt and the task as it was given: one plain call."""
    return [_system(persona), {"role": "user", "content": task}]


def retry_nudge(messages: list[Message], problem: str) -> list[Message]:
    """The same request once more, telling the model what was wrong with its reply."""
    out = [dict(m) for m in messages]
    out[-1]["content"] += (f"\n\n(Your previous reply was unusable: {problem}. "
                           "Reply in plain sentences.)")
    return out


def reply_problem(reply: Any) -> str | None:
    """Why a model reply is unusable, or None when it is usable text."""
    if not isinstance(reply, str):
        return f"model returned {type(reply).__name__}, not text"
    text = reply.strip()
    if not text:
        return "empty reply"
    words = re.findall(r"[^\W\d_]{2,}", text)
    if not words:
        return f"reply has no words: {text[:40]!r}"
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if len(text) >= 8 and letters / len(text) < 0.5:
        return f"reply is mostly symbols: {text[:40]!r}"
    if len(words) >= 12 and len({w.lower() for w in words}) / len(words) < 0.15:
        return f"reply repeats itself: {text[:40]!r}"
    return None
