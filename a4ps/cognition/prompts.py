"""Prompt building for the contrapunto and for the graph's decisions.

The persona's *character* (system prompt, model, generation settings) lives on its
proto and is read at every call, so an edit in the inspector changes the next turn.
This module only adds the task framing for each step. The prompts are short and ask
for the answer first: a 135M-parameter model follows a short instruction and loses a
long one. Decisions (route, tool request, answer choice) are asked under constraint
through :mod:`a4ps.cognition.decisions`; nothing here parses free text into a decision.
"""
from __future__ import annotations

import json
import re
from typing import Any

Message = dict[str, str]

ROUTES = ("direct", "contrapunto", "tool")
ANSWER_FIRST = ("Answer in one or two short sentences, the answer first. If the task asks "
                "for a format, follow it exactly.")


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
    return (f"Your tool request could not be met ({tool_result.get('reason')}); "
            "answer without it.\n\n")


def route_messages(alfred: Any, task: str) -> list[Message]:
    """For ``models.choose`` over ROUTES: the option is scored as ALFRED's reply."""
    return [
        _system(alfred),
        {"role": "user", "content": (
            f"Task: {task}\n\n"
            "How should this task be handled? Answer with one word:\n"
            "direct - a greeting, or a question with a short factual answer;\n"
            "contrapunto - it needs reasoning, advice or care, thought through from two views;\n"
            "tool - it needs arithmetic, a unit conversion or another exact computation.")},
    ]


def tool_request_messages(brick: Any, task: str) -> list[Message]:
    """For ``models.structured`` under decisions.TOOL_REQUEST_SCHEMA."""
    return [_system(brick), {"role": "user", "content": (
        f"Task: {task}\n\n"
        "Describe the small Python function that computes what this task needs: a "
        "snake_case name, one sentence saying what it does, and the arguments (name and "
        "value) to call it with for this task. Reply in JSON.")}]


def brick_messages(brick: Any, task: str, *, memories: list[dict[str, Any]],
                   robin_said: str | None, tool_result: dict[str, Any] | None) -> list[Message]:
    parts = [f"Task: {task}\n\n", _memories_block(memories), _tool_block(tool_result)]
    if robin_said:
        parts.append(f"ROBIN answered:\n{robin_said}\n\n"
                     "Check ROBIN's answer against your own. " + ANSWER_FIRST)
    else:
        parts.append(ANSWER_FIRST)
    return [_system(brick), {"role": "user", "content": "".join(parts)}]


def robin_messages(robin: Any, task: str, *, brick_said: str,
                   memories: list[dict[str, Any]]) -> list[Message]:
    said = brick_said or "(BRICK said nothing usable.)"
    return [_system(robin), {"role": "user", "content": (
        f"Task: {task}\n\n{_memories_block(memories)}BRICK answered:\n{said}\n\n"
        "Start with your own answer to the task in one short sentence. Then, in at most "
        "two short sentences and with care for the people involved, say where you agree "
        "with BRICK or see it differently.")}]


def answer_choice_messages(alfred: Any, task: str,
                           tool_result: dict[str, Any] | None = None) -> list[Message]:
    """For ``models.choose`` over the dialogue's candidate answers."""
    return [_system(alfred), {"role": "user", "content": (
        f"{_tool_block(tool_result)}Task: {task}\n\nGive the best answer to this task.")}]


def direct_messages(alfred: Any, task: str, *, memories: list[dict[str, Any]],
                    tool_result: dict[str, Any] | None = None) -> list[Message]:
    """ALFRED alone (the direct route)."""
    return [_system(alfred), {"role": "user", "content": (
        f"{_memories_block(memories)}{_tool_block(tool_result)}Task: {task}\n\n{ANSWER_FIRST}")}]


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
