"""The token engine seam under the embedded backend, and the one generation loop on it.

An engine knows only token ids: ``stream`` yields the next ids (greedy or sampled,
with the engine's own repetition penalty / n-gram ban) and stops when the caller
closes the iterator; ``score`` returns the log-probability of each continuation
token after a prefix. Everything above that (chat prompt, stop strings, the
repetition guard, cancel, streaming text, decisions) is written once here and in
:mod:`a4ps.models.decide`, so every engine behaves the same.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Protocol, Sequence

from a4ps.models.base import CancelToken, Finish, Generation, OnToken
from a4ps.models.errors import InvalidRequest, ModelNotFound
from a4ps.models.tokens import ChatTokenizer, RepetitionGuard, TextStream

if TYPE_CHECKING:
    import numpy as np

    from a4ps.config import EmbeddedModelSettings


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. ``temperature`` 0 (or None) is greedy."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @property
    def greedy(self) -> bool:
        return not self.temperature or self.temperature <= 0


class GeneratedPenalty:
    """The repetition penalty and n-gram ban over the tokens *generated* so far, not
    the prompt: what CTranslate2 (the default engine) does, so a persona's
    ``repetition_penalty`` / ``no_repeat_ngram_size`` mean the same on every engine.

    Transformers' processors and ONNX Runtime GenAI's own search count the prompt too,
    so a system prompt full of "." and "the" (and its ``<|im_end|>``) is penalised:
    on SmolLM2 that turned "The capital of France is Paris." into a ramble that fills
    the budget (measured: docs/architecture.md, "ONNX Runtime answer quality"). Engines
    without a generated-only option apply this to the logits themselves.
    """

    def __init__(self, sampling: Sampling) -> None:
        self.penalty = float(sampling.repetition_penalty)
        self.n = int(sampling.no_repeat_ngram_size)
        self.generated: list[int] = []
        self._seen: dict[tuple[int, ...], set[int]] = {}    # (n-1)-gram -> next tokens

    @property
    def active(self) -> bool:
        """Whether the logits need changing at all (never before the first token)."""
        return bool(self.generated) and (self.penalty != 1.0 or self.n > 0)

    def push(self, token: int) -> None:
        self.generated.append(int(token))
        if self.n > 0 and len(self.generated) >= self.n:
            gram = self.generated[-self.n:]
            self._seen.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def apply(self, logits: np.ndarray) -> None:
        """Change one row of logits (vocab,) in place, as CTranslate2 does: a seen
        token's logit is divided by the penalty (multiplied when negative), and a token
        completing an n-gram already generated gets -inf."""
        import numpy as np
        if not self.generated:
            return
        if self.penalty != 1.0:
            ids = np.unique(np.asarray(self.generated, dtype=np.int64))
            ids = ids[ids < logits.shape[-1]]
            s = logits[ids]
            logits[ids] = np.where(s < 0, s * self.penalty, s / self.penalty)
        if self.n > 0:
            key = tuple(self.generated[-(self.n - 1):]) if self.n > 1 else ()
            banned = [t for t in self._seen.get(key, ()) if t < logits.shape[-1]]
            if banned:
                logits[banned] = -np.inf


class TokenEngine(Protocol):
    """What a token engine offers (CTranslate2, ONNX Runtime GenAI, transformers)."""

    name: str

    def stream(self, ids: list[int], *, max_new: int,
               sampling: Sampling) -> Generator[int, None, None]:
        """Yield generated ids one by one; closing the generator stops the engine."""
        ...

    def score(self, prefix: list[int], continuations: Sequence[list[int]]) -> list[list[float]]:
        """Per-token log-probabilities of each continuation right after ``prefix``."""
        ...

    def close(self) -> None:
        """Drop the weights now (the backend's unload)."""
        ...


_GEN_KEYS = {"top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size", "seed"}


def require_peft_adapter(adapter: Path) -> None:
    """Refuse a persona model id that names a folder holding no PEFT adapter, before any
    engine spends time merging, converting or loading it."""
    if not (adapter / "adapter_config.json").is_file():
        raise ModelNotFound(f"no PEFT adapter at {adapter} (adapter_config.json missing); "
                            f"check the persona's model_name")


def sampling_from(cfg: EmbeddedModelSettings, temperature: float | None,
                  gen: dict[str, Any]) -> Sampling:
    """Per-call knobs over the settings' defaults; unknown knobs are a clear error."""
    unknown = set(gen) - _GEN_KEYS
    if unknown:
        raise InvalidRequest(f"unknown generation options {sorted(unknown)}; the embedded "
                             f"backend takes {sorted(_GEN_KEYS)}")
    # settings decide whether the embedded model samples at all (greedy by default,
    # what a 135M model does best); a call's temperature 0 forces greedy
    sample = bool(cfg.do_sample) and (temperature is None or temperature > 0)
    temp = float(temperature if temperature is not None else 0.7) if sample else 0.0
    rp = gen.get("repetition_penalty")
    nr = gen.get("no_repeat_ngram_size")
    tp = gen.get("top_p")
    tk = gen.get("top_k")
    s = Sampling(
        temperature=temp,
        top_p=float(tp if tp is not None else cfg.top_p),
        top_k=int(tk or 0),
        repetition_penalty=float(rp if rp is not None else cfg.repetition_penalty),
        no_repeat_ngram_size=int(nr if nr is not None else cfg.no_repeat_ngram_size))
    if not 0 < s.top_p <= 1 or s.repetition_penalty <= 0 or s.no_repeat_ngram_size < 0:
        raise InvalidRequest(f"bad generation options {gen!r}: top_p in (0, 1], "
                             f"repetition_penalty > 0, no_repeat_ngram_size >= 0")
    return s


def run_generation(engine: TokenEngine, tok: ChatTokenizer, messages: list[dict[str, str]], *,
                   max_new: int, sampling: Sampling, stop: Sequence[str] = (),
                   on_token: OnToken | None = None, cancel: CancelToken | None = None,
                   repetition_guard: bool = True) -> Generation:
    """Generate a reply: stop strings, the repetition guard and ``cancel`` act between
    tokens (the engine stops at once), and ``on_token`` gets text as it comes."""
    ids = tok.chat_ids(messages, reserve=max_new)
    text = TextStream(tok, stop, on_token)
    guard = RepetitionGuard() if repetition_guard else None
    t0 = time.perf_counter()
    first: float | None = None
    n = 0
    finish: Finish = "length"
    it = engine.stream(ids, max_new=max_new, sampling=sampling)
    try:
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
        else:
            for tid in it:
                if first is None:
                    first = time.perf_counter() - t0
                if tid in tok.end_ids:
                    finish = "eos"
                    break
                n += 1
                text.push(tid)
                if text.stopped:
                    finish = "stop"
                    break
                keep = guard.push(tid) if guard is not None else None
                if keep is not None:
                    text.cut(keep)
                    finish = "repetition"
                    break
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    text.end()
    return Generation(text.text.strip(), n, time.perf_counter() - t0, first, finish)
