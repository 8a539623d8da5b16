"""The transformers token engine: the fallback engine and the fine-tuner's own stack.

Slower than CTranslate2 on CPU (about a third of its speed), but it runs any PEFT
adapter at run time without converting anything. Selected with
``models.embedded.engine = "transformers"``.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Sequence, cast

from a4ps.models.engine import GeneratedPenalty, Sampling, require_peft_adapter
from a4ps.models.errors import ModelLoadError
from a4ps.models.threads import apply_openmp_policy

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_MAX_ADAPTERS = 4          # adapters kept attached to the resident base at once


class TorchEngine:
    """A causal LM in transformers, with PEFT LoRA adapters switched at run time."""

    name = "transformers"

    def __init__(self, model_dir: Path, *, dtype: str = "float32", threads: int = 1) -> None:
        apply_openmp_policy()
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(max(1, int(threads)))
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        model: Any      # a PreTrainedModel, later wrapped by PEFT
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
        except Exception as e:
            raise ModelLoadError(
                f"could not load the cached model in {model_dir} ({e}); delete that "
                f"directory and it will be rebuilt from the GGUF") from e
        model.eval()
        self.model: Any = model
        self.dtype = dtype
        self._peft = False
        self._adapters: dict[str, str] = {}     # adapter dir -> peft adapter name
        self._current: str | None = None         # active adapter dir (None = base)

    # -- adapters -----------------------------------------------------------

    def activate(self, adapter: Path | None) -> None:
        """Use the base (None) or the LoRA adapter in ``adapter`` for what follows."""
        if adapter is None:
            self._current = None
            return
        key = str(adapter)
        if key not in self._adapters:
            require_peft_adapter(adapter)
            name = f"a{len(self._adapters)}_{abs(hash(key)) % 10**8}"
            try:
                if not self._peft:
                    from peft import PeftModel
                    self.model = PeftModel.from_pretrained(
                        self.model, key, adapter_name=name, is_trainable=False)
                    self._peft = True
                else:
                    if len(self._adapters) >= _MAX_ADAPTERS:
                        oldest = next(iter(self._adapters))
                        self.model.delete_adapter(self._adapters.pop(oldest))
                    self.model.load_adapter(key, adapter_name=name, is_trainable=False)
            except Exception as e:
                raise ModelLoadError(f"could not load the LoRA adapter at {adapter}: {e}") from e
            self._adapters[key] = name
            self.model.eval()
        self.model.set_adapter(self._adapters[key])
        self._current = key

    def _ctx(self) -> contextlib.ExitStack[bool | None]:
        """Inference mode, with the adapters switched off while the base is active."""
        import torch
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self._peft and self._current is None:
            stack.enter_context(self.model.disable_adapter())
        return stack

    # -- the TokenEngine protocol --------------------------------------------

    def stream(self, ids: list[int], *, max_new: int,
               sampling: Sampling) -> Generator[int, None, None]:
        import torch
        from transformers import (LogitsProcessorList, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)
        # not transformers' repetition processors: they count the prompt too (see
        # GeneratedPenalty), and every engine must mean the same by these settings
        penalty = GeneratedPenalty(sampling)
        procs = LogitsProcessorList()
        if not sampling.greedy:
            procs.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                procs.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                procs.append(TopPLogitsWarper(sampling.top_p))
        seq = torch.tensor([ids], dtype=torch.long)
        past = None
        step_input = seq
        for _ in range(max_new):
            with self._ctx():
                out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                # seq is a torch.long tensor: what transformers' LongTensor annotation means
                row = out.logits[:, -1, :].float()
                if penalty.active:
                    penalty.apply(row[0].numpy())          # a view: changed in place
                logits = procs(cast("torch.LongTensor", seq), row)
                if sampling.greedy:
                    nxt = int(torch.argmax(logits, dim=-1))
                else:
                    probs = torch.softmax(logits, dim=-1)
                    nxt = int(torch.multinomial(probs, 1))
            penalty.push(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=-1)
            step_input = seq[:, -1:]
            yield nxt

    def score(self, prefix: list[int], continuations: Sequence[list[int]]) -> list[list[float]]:
        import torch
        n = len(prefix)
        longest = max(len(c) for c in continuations)
        batch = torch.zeros((len(continuations), n + longest), dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, c in enumerate(continuations):
            batch[i, :n + len(c)] = torch.tensor(prefix + list(c))
            mask[i, :n + len(c)] = 1
        with self._ctx():
            logp = torch.log_softmax(self.model(input_ids=batch, attention_mask=mask)
                                     .logits.float(), dim=-1)
        out = []
        for i, c in enumerate(continuations):
            rows = logp[i, n - 1:n - 1 + len(c)]
            out.append([float(rows[j, t]) for j, t in enumerate(c)])
        return out

    def close(self) -> None:
        self.model = None
        self._adapters = {}
