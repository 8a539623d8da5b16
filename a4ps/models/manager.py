"""ModelManager: one resident chat model, one generation at a time.

The seed ran on an 8 GB GPU, so it kept a single model loaded; we keep that rule for
every backend. Asking for another model unloads the current one first (or, on the
embedded backend, swaps a LoRA adapter on the resident base). A model larger than
``models.memory_budget_gb`` is refused before anything is unloaded.

A backend is a :class:`~a4ps.models.base.ChatBackend` (``generate`` for free text,
``choose`` and ``structured`` for decisions); optionally ``can_switch(current, new)``.
:class:`~a4ps.models.embedded.EmbeddedBackend`, :class:`~a4ps.models.ollama_backend.OllamaBackend`,
:class:`~a4ps.models.openai_backend.OpenAIBackend` (vLLM, llama.cpp server, LM Studio)
and :class:`~a4ps.models.scripted.ScriptedBackend` are the four.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import numpy as np

from a4ps.models.base import (CancelToken, ChatBackend, Choice, Generation, OnToken,
                              SwitchingBackend)
from a4ps.models.errors import (DecisionError, GenerationCancelled, InvalidRequest,
                                ModelError, ModelTooLarge)
from a4ps.models.schema import check_decision_schema, validate_object
from a4ps.models.embedded import EmbeddedBackend
from a4ps.models.embeddings import Embedder, make_embedder
from a4ps.models.ollama_backend import OllamaBackend
from a4ps.models.openai_backend import OpenAIBackend
from a4ps.models.scripted import demo_backend

if TYPE_CHECKING:
    from a4ps.config import Settings
    from a4ps.events import Bus

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
T = TypeVar("T")


def normalise_messages(messages: Any) -> list[dict[str, str]]:
    """Accept a prompt string or a list of {role, content}; reject anything else clearly."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} dicts "
                             "(or a prompt string)")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRequest(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise InvalidRequest(f"message {i} has unknown role {m['role']!r}; use one of {ROLES}")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


class ModelManager:
    """Personas' single door to chat models and embeddings.

    ``chat`` holds a lock for the whole load + generation, so generations never
    overlap and a ``release()`` (the fine-tuner's) waits for the current one.
    """

    def __init__(self, settings: Settings, bus: Bus, backend: ChatBackend | None = None,
                 embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.backend: ChatBackend = backend if backend is not None else _backend_for(settings)
        self._embedder = embedder
        self._lock = threading.RLock()
        self._embed_lock = threading.Lock()
        self.budget_bytes = int(settings.models.memory_budget_gb * 1e9)
        self._stats: dict[str, Any] = {
            "loads": 0, "unloads": 0, "swaps": 0, "load_seconds": 0.0,
            "last_load_seconds": None, "generations": 0, "tokens": 0,
            "generation_seconds": 0.0, "last_tokens_per_s": None, "last_ttft_s": None,
            "errors": 0, "embeddings": 0, "embed_seconds": 0.0,
            "decisions": 0, "decision_errors": 0,
            "threads": None, "thread_choice": None,   # the resident model's (backend says)
        }

    @classmethod
    def from_settings(cls, settings: Settings, bus: Bus,
                      embedder: Embedder | None = None) -> ModelManager:
        """The manager on the backend ``settings.models.backend`` names."""
        return cls(settings, bus, backend=_backend_for(settings), embedder=embedder)

    # -- chat ---------------------------------------------------------------

    def chat(self, model: str, messages: list[dict[str, str]] | str, *,
             temperature: float | None = None, max_tokens: int | None = None,
             stop: list[str] | None = None, on_token: OnToken | None = None,
             cancel: CancelToken | None = None, **gen: Any) -> str:
        """Answer ``messages`` with ``model``; returns the reply text (see :meth:`generate`)."""
        return self.generate(model, messages, temperature=temperature, max_tokens=max_tokens,
                             stop=stop, on_token=on_token, cancel=cancel, **gen).text

    def generate(self, model: str, messages: list[dict[str, str]] | str, *,
                 temperature: float | None = None, max_tokens: int | None = None,
                 stop: list[str] | None = None, on_token: OnToken | None = None,
                 cancel: CancelToken | None = None, **gen: Any) -> Generation:
        """Answer ``messages`` with ``model``; returns the whole :class:`Generation`.

        Loads the model if needed (unloading any other first). ``on_token`` gets text
        pieces as they are generated; an exception in it is logged, not raised.
        ``cancel`` (a ``threading.Event``) stops the generation within about a token:
        :class:`GenerationCancelled` is raised. ``gen`` carries per-call knobs
        (``top_p``, ``repetition_penalty``, ``no_repeat_ngram_size``).
        """
        msgs = normalise_messages(messages)
        if max_tokens is not None and int(max_tokens) < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}")
        if stop is not None and (not isinstance(stop, (list, tuple))
                                 or not all(isinstance(s, str) for s in stop)):
            raise InvalidRequest(f"stop must be a list of strings, got {stop!r}")
        cb = _safe_callback(on_token) if on_token is not None else None
        with self._lock:
            _raise_if_cancelled(cancel, model)
            gen_out = self._call(model, lambda: self.backend.generate(
                msgs, temperature=temperature, max_tokens=max_tokens, stop=list(stop or []),
                on_token=cb, cancel=cancel, **gen))
            s = self._stats
            s["generations"] += 1
            s["tokens"] += gen_out.tokens
            s["generation_seconds"] += gen_out.seconds
            s["last_tokens_per_s"] = gen_out.tokens / gen_out.seconds if gen_out.seconds > 0 else None
            s["last_ttft_s"] = gen_out.ttft_s
            if gen_out.finish == "cancelled":
                raise GenerationCancelled(f"{model}: generation cancelled after "
                                          f"{gen_out.tokens} tokens")
            return gen_out

    def choose(self, model: str, messages: list[dict[str, str]] | str,
               options: Sequence[str], *, cancel: CancelToken | None = None) -> Choice:
        """A closed choice, decided under constraint: the value is always one of ``options``."""
        msgs = normalise_messages(messages)
        opts = [str(o) for o in options]
        if not opts or len(set(opts)) != len(opts) or not all(o.strip() for o in opts):
            raise InvalidRequest(f"options must be distinct non-empty strings, got {options!r}")
        with self._lock:
            _raise_if_cancelled(cancel, model)
            choice = self._call(model, lambda: self.backend.choose(msgs, opts, cancel=cancel))
            self._stats["decisions"] += 1
            if choice.value not in opts:      # a backend bug, not a model answer
                raise DecisionError(f"{model}: backend chose {choice.value!r}, "
                                    f"not one of {opts}")
            return choice

    def structured(self, model: str, messages: list[dict[str, str]] | str,
                   schema: dict[str, Any], *, cancel: CancelToken | None = None
                   ) -> dict[str, Any]:
        """An object conforming to ``schema`` (see :mod:`a4ps.models.schema`), or DecisionError."""
        msgs = normalise_messages(messages)
        check_decision_schema(schema)
        with self._lock:
            _raise_if_cancelled(cancel, model)
            try:
                value = self._call(model, lambda: self.backend.structured(
                    msgs, schema, cancel=cancel))
                result = validate_object(value, schema)
            except DecisionError:
                self._stats["decision_errors"] += 1
                raise
            self._stats["decisions"] += 1
            return result

    def _call(self, model: str, fn: Callable[[], T]) -> T:
        """Load ``model`` if needed and run ``fn`` on the backend, errors typed and counted."""
        try:
            self._ensure(model)
            return fn()
        except ModelError:
            self._stats["errors"] += 1
            raise
        except Exception as e:
            self._stats["errors"] += 1
            raise ModelError(f"{model}: generation failed: {e}") from e

    def load(self, model: str) -> None:
        """Make ``model`` resident now (e.g. to warm up before the first task)."""
        with self._lock:
            self._ensure(model)

    def _ensure(self, model: str) -> None:
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequest(f"model must be a non-empty string, got {model!r}")
        current = self.backend.resident()
        if current == model:
            return
        need = self.backend.estimate_bytes(model)
        if need is not None and need > self.budget_bytes:
            raise ModelTooLarge(
                f"{model} needs about {need / 1e9:.1f} GB but models.memory_budget_gb is "
                f"{self.budget_bytes / 1e9:.1f}; pick a smaller model or raise the budget")
        swap = current is not None and isinstance(self.backend, SwitchingBackend) \
            and self.backend.can_switch(current, model)
        if current is not None and not swap:
            self._unload_locked()
        self.bus.publish("model.loading", {"model": model, "progress": 0.0,
                                           "backend": self.backend.name})

        def progress(fraction: float, stage: str) -> None:
            self.bus.publish("model.loading", {"model": model, "progress": round(fraction, 3),
                                               "stage": stage, "backend": self.backend.name})

        t0 = time.perf_counter()
        try:
            info = self.backend.load(model, progress) or {}
        except ModelError:
            self._after_failed_load(swap, current)
            raise
        except Exception as e:
            self._after_failed_load(swap, current)
            raise ModelError(f"could not load {model}: {e}") from e
        seconds = time.perf_counter() - t0
        if swap:    # the previous variant is no longer resident: count it as unloaded
            self._stats["unloads"] += 1
            self._stats["swaps"] += 1
            self.bus.publish("model.unloaded", {"model": current, "seconds": 0.0,
                                                "swapped_to": model})
        s = self._stats
        s["loads"] += 1
        s["load_seconds"] += seconds
        s["last_load_seconds"] = seconds
        s["threads"], s["thread_choice"] = info.get("threads"), info.get("thread_choice")
        self.bus.publish("model.loaded", {"model": model, "progress": 1.0,
                                          "seconds": round(seconds, 3),
                                          "backend": self.backend.name, **info})

    def _after_failed_load(self, swap: bool, previous: str | None) -> None:
        # A failed adapter swap leaves the previous variant active; keep counters true.
        if swap and self.backend.resident() == previous:
            return
        if swap and previous is not None:
            self._stats["unloads"] += 1
            self.bus.publish("model.unloaded", {"model": previous, "seconds": 0.0})

    def release(self) -> None:
        """Unload the resident chat model (the fine-tuner frees memory with this)."""
        with self._lock:
            self._unload_locked()

    def _unload_locked(self) -> None:
        current = self.backend.resident()
        if current is None:
            return
        t0 = time.perf_counter()
        try:
            self.backend.unload()
        except Exception as e:   # still count it: the backend dropped its reference
            log.warning("unloading %s failed: %s", current, e)
        seconds = time.perf_counter() - t0
        self._stats["unloads"] += 1
        self.bus.publish("model.unloaded", {"model": current, "seconds": round(seconds, 3)})

    def resident(self) -> str | None:
        return self.backend.resident()

    # -- embeddings ---------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            with self._embed_lock:
                if self._embedder is None:
                    self._embedder = make_embedder(self.settings, backend=self.backend)
        return self._embedder

    @property
    def embedding_dim(self) -> int:
        return int(self.embedder.dim)

    @property
    def dim(self) -> int:
        """The embedding width: the manager is itself an ``Embedder`` (the seam)."""
        return self.embedding_dim

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, shape (len(texts), embedding_dim)."""
        if isinstance(texts, str):
            raise InvalidRequest("embed() takes a list of strings; wrap a single text in [ ]")
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        t0 = time.perf_counter()
        vecs = np.asarray(self.embedder.embed(texts), dtype=np.float32)
        self._stats["embeddings"] += len(texts)
        self._stats["embed_seconds"] += time.perf_counter() - t0
        return vecs

    # -- stats --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Plain data (numbers, strings, None) for the UI and the wire."""
        s = dict(self._stats)
        gs = s["generation_seconds"]
        s["tokens_per_s"] = s["tokens"] / gs if gs > 0 else None
        s["resident"] = self.backend.resident()
        s["backend"] = self.backend.name
        s["memory_budget_gb"] = self.budget_bytes / 1e9
        for k, v in s.items():
            if isinstance(v, float):
                s[k] = round(v, 4)
        return s


def _backend_for(settings: Settings) -> ChatBackend:
    kind = settings.models.backend
    if kind == "embedded":
        return EmbeddedBackend(settings)
    if kind == "ollama":
        return OllamaBackend(settings)
    if kind == "openai":
        return OpenAIBackend(settings)
    if kind == "scripted":
        return demo_backend()
    raise InvalidRequest(f"unknown models.backend {kind!r}; use 'embedded', 'ollama' or 'openai'")


def _raise_if_cancelled(cancel: CancelToken | None, model: str) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled(f"{model}: cancelled before the model was asked")


def _safe_callback(fn: Callable[[str], None]) -> Callable[[str], None]:
    failed: list[bool] = []

    def call(piece: str) -> None:
        if failed:
            return
        try:
            fn(piece)
        except Exception:
            failed.append(True)
            log.exception("on_token callback failed; streaming to it stopped")
    return call
