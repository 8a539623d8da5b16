"""Ollama backend on the official ``ollama`` client (0.6.x API).

Honours ``OLLAMA_HOST`` (or ``models.ollama.host``), so the models may live on another
machine. Loading is an empty chat (Ollama loads the model and answers nothing);
unloading is an empty chat with ``keep_alive=0``. Failures become typed errors whose
message says what to run: ``ollama serve`` when nothing answers, ``ollama pull NAME``
when the model is missing.
"""
from __future__ import annotations

import builtins
import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from a4ps.models.base import (CancelToken, Finish, Generation, Message, OnToken, Progress,
                              ServerBackend)
from a4ps.models.errors import (BackendUnavailable, InvalidRequest,
                                ModelError, ModelNotFound, ModelTimeout)
from a4ps.models.schema import parse_json_answer, validate_object
from a4ps.values import plain

if TYPE_CHECKING:
    import ollama

    from a4ps.config import Settings

log = logging.getLogger(__name__)

_ADAPTER_SUFFIXES = (".safetensors", ".json", ".gguf", ".bin")


class OllamaBackend(ServerBackend):
    """Chat, stream, embed, unload, list, ps and create-with-adapter against Ollama."""

    name = "ollama"
    choice_method = "json-format"

    def __init__(self, settings: Settings, client: ollama.Client | None = None) -> None:
        import os

        import ollama
        self.settings = settings
        self.cfg = settings.models.ollama
        self.host = self.cfg.host or os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434"
        self.client = client or ollama.Client(host=self.cfg.host, timeout=self.cfg.timeout_s)
        self._resident: str | None = None

    # -- error translation --------------------------------------------------

    def _translate(self, e: Exception, what: str, model: str | None) -> Exception:
        import httpx
        import ollama
        if isinstance(e, ModelError):
            return e
        if isinstance(e, (ConnectionError, httpx.ConnectError)):
            return BackendUnavailable(
                f"cannot reach Ollama at {self.host} ({what}): is Ollama running? start it "
                f"with `ollama serve` (or set OLLAMA_HOST / models.ollama.host)")
        if isinstance(e, httpx.TimeoutException):
            return ModelTimeout(
                f"Ollama at {self.host} did not answer {what} within "
                f"{self.cfg.timeout_s:g}s; the model may still be loading; raise "
                f"models.ollama.timeout_s or try a smaller model")
        if isinstance(e, ollama.ResponseError):
            if e.status_code == 404:
                name = model or "the model"
                return ModelNotFound(f"Ollama has no model {name!r}: run `ollama pull {name}`")
            return ModelError(f"Ollama refused {what} ({e.status_code}): {e.error}")
        return ModelError(f"Ollama {what} failed: {e}")

    # -- the raw API (what personas and the fine-tuner use directly) ----------

    def _options(self, temperature: float | None, max_tokens: int | None,
                 stop: Sequence[str] | None, gen: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
        """Ollama's options: ``top_p``, ``top_k``, ``repetition_penalty`` (its
        ``repeat_penalty``) and ``seed`` pass through; ``no_repeat_ngram_size`` has no
        Ollama equivalent and is ignored."""
        opts: dict[str, Any] = {}
        knobs = gen or {}
        for ours, theirs in (("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
                             ("repetition_penalty", "repeat_penalty")):
            if knobs.get(ours) is not None:
                opts[theirs] = knobs[ours]
        if temperature is not None:
            opts["temperature"] = float(temperature)
        if max_tokens is not None:
            opts["num_predict"] = int(max_tokens)
        if stop:
            opts["stop"] = list(stop)
        return opts

    def chat(self, model: str, messages: list[dict[str, str]], *,
             temperature: float | None = None, max_tokens: int | None = None,
             stop: list[str] | None = None) -> str:
        """One non-streamed reply."""
        r = self._call("chat", model, lambda: self.client.chat(
            model=model, messages=messages, stream=False,
            options=self._options(temperature, max_tokens, stop),
            keep_alive=self.cfg.keep_alive))
        self._resident = model
        return (r.message.content or "").strip()

    def stream(self, model: str, messages: list[dict[str, str]], *,
               temperature: float | None = None, max_tokens: int | None = None,
               stop: list[str] | None = None) -> Iterator[str]:
        """Yield reply pieces as Ollama streams them."""
        for part in self._stream_parts(model, messages, temperature, max_tokens, stop):
            if part.message and part.message.content:
                yield part.message.content

    def _stream_parts(self, model: str, messages: list[Message], temperature: float | None,
                      max_tokens: int | None, stop: Sequence[str] | None,
                      gen: dict[str, Any] | None = None) -> Iterator[ollama.ChatResponse]:
        it = self._call("chat", model, lambda: self.client.chat(
            model=model, messages=messages, stream=True,
            options=self._options(temperature, max_tokens, stop, gen),
            keep_alive=self.cfg.keep_alive))
        try:
            for part in it:          # errors surface while iterating a stream
                yield part
        except Exception as e:
            raise self._translate(e, "chat", model) from e
        self._resident = model

    def embed(self, model: str, texts: list[str]) -> np.ndarray:
        r = self._call("embed", model, lambda: self.client.embed(
            model=model, input=list(texts), keep_alive=self.cfg.keep_alive))
        return np.asarray(r.embeddings, dtype=np.float32)

    def list(self) -> list[dict[str, Any]]:
        """Installed models: [{name, size, digest, ...}]."""
        r = self._call("list", None, self.client.list)
        return [_plain(m) for m in r.models]

    def ps(self) -> builtins.list[dict[str, Any]]:
        """Loaded models: [{name, size, size_vram, expires_at, ...}]."""
        r = self._call("ps", None, self.client.ps)
        return [_plain(m) for m in r.models]

    def create_with_adapter(self, new_tag: str, base: str, adapter_dir: Path) -> str:
        """Register ``base`` + the LoRA adapter in ``adapter_dir`` as model ``new_tag``.

        Uploads each adapter file as a blob, then ``create(from_=base, adapters=...)``.
        Returns the new tag, ready to be a persona's ``model_name``.
        """
        adapter_dir = Path(adapter_dir)
        files = sorted(p for p in adapter_dir.iterdir()
                       if p.is_file() and p.suffix in _ADAPTER_SUFFIXES) \
            if adapter_dir.is_dir() else []
        if not files:
            raise InvalidRequest(f"no adapter files (*.safetensors, adapter_config.json) "
                                 f"in {adapter_dir}")
        digests = {p.name: self._call("create_blob", None,
                                      functools.partial(self.client.create_blob, p))
                   for p in files}
        r = self._call("create", base, lambda: self.client.create(
            model=new_tag, from_=base, adapters=digests, stream=False))
        if getattr(r, "status", "success") not in ("success", None):
            raise ModelError(f"Ollama create {new_tag} ended with status {r.status!r}")
        return new_tag

    def unload(self, model: str | None = None) -> None:
        """Ask Ollama to drop ``model`` (default: the one we loaded) via keep_alive=0."""
        model = model or self._resident
        if model is None:
            return
        self._call("unload", model, lambda: self.client.chat(model=model, messages=[],
                                                               keep_alive=0))
        if model == self._resident:
            self._resident = None

    # -- the ModelManager backend protocol ------------------------------------

    def estimate_bytes(self, model: str) -> int | None:
        """The model's size from ``ollama list`` (None if Ollama does not say)."""
        want = model if ":" in model else model + ":latest"
        for m in self.list():
            if m.get("model") in (model, want) or m.get("name") in (model, want):
                return int(m["size"]) if m.get("size") else None
        raise ModelNotFound(f"Ollama has no model {model!r}: run `ollama pull {model}`")

    def load(self, model: str, progress: Progress | None = None) -> dict[str, Any]:
        if progress:
            progress(0.1, "asking Ollama to load")
        r = self._call("load", model, lambda: self.client.chat(
            model=model, messages=[], keep_alive=self.cfg.keep_alive))
        self._resident = model
        return {"load_duration_s": (getattr(r, "load_duration", None) or 0) / 1e9}

    def generate(self, messages: builtins.list[Message], *, temperature: float | None = None,
                 max_tokens: int | None = None, stop: builtins.list[str] | None = None,
                 on_token: OnToken | None = None, cancel: CancelToken | None = None,
                 **gen: Any) -> Generation:
        model = self._resident
        if model is None:
            raise ModelError("no Ollama model is loaded; the ModelManager loads one first")
        t0 = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        tokens = 0
        finish: Finish = "eos"
        for part in self._stream_parts(model, messages, temperature, max_tokens, stop, gen):
            if cancel is not None and cancel.is_set():
                finish = "cancelled"        # closing the stream stops Ollama generating
                break
            text = part.message.content if part.message else ""
            if text:
                if first is None:
                    first = time.perf_counter() - t0
                pieces.append(text)
                if on_token is not None:
                    on_token(text)
            if part.done:
                tokens = int(part.eval_count or 0)
                if getattr(part, "done_reason", None) == "length":
                    finish = "length"
        if not tokens:
            tokens = len(pieces)
        return Generation("".join(pieces).strip(), tokens, time.perf_counter() - t0, first,
                          finish)

    def structured(self, messages: builtins.list[Message], schema: dict[str, Any], *,
                   cancel: CancelToken | None = None) -> dict[str, Any]:
        """``format=schema`` (Ollama constrains decoding to it), then strict validation."""
        model = self._resident
        if model is None:
            raise ModelError("no Ollama model is loaded; the ModelManager loads one first")
        r = self._call("chat", model, lambda: self.client.chat(
            model=model, messages=messages, stream=False, format=schema,
            options={"temperature": 0.0}, keep_alive=self.cfg.keep_alive))
        raw = (r.message.content or "").strip()
        return validate_object(parse_json_answer(model, raw), schema)


def _plain(m: Any) -> dict[str, Any]:
    d = plain(m)            # the wire codec's reduction: datetimes become ISO strings
    if not isinstance(d, dict):         # ollama's Model/ProcessResponse entries are objects
        raise ModelError(f"Ollama listed {m!r}, not a model record")
    d.setdefault("name", d.get("model"))
    return d
