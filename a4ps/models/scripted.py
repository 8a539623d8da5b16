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

``calls`` records (model, messages, kwargs) of every generation.
"""
from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable, Sequence

from a4ps.models.embedded import Generation
from a4ps.models.errors import ModelError, ModelNotFound

Reply = str | Callable[[list[dict[str, str]]], str]


class ScriptedBackend:
    name = "scripted"

    def __init__(self, replies: Sequence[str] | Callable[..., str] = ("OK.",), *,
                 latency_s: float = 0.0, load_latency_s: float = 0.0,
                 models: Sequence[str] | None = None, sizes: dict[str, int] | None = None,
                 cycle: bool = True) -> None:
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

    def load(self, model: str, progress=None) -> dict[str, Any]:
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

    def generate(self, messages, *, temperature=None, max_tokens=None, stop=None,
                 on_token=None):
        if self._resident is None:
            raise ModelError("no model loaded")
        t0 = time.perf_counter()
        self.calls.append((self._resident, list(messages),
                           {"temperature": temperature, "max_tokens": max_tokens, "stop": stop}))
        if self.latency_s:
            time.sleep(self.latency_s)
        text = self._next(list(messages), self._resident)
        for s in stop or []:
            if s and s in text:
                text = text[:text.index(s)]
        pieces = re.findall(r"\s*\S+", text) or [text]
        if max_tokens is not None:
            pieces = pieces[:max_tokens]
            text = "".join(pieces)
        if on_token is not None:
            for p in pieces:
                on_token(p)
        seconds = max(time.perf_counter() - t0, 1e-6)
        return Generation(text.strip(), len(pieces), seconds, seconds if pieces else None)



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
    t = re.search(r"Task:\s*(.+)", last)
    task = (t.group(1) if t else last).strip().splitlines()[0][:120] if last else ""
    if persona == "ALFRED":
        return f"In sum: {task} — considered by logic and by care alike."
    return f"{persona.title()} reflects on the task: {task}"


def demo_backend() -> ScriptedBackend:
    return ScriptedBackend(demo_reply, models=None)
