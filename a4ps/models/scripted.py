"""ScriptedBackend: a FAKE chat backend for fast unit tests of other parts.

It is not a model. Replies come from a list (cycled; or consumed once with
``cycle=False``) or from a function of the messages, optionally after a fixed latency.
It follows the ModelManager backend protocol (residency, loads, streaming by word), so
the manager's events and counters behave as with a real backend:

    from a4ps.models.manager import ModelManager
    from a4ps.models.scripted import ScriptedBackend
    from a4ps.models.embeddings import HashEmbedder
    mm = ModelManager(settings, bus, backend=ScriptedBackend(["Paris."]),
                      embedder=HashEmbedder())

Decisions (``choose``/``structured``) consume the same script: the next reply is what
the "model" answered, matched to an option (case-insensitive, or the one option it
names) or read as JSON and validated against the schema. ``decide=fn(messages, options
or schema)`` scripts them separately instead. A reply that fits nothing is a
DecisionError, as it would be from a real model.

``calls`` records (model, messages, kwargs) of every generation and decision.
"""
from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable, Sequence

from a4ps.models.base import CancelToken, Choice, Finish, Generation, Message, OnToken, Progress
from a4ps.models.errors import DecisionError, ModelError, ModelNotFound
from a4ps.models.schema import validate_object

Reply = str | Callable[[list[dict[str, str]]], str]


