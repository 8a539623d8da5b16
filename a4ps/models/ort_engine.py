"""The ONNX Runtime GenAI token engine: int4 (or int8) weights, the least CPU per token
of the wheel-only engines measured here (bench/bench_models.py: ~9 ms on 1 thread,
against ~26 for CTranslate2 int8 and ~13 for llama.cpp). ORT's own thread pool spins
while it waits by default, which collapses when other work competes for the cores; the
session options from :func:`a4ps.models.threads.ort_session_options` turn that off
(``session.intra_op.allow_spinning = "0"``, a session config entry that genai_config
passes through) unless the user set ``OMP_WAIT_POLICY=ACTIVE``. Opt-in
(``models.embedded.engine = "onnxruntime"``); see docs/architecture.md for what making
it the default would take.

``onnxruntime-genai`` ships as a manylinux wheel; the model is built once by its own
model builder (MatMulNBits blocks of 32, fused attention and rotary) from the
dequantized checkpoint (see :mod:`a4ps.models.ort_convert`). Decoding runs one
``generate_next_token`` per token in the calling thread, so stopping is simply not
asking for the next one. The repetition penalty and n-gram ban are not ORT's (its
search counts the prompt too, which is where its persona answers parted from
CTranslate2's): :class:`GeneratedPenalty` changes the logits row between
``get_logits`` and ``set_logits``, and ORT then picks greedily or samples. A LoRA
adapter is merged and the model rebuilt once per adapter, like the CTranslate2 path
(ORT GenAI's run-time adapters need a model exported with LoRA inputs and adapters in
its own format: a later step).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Sequence

from a4ps.models.engine import GeneratedPenalty, Sampling
from a4ps.models.errors import ModelLoadError
from a4ps.models.threads import apply_openmp_policy, ort_session_options
from a4ps.models.tokens import ChatTokenizer

if TYPE_CHECKING:
    import numpy as np


ONNX_REQUIREMENTS = "requirements-onnx.txt"


def require_onnxruntime_genai() -> Any:
    """The ``onnxruntime_genai`` module, or a clear error: the engine is opt-in and its
    wheels (onnxruntime-genai, onnxruntime, onnx, onnx-ir) are not in requirements.txt."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise ModelLoadError(
            f"models.embedded.engine = \"onnxruntime\" needs the optional ONNX Runtime GenAI "
            f"wheels ({e}): install them with `.venv/bin/pip install -r {ONNX_REQUIREMENTS}`, "
            f"or set models.embedded.engine = \"ctranslate2\" (the default)") from None
    return og


class OrtEngine:
    """A built ONNX Runtime GenAI model plus the tokenizer shared with every engine."""

    name = "onnxruntime"

    def __init__(self, model_dir: Path, tok: ChatTokenizer, *, threads: int = 1) -> None:
        apply_openmp_policy()
        og = require_onnxruntime_genai()
        model_dir = Path(model_dir)
        try:
            cfg = og.Config(str(model_dir))
            cfg.overlay(json.dumps({"model": {"decoder": {
                "session_options": ort_session_options(threads)}}}))
            self.model = og.Model(cfg)
            genai = json.loads((model_dir / "genai_config.json").read_text())
        except Exception as e:
            raise ModelLoadError(f"could not load the ONNX Runtime model in {model_dir} ({e}); "
                                 f"delete that directory and it will be built again") from e
        self._og = og
        self.tok = tok
        self.model_dir = model_dir
        self.context = int(genai["model"].get("context_length") or 8192)

    def _generator(self, max_length: int, sampling: Sampling | None = None) -> Any:
        """An ``og.Generator`` (the library is untyped)."""
        og = self._og
        params = og.GeneratorParams(self.model)
        # the engine's own repetition penalty and n-gram ban stay off (1.0 / 0): they
        # count the prompt; :class:`GeneratedPenalty` is applied to the logits instead
        opts: dict[str, Any] = {"max_length": min(int(max_length), self.context),
                                "do_sample": False, "repetition_penalty": 1.0,
                                "no_repeat_ngram_size": 0}
        if sampling is not None and not sampling.greedy:
            # top_k 0 = no top-k cut (genai_config's default would be 50)
            opts.update(do_sample=True, temperature=float(sampling.temperature),
                        top_p=float(sampling.top_p), top_k=int(sampling.top_k or 0))
        params.set_search_options(**opts)
        return og.Generator(self.model, params)

    def stream(self, ids: list[int], *, max_new: int,
               sampling: Sampling) -> Generator[int, None, None]:
        import numpy as np
        gen = self._generator(len(ids) + int(max_new), sampling)
        gen.append_tokens(list(ids))
        penalty = GeneratedPenalty(sampling)
        try:
            while not gen.is_done():
                if penalty.active:
                    # a copy of the next-token row; ORT then picks (greedy or sampled)
                    # from what we hand back
                    logits = np.array(gen.get_logits(), dtype=np.float32)
                    penalty.apply(logits.reshape(-1))
                    gen.set_logits(logits)
                gen.generate_next_token()
                tid = int(gen.get_next_tokens()[0])
                penalty.push(tid)
                yield tid
        finally:
            del gen             # frees the KV cache now, not at the next collection

    def score(self, prefix: list[int], continuations: Sequence[list[int]]) -> list[list[float]]:
        """The prefix is prefilled once; each distinct stem (a continuation without its
        last token) is appended token by token after rewinding to the prefix, and the
        last row scores every last token at once (see CT2Engine.score)."""
        import numpy as np
        out: list[list[float]] = [[] for _ in continuations]
        stems: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(continuations):
            if c:
                stems.setdefault(tuple(c[:-1]), []).append(i)
        if not stems:
            return out
        n = len(prefix)
        longest = max(len(s) for s in stems)

        def logp(gen: Any) -> np.ndarray:
            x = np.asarray(gen.get_logits(), dtype=np.float64).reshape(-1)
            x = x - x.max()
            lp: np.ndarray = x - np.log(np.exp(x).sum())
            return lp

        gen = self._generator(n + longest + 1)
        gen.append_tokens(list(prefix))
        first = logp(gen)
        for stem, members in stems.items():
            if gen.token_count() > n:
                gen.rewind_to(n)
            rows = [first]
            for t in stem:
                gen.append_tokens([int(t)])
                rows.append(logp(gen))
            head = [float(rows[j][t]) for j, t in enumerate(stem)]
            last = rows[len(stem)]
            for i in members:
                out[i] = head + [float(last[continuations[i][-1]])]
        del gen
        return out

    def close(self) -> None:
        self.model = None
