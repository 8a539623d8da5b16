"""The CTranslate2 token engine: the embedded default (int8, about llama.cpp's speed).

CTranslate2 ships as a manylinux wheel (no compiler at install), quantizes to int8
when the model is converted, runs the KV cache in C++ and streams tokens through
``generate_tokens`` (closing the iterator stops the decoding). It has no run-time
LoRA, so an adapter is merged and converted once (see :mod:`a4ps.models.ct2_convert`).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Generator, Sequence

from a4ps.models.engine import Sampling
from a4ps.models.errors import ModelLoadError
from a4ps.models.thread_choice import ThreadChoice, choose_threads, machine_key
from a4ps.models.threads import apply_openmp_policy
from a4ps.models.tokens import ChatTokenizer

# what the thread probe decodes (a story runs on well past the probe's few tokens)
PROBE_PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


class CT2Engine:
    """A converted CTranslate2 generator plus the tokenizer that maps ids to its vocab."""

    name = "ctranslate2"

    def __init__(self, model_dir: Path, tok: ChatTokenizer, *, threads: int = 1,
                 compute_type: str = "int8") -> None:
        apply_openmp_policy()          # before the first import loads its OpenMP runtime
        import ctranslate2
        try:
            self.generator = ctranslate2.Generator(
                str(model_dir), device="cpu", compute_type=compute_type,
                inter_threads=1, intra_threads=max(1, int(threads)))
        except Exception as e:
            raise ModelLoadError(f"could not load the CTranslate2 model in {model_dir} ({e}); "
                                 f"delete that directory and it will be converted again") from e
        self.tok = tok
        self.model_dir = Path(model_dir)

    def _strings(self, ids: Sequence[int]) -> list[str]:
        return self.tok.token_strings(ids)

    def stream(self, ids: list[int], *, max_new: int,
               sampling: Sampling) -> Generator[int, None, None]:
        kw = dict(max_length=int(max_new), end_token=sorted(self.tok.end_ids),
                  repetition_penalty=float(sampling.repetition_penalty),
                  no_repeat_ngram_size=int(sampling.no_repeat_ngram_size))
        if sampling.greedy:
            kw.update(sampling_topk=1)
        else:
            kw.update(sampling_topk=int(sampling.top_k or 0), sampling_topp=float(sampling.top_p),
                      sampling_temperature=float(sampling.temperature))
        steps = self.generator.generate_tokens(self._strings(ids), **kw)
        try:
            for step in steps:
                yield int(step.token_id)
        finally:
            steps.close()       # stops the decoding thread at its next step

    def decode_seconds(self, ids: list[int], tokens: int) -> float:
        """Seconds per greedy decode step over ``tokens`` steps after the first token
        (the first is the prompt's prefill, not decoding)."""
        stamps: list[float] = []
        for _ in self.generator.generate_tokens(self._strings(ids), max_length=int(tokens) + 1,
                                                sampling_topk=1,
                                                end_token=sorted(self.tok.end_ids)):
            stamps.append(time.perf_counter())
        if len(stamps) < 2:
            raise ModelLoadError("the thread probe's prompt ended at once; set "
                                 "models.embedded.threads to skip the probe")
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    def score(self, prefix: list[int], continuations: Sequence[list[int]]) -> list[list[float]]:
        """Prefill dominates the cost (it is compute-bound: n sequences cost n
        prefills), so continuations that differ only in their last token share one
        forward pass over ``prefix + stem``: its log-probabilities at every position
        give the stem's tokens, and the last row gives every last token at once
        ("yes"/"no", " 1".." 9", "true"/"false" each cost a single pass)."""
        import numpy as np
        out: list[list[float]] = [[] for _ in continuations]
        stems: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(continuations):
            if c:
                stems.setdefault(tuple(c[:-1]), []).append(i)
        n = len(prefix)
        for stem, members in stems.items():
            logp = np.asarray(self.generator.forward_batch(
                [self._strings(prefix + list(stem))], return_log_probs=True))[0]
            head = [float(logp[n - 1 + j, t]) for j, t in enumerate(stem)]
            last = logp[n - 1 + len(stem)]
            for i in members:
                out[i] = head + [float(last[continuations[i][-1]])]
        return out

    def close(self) -> None:
        self.generator = None


def load_with_thread_choice(model_dir: Path, tok: ChatTokenizer, *, setting: int, policy: int,
                            compute_type: str, cache: Path,
                            on_probe: Callable[[str], None] | None = None
                            ) -> tuple[CT2Engine, ThreadChoice]:
    """The engine on the threads it decodes fastest with here (see
    :mod:`a4ps.models.thread_choice`): the setting, the remembered choice, or a probe
    of 1 thread against the policy's N on two engines, keeping the faster one loaded."""
    engines: dict[int, CT2Engine] = {}
    ids = tok.chat_ids(PROBE_PROMPT)

    def timer(threads: int, tokens: int) -> float:
        if threads not in engines:
            if not engines and on_probe is not None:
                on_probe(f"timing 1 and {policy} threads (first load on this machine)")
            engines[threads] = CT2Engine(model_dir, tok, threads=threads,
                                         compute_type=compute_type)
            engines[threads].decode_seconds(ids, 2)         # warm-up: first-call allocations
        return engines[threads].decode_seconds(ids, tokens)

    import ctranslate2
    key = machine_key(policy, f"ctranslate2 {ctranslate2.__version__} {compute_type}",
                      _model_shape(model_dir))
    try:
        choice = choose_threads(setting, policy, cache, key, timer)
        engine = engines.pop(choice.threads, None) or CT2Engine(
            model_dir, tok, threads=choice.threads, compute_type=compute_type)
    finally:
        for other in engines.values():
            other.close()
    return engine, choice


def _model_shape(model_dir: Path) -> str:
    """The model's architecture (a merged adapter shares its base's): the digest of the
    config the converter wrote beside it."""
    cfg = Path(model_dir) / "hf_config.json"
    try:
        return hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]
    except OSError:
        return Path(model_dir).name