class ScriptedBackend:
    name = "scripted"

    def __init__(self, replies: Sequence[str] | Callable[..., str] = ("OK.",), *,
                 latency_s: float = 0.0, load_latency_s: float = 0.0,
                 models: Sequence[str] | None = None, sizes: dict[str, int] | None = None,
                 cycle: bool = True,
                 decide: Callable[[list[dict[str, str]], Any], Any] | None = None) -> None:
        """``replies``: list of texts, or ``fn(messages)`` / ``fn(messages, model)``.

        ``models``: if given, any other model id raises ModelNotFound.
        ``sizes``: bytes per model id, for memory-budget tests (default 100 MB).
        """
        self.replies = replies
        self.latency_s = latency_s
        self.load_latency_s = load_latency_s
        self.models = set(models) if models is not None else None
        self.sizes = dict(sizes or {})
        self.cycle = cycle
        self.decide = decide
        self.calls: list[tuple[str, list[dict[str, str]], dict[str, Any]]] = []
        self.loads: list[str] = []
        self._i = 0
        self._resident: str | None = None
        self._lock = threading.Lock()

    def resident(self) -> str | None:
        return self._resident

    def estimate_bytes(self, model: str) -> int:
        self._check(model)
        return self.sizes.get(model, 100_000_000)

    def load(self, model: str, progress: Progress | None = None) -> dict[str, Any]:
        self._check(model)
        if self.load_latency_s:
            time.sleep(self.load_latency_s)
        if progress:
            progress(0.5, "scripted load")
        self._resident = model
        self.loads.append(model)
        return {}

    def unload(self) -> None:
        self._resident = None

    def _check(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise ModelNotFound(f"scripted backend has no model {model!r}")

    def _next(self, messages: list[dict[str, str]], model: str) -> str:
        if callable(self.replies):
            import inspect
            try:
                two = len(inspect.signature(self.replies).parameters) >= 2
            except (TypeError, ValueError):
                two = False
            return str(self.replies(messages, model) if two else self.replies(messages))
        with self._lock:
            if not self.replies:
                raise ModelError("scripted backend has no replies")
            if self._i >= len(self.replies):
                if not self.cycle:
                    raise ModelError("scripted backend ran out of replies")
                self._i = 0
            reply = self.replies[self._i]
            self._i += 1
            return reply

    def generate(self, messages: list[Message], *, temperature: float | None = None,
                 max_tokens: int | None = None, stop: list[str] | None = None,
                 on_token: OnToken | None = None, cancel: CancelToken | None = None,
                 **gen: Any) -> Generation:
        if self._resident is None:
            raise ModelError("no model loaded")
        t0 = time.perf_counter()
        self.calls.append((self._resident, list(messages),
                           {"temperature": temperature, "max_tokens": max_tokens, "stop": stop,
                            **gen}))
        text = self._next(list(messages), self._resident)
        finish: Finish = "eos"
        for s in stop or []:
            if s and s in text:
                text = text[:text.index(s)]
                finish = "stop"
        pieces = re.findall(r"\s*\S+", text) or [text]
        if max_tokens is not None and len(pieces) > max_tokens:
            pieces = pieces[:max_tokens]
            finish = "length"
        out: list[str] = []
        per_piece = self.latency_s / max(len(pieces), 1)
        for p in pieces:        # the latency is spread over the pieces, so cancel bites
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if per_piece:
                time.sleep(per_piece)
            out.append(p)
            if on_token is not None:
                on_token(p)
        seconds = max(time.perf_counter() - t0, 1e-6)
        return Generation("".join(out).strip(), len(out), seconds,
                          seconds if out else None, finish)

    def choose(self, messages: list[Message], options: Sequence[str], *,
               cancel: CancelToken | None = None) -> Choice:
        answer = self._decision(messages, list(options))
        if answer in options:
            return Choice(answer, {}, "scripted")
        said = str(answer).strip().lower()
        exact = [o for o in options if o.lower() == said]
        named = [o for o in options if re.search(rf"\b{re.escape(o.lower())}\b", said)]
        if exact or len(named) == 1:
            return Choice((exact or named)[0], {}, "scripted")
        raise DecisionError(f"scripted reply {answer!r} names none of {list(options)}")

    def structured(self, messages: list[Message], schema: dict[str, Any], *,
                   cancel: CancelToken | None = None) -> dict[str, Any]:
        import json
        answer = self._decision(messages, schema)
        if isinstance(answer, str):
            try:
                answer = json.loads(answer)
            except ValueError as e:
                raise DecisionError(f"scripted reply is not JSON: {answer[:60]!r}") from e
        return validate_object(answer, schema)

    def _decision(self, messages: list[Message], asked: Any) -> Any:
        if self._resident is None:
            raise ModelError("no model loaded")
        self.calls.append((self._resident, list(messages), {"decision": asked}))
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.decide is not None:
            return self.decide(list(messages), asked)
        return self._next(list(messages), self._resident)


def demo_reply(messages: list[dict[str, str]]) -> str:
    """A deterministic stand-in persona: it names itself and restates the task.

    Used by ``models.backend = "scripted"`` so daemon and UI tests (and a demo with no
    model at all) exercise every part except the model. Route prompts get DIALOGUE.
    """
    system = messages[0]["content"] if messages and messages[0].get("role") == "system" else ""
    last = messages[-1]["content"] if messages else ""
    if "Reply with one word" in last:
        return "DIALOGUE"
    m = re.search(r"You are (\w+)", system)
    persona = m.group(1) if m else "ASSISTANT"
    named = re.findall(r"Task:\s*(.+)", last)      # the last: memories of tasks come first
    task = (named[-1] if named else last).strip().splitlines()[0][:120] if last else ""
    if persona == "ALFRED":
        return f"In sum: {task} — considered by logic and by care alike."
    return f"{persona.title()} reflects on the task: {task}"


def demo_decision(messages: list[dict[str, str]], asked: Any) -> Any:
    """The stand-in's decisions: the dialogue route (offered as "contrapunto", or as the
    word "talk" the cognition asks the route in), else the first option; for a schema,
    the smallest value that conforms (first enum value, minimum, empty text)."""
    if isinstance(asked, list):
        return next((o for o in ("contrapunto", "talk") if o in asked), asked[0])
    return example_of(asked)


def example_of(schema: dict[str, Any]) -> Any:
    """A minimal value conforming to ``schema`` (the subset in :mod:`a4ps.models.schema`)."""
    if "anyOf" in schema:
        return example_of(schema["anyOf"][0])
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {k: example_of(sub) for k, sub in schema["properties"].items()
                if k in schema.get("required", [])}
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    return {"string": "", "boolean": False, "array": [], "null": None}[str(kind)]


def demo_backend() -> ScriptedBackend:
    return ScriptedBackend(demo_reply, models=None, decide=demo_decision)
