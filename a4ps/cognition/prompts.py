"""Prompt building for the contrapunto, and lenient parsing of what the models say back.

The persona's *character* (system prompt, model, temperature) lives on its proto and
is read at every call, so an edit in the inspector changes the next turn. This module
only adds the task framing for each step. Every parser here assumes the reply may come
from a 135M-parameter model: it reads leniently and falls back to a safe default
rather than failing.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]

ROUTES = ("contrapunto", "direct", "tool")
DEFAULT_ROUTE = "contrapunto"

# words a model may use for each route (lower case)
_ROUTE_WORDS = {
    "direct": "direct", "directly": "direct", "simple": "direct",
    "dialogue": "contrapunto", "dialog": "contrapunto", "contrapunto": "contrapunto",
    "discuss": "contrapunto", "discussion": "contrapunto", "debate": "contrapunto",
    "tool": "tool", "tools": "tool", "calculate": "tool", "calculation": "tool",
}

TOOL_INSTRUCTION = (
    "If the task needs a precise computation that you cannot do reliably in your head, "
    "ask for a tool by writing one line exactly like:\n"
    "TOOL: snake_case_name - what the tool does\n"
    "optionally followed by a line ARGS: {\"param\": value} with the arguments to call it "
    "with. Otherwise do not mention tools."
)


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
    return [
        _system(alfred),
        {"role": "user", "content": (
            f"Task: {task}\n\n"
            "How should this task be handled? Reply with one word:\n"
            "DIRECT if it is a greeting or a simple question you can answer alone,\n"
            "DIALOGUE if BRICK (logic) and ROBIN (empathy) should think it through,\n"
            "TOOL if it needs a calculation or a tool.\nReply:")},
    ]


def brick_messages(brick: Any, task: str, *, memories: list[dict[str, Any]],
                   robin_said: str | None, tool_result: dict[str, Any] | None,
                   allow_tool: bool) -> list[Message]:
    parts = [f"Task: {task}\n\n", _memories_block(memories), _tool_block(tool_result)]
    if robin_said:
        parts.append(f"ROBIN answered your last analysis:\n{robin_said}\n\n"
                     "Respond to ROBIN: keep what is right, correct what is not, and move "
                     "toward an answer you both accept. A few sentences.")
    else:
        parts.append("Give your logical analysis of the task in a few sentences.")
    return [_system(brick, TOOL_INSTRUCTION if allow_tool else ""),
            {"role": "user", "content": "".join(parts)}]


def robin_messages(robin: Any, task: str, *, brick_said: str,
                   memories: list[dict[str, Any]]) -> list[Message]:
    said = brick_said or "(BRICK said nothing usable.)"
    return [_system(robin), {"role": "user", "content": (
        f"Task: {task}\n\n{_memories_block(memories)}BRICK said:\n{said}\n\n"
        "Give your view in a few sentences, with care for the people involved. "
        "Say where you agree with BRICK and where you see it differently.")}]


def synthesis_messages(alfred: Any, task: str, *, brick_said: str, robin_said: str,
                       tool_result: dict[str, Any] | None) -> list[Message]:
    return [_system(alfred), {"role": "user", "content": (
        f"Task: {task}\n\n{_tool_block(tool_result)}"
        f"BRICK (logic) said:\n{brick_said or '(nothing usable)'}\n\n"
        f"ROBIN (empathy) said:\n{robin_said or '(nothing usable)'}\n\n"
        "Write the final answer for the user, combining both views. A few sentences.")}]


def direct_messages(alfred: Any, task: str, *, memories: list[dict[str, Any]],
                    tool_result: dict[str, Any] | None = None) -> list[Message]:
    return [_system(alfred), {"role": "user", "content": (
        f"{_memories_block(memories)}{_tool_block(tool_result)}Task: {task}\n\n"
        "Answer briefly and clearly.")}]


def retry_nudge(messages: list[Message], problem: str) -> list[Message]:
    """The same request once more, telling the model what was wrong with its reply."""
    out = [dict(m) for m in messages]
    out[-1]["content"] += (f"\n\n(Your previous reply was unusable: {problem}. "
                           "Reply in plain sentences.)")
    return out


# -- parsing replies ---------------------------------------------------------------

def parse_route(reply: Any) -> tuple[str, str]:
    """(route, why). A short reply naming a route, or a reply naming exactly one route,
    decides; anything else (empty, unrecognised, several routes as when a tiny model
    echoes the options) gives the contrapunto, which is always a safe way to handle a
    task."""
    if not isinstance(reply, str) or not reply.strip():
        return DEFAULT_ROUTE, "empty route reply; defaulting to the contrapunto"
    words = re.findall(r"[a-z]+", reply.lower())
    if words and words[0] in _ROUTE_WORDS and len(words) <= 3:
        return _ROUTE_WORDS[words[0]], f"ALFRED said {words[0]!r}"
    hits = {_ROUTE_WORDS[w] for w in words if w in _ROUTE_WORDS}
    if len(hits) == 1:
        route = hits.pop()
        return route, f"ALFRED's reply names only {route}"
    why = "ambiguous" if hits else "unrecognised"
    return DEFAULT_ROUTE, f"{why} route reply {reply.strip()[:60]!r}; defaulting to the contrapunto"


@dataclass
class ToolRequest:
    name: str
    description: str
    args: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "args": self.args}


_TOOL_LINE = re.compile(r"^\s*TOOL\s*:\s*([A-Za-z_][A-Za-z0-9_]{1,63})\s*(?:[-:\u2013\u2014]\s*(.*))?$",
                        re.MULTILINE | re.IGNORECASE)
_ARGS_LINE = re.compile(r"^\s*ARGS\s*:\s*(\{.*\})\s*$", re.MULTILINE | re.IGNORECASE)


def parse_tool_request(reply: str) -> ToolRequest | None:
    """BRICK's ``TOOL: name - description`` (+ optional ``ARGS: {json}``) line, if any.

    A placeholder copied from the prompt (``snake_case_name``) is not a request.
    """
    if not isinstance(reply, str):
        return None
    m = _TOOL_LINE.search(reply)
    if not m or m.group(1).lower() in {"snake_case_name", "name"}:
        return None
    description = (m.group(2) or "").strip() or m.group(1).replace("_", " ")
    args = None
    a = _ARGS_LINE.search(reply, m.end())
    if a:
        try:
            parsed = json.loads(a.group(1))
            args = parsed if isinstance(parsed, dict) else None
        except ValueError:
            args = None
    return ToolRequest(m.group(1).lower(), description, args)


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
