"""The training child: `python -m a4ps.fine_tuning.train_worker JOB.json`.

Training runs in its own process because importing Unsloth patches TRL and
transformers globally, a crash or out-of-memory must not take the daemon down, and
the memory of a training run is only truly returned when its process ends. The
parent (:class:`a4ps.fine_tuning.unsloth_forge.PersonaFinetuner`) reads one JSON
object per line from this process's stdout; everything else the libraries print is
sent to stderr, which the parent keeps as ``train.log``.

Lines written (``event`` key):
  loading   {base_dir, max_steps}  (first, before the training stack is imported)
  start     {backend, device, why, base_dir, train_size, heldout_size, max_steps}
  eval      {which: "current"|"new", loss, ppl, tokens, items: [{id, set, loss, tokens}],
             seconds}
  progress  {step, max_steps, loss}
  done      {adapter_dir, backend, steps, first_loss, last_loss, current_loss,
             new_loss, eval_current, eval_new, eval_seconds, seconds, peak_rss_mb,
             adapter_bytes}
  error     {message}           (then exit code 1)

The evaluation file (``eval_path``) holds one item per line, ``{id, set, user,
assistant}``; each item's answer loss is reported on its own, before and after
training, so the gate (:mod:`a4ps.fine_tuning.evaluation`) can compare the two models
item by item.

The backend is chosen here: Unsloth when it imports and finds CUDA, else TRL+PEFT on
the CPU with the same recipe (LoRA r=16 on the seven projections, warmup + linear
schedule, lr 2e-4, 8-bit AdamW where bitsandbytes and CUDA are present).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Required, TextIO, TypedDict

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, TrainerCallback
    from trl import SFTConfig, SFTTrainer

class TrainJob(TypedDict, total=False):
    """``job.json``: what the fine-tuner asks of the training child (written by
    ``PersonaFinetuner._write_job``); held-out items come from ``eval_path``, or from a
    plain golden file at ``heldout_path``."""
    base_dir: Required[str]
    train_path: Required[str]
    out_dir: Required[str]
    steps: Required[int]
    learning_rate: Required[float]
    lora_r: Required[int]
    lora_alpha: Required[int]
    warmup_steps: Required[int]
    batch_size: Required[int]
    grad_accum: Required[int]
    max_length: Required[int]
    eval_path: str
    heldout_path: str
    current_adapter: str | None
    system_prompt: str
    backend: str                 # "auto" | "trl" | "unsloth"
    seed: int
    threads: int                 # 0: the idle cores


TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_out: TextIO = sys.stdout


def emit(event: str, **payload: Any) -> None:
    _out.write(json.dumps({"event": event, **payload}, default=str) + "\n")
    _out.flush()


def _claim_stdout() -> None:
    """Keep the real stdout for our JSON lines; send all other output to stderr."""
    global _out
    fd = os.dup(1)
    _out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def _idle_cores() -> int:
    """CPU threads to train with: the cores not already busy.

    On a shared, loaded machine OpenMP threads fighting for the same cores made a
    training step 10x slower than one thread; on an idle machine this is every core.
    """
    n = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(n, n - busy))


def _has_bnb() -> bool:
    """8-bit AdamW needs bitsandbytes with a working native library."""
    try:
        import bitsandbytes.functional  # noqa: F401
        return True
    except Exception:
        return False


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# -- data ------------------------------------------------------------------------------

def _turn(msgs: list[Any], role: str, last: bool = False) -> str | None:
    seq = reversed(msgs) if last else msgs
    return next((m.get("content") for m in seq if isinstance(m, dict) and m.get("role") == role), None)


def read_golden(path: str | Path) -> list[dict[str, Any]]:
    """Usable golden-set rows (chat format with a user and an assistant turn); bad
    lines are skipped. Shared with the supervisor, so both read the file alike."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        msgs = row.get("messages") if isinstance(row, dict) else None
        if isinstance(msgs, list) and _turn(msgs, "user") and _turn(msgs, "assistant", last=True):
            rows.append(row)
    return rows


def sample_of(row: dict[str, Any]) -> dict[str, Any]:
    """One golden-set row -> {user, assistant}: the first user turn, the last answer."""
    msgs = row["messages"]
    return {"user": _turn(msgs, "user"), "assistant": _turn(msgs, "assistant", last=True)}


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Golden-set rows -> [{user, assistant}] for training and evaluation."""
    return [sample_of(r) for r in read_golden(path)]


def _messages(sample: dict[str, Any], system_prompt: str | None, with_answer: bool
              ) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": sample["user"]})
    if with_answer:
        msgs.append({"role": "assistant", "content": sample["assistant"]})
    return msgs


def render(tokenizer: PreTrainedTokenizerBase, sample: dict[str, Any],
           system_prompt: str | None, eos: str | None) -> str:
    text = str(tokenizer.apply_chat_template(_messages(sample, system_prompt, True),
                                             tokenize=False))
    text = text.rstrip("\n")
    if eos and not text.endswith(eos):
        text += eos
    return text


# -- evaluation --------------------------------------------------------------------------

def item_losses(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                samples: list[dict[str, Any]], system_prompt: str | None, eos: str | None,
                max_length: int, device: str, *,
                content_only: bool = False) -> list[tuple[float, int]]:
    """(mean NLL over the answer tokens, answer tokens) per sample; prompt tokens are
    masked out. A sample with no answer token left after truncation gives (nan, 0).

    ``content_only``: leave the end-of-turn token out. Training on *anything* in chat
    format (ten rows of random words) teaches the model where an answer ends, which
    alone lowers every answer's loss; the gate asks whether the answers' words got
    likelier, so it scores the content tokens.
    """
    import torch
    out_rows: list[tuple[float, int]] = []
    eos_id = tokenizer.convert_tokens_to_ids(eos) if eos else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in samples:
            prompt = tokenizer.apply_chat_template(_messages(s, system_prompt, False),
                                                   tokenize=False, add_generation_prompt=True)
            full = render(tokenizer, s, system_prompt, eos)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            f_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
            if content_only and eos_id is not None and f_ids and f_ids[-1] == eos_id:
                f_ids = f_ids[:-1]
            if len(f_ids) <= len(p_ids):
                out_rows.append((float("nan"), 0))
                continue
            ids = torch.tensor([f_ids], device=device)
            labels = ids.clone()
            labels[0, :len(p_ids)] = -100
            out = model(input_ids=ids, labels=labels)
            n = int((labels[0, 1:] != -100).sum())
            out_rows.append((float(out.loss), n))
    if was_training:
        model.train()
    return out_rows


def answer_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                samples: list[dict[str, Any]], system_prompt: str | None, eos: str | None,
                max_length: int, device: str) -> tuple[float, int]:
    """Mean NLL over all the samples' answer tokens (token-weighted)."""
    rows = [(loss, n) for loss, n in item_losses(model, tokenizer, samples, system_prompt, eos,
                                                  max_length, device) if n]
    count = sum(n for _, n in rows)
    if count == 0:
        return float("nan"), 0
    return sum(loss * n for loss, n in rows) / count, count


def read_eval_items(path: str | Path) -> list[dict[str, Any]]:
    """The gate's evaluation items: ``{id, set, user, assistant}`` per line."""
    items = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            items.append({"id": str(row["id"]), "set": str(row.get("set") or "heldout"),
                          "user": str(row["user"]), "assistant": str(row["assistant"])})
    return items


def _evaluate(which: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
              items: list[dict[str, Any]], system_prompt: str | None, eos: str | None,
              max_length: int, device: str) -> tuple[list[dict[str, Any]], float]:
    t0 = time.monotonic()
    rows = item_losses(model, tokenizer, items, system_prompt, eos, max_length, device,
                       content_only=True)
    out = [{"id": it["id"], "set": it["set"], "loss": None if n == 0 else loss, "tokens": n}
           for it, (loss, n) in zip(items, rows)]
    seconds = round(time.monotonic() - t0, 3)
    counted = [(r["loss"], r["tokens"]) for r in out if r["tokens"]]
    total = sum(n for _, n in counted)
    mean = sum(l * n for l, n in counted) / total if total else float("nan")
    emit("eval", which=which, loss=mean, ppl=_ppl(mean), tokens=total, items=out, seconds=seconds)
    return out, mean


# -- backend choice ------------------------------------------------------------------------

def choose_backend(requested: str) -> tuple[str, str]:
    """('unsloth'|'trl', why). Unsloth is imported only when CUDA is there."""
    if requested == "trl":
        return "trl", "TRL+PEFT requested"
    try:
        import torch
        cuda = torch.cuda.is_available()
    except Exception as e:  # pragma: no cover - torch is a hard dependency
        return "trl", f"torch unusable: {e}"
    if not cuda:
        if requested == "unsloth":
            raise RuntimeError("backend 'unsloth' requested but no CUDA device is visible")
        return "trl", "no CUDA device: TRL+PEFT on the CPU"
    # Unsloth falls back to CPU by itself on CPU-only machines; we only want it on CUDA.
    os.environ.setdefault("UNSLOTH_DISABLE_CPU_FALLBACK", "1")
    try:
        import unsloth  # noqa: F401  (must come before trl/transformers/peft)
    except Exception as e:
        if requested == "unsloth":
            raise RuntimeError(f"backend 'unsloth' requested but it did not import: {e}")
        return "trl", f"CUDA present but Unsloth unavailable ({type(e).__name__}: {e})"
    if getattr(unsloth, "DEVICE_TYPE", "cuda") == "cpu":
        return "trl", "Unsloth imported but chose the CPU"
    return "unsloth", f"Unsloth {getattr(unsloth, '__version__', '?')} on {torch.cuda.get_device_name(0)}"


# -- training ------------------------------------------------------------------------------

def _progress_callback(max_steps: int) -> TrainerCallback:
    from transformers import TrainerCallback

    parent = os.getppid()

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # the daemon died (we run in our own session): don't train on as an orphan
            if os.getppid() != parent:
                raise SystemExit("the parent process is gone; training stopped")

        def on_log(self, args: Any, state: Any, control: Any,
                   logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                loss = float(logs["loss"])
                self.losses.append(loss)
                emit("progress", step=state.global_step, max_steps=max_steps, loss=loss)

    return Progress()


def _trainer_class(cuda: bool) -> type[SFTTrainer]:
    """SFTTrainer, or on the CPU a subclass computing the model's own cross-entropy.

    TRL 1.15 computes the SFT loss with Triton kernels (a fused LM head), which need
    Triton and CUDA tensors; a CPU-only torch has neither, so there we fall back to
    ``transformers.Trainer.compute_loss`` (TRL's suggested extension point).
    """
    from trl import SFTTrainer
    if cuda:
        import importlib.util
        if importlib.util.find_spec("triton") is not None:
            return SFTTrainer
    from transformers import Trainer

    class PlainLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PlainLossSFTTrainer


def _sft_config(job: TrainJob, out_dir: Path, *, cuda: bool, bf16: bool, optim: str,
                eos: str | None) -> SFTConfig:
    from trl import SFTConfig
    kw: dict[str, Any] = dict(
        output_dir=str(out_dir / "trainer"),
        max_steps=int(job["steps"]),
        per_device_train_batch_size=int(job["batch_size"]),
        gradient_accumulation_steps=int(job["grad_accum"]),
        learning_rate=float(job["learning_rate"]),
        warmup_steps=int(job["warmup_steps"]),
        lr_scheduler_type="linear",
        weight_decay=0.01,
        optim=optim,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=int(job.get("seed", 3407)),
        max_length=int(job["max_length"]),
        dataset_text_field="text",
        packing=False,
        bf16=bf16,
        fp16=False,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if eos:
        kw["eos_token"] = eos
    return SFTConfig(**kw)


def check_base(base_dir: str | Path) -> None:
    """A missing or broken base checkpoint fails here, in a second, not after the
    training stack (torch, transformers, TRL) took tens of seconds to import."""
    cfg = Path(base_dir) / "config.json"
    if not cfg.is_file():
        raise ValueError(f"the base checkpoint {base_dir} has no config.json; point the "
                         f"fine-tuner at a complete checkpoint (or delete it to rebuild it)")
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"the base checkpoint's {cfg} is not valid JSON ({e}); delete "
                         f"{base_dir} so it is rebuilt, or point at a complete one") from None


def train(job: TrainJob) -> dict[str, Any]:
    """Train one LoRA adapter as ``job`` says; evaluate the model before and after on the
    held-out items; the ``done`` record (adapter dir, losses, timings, peak memory)."""
    t0 = time.monotonic()
    check_base(job["base_dir"])
    # importing the training stack and loading the model take a while: say so at once
    emit("loading", base_dir=str(job["base_dir"]), max_steps=int(job["steps"]))
    backend, why = choose_backend(job.get("backend", "auto"))
    import torch

    random.seed(int(job.get("seed", 3407)))
    torch.manual_seed(int(job.get("seed", 3407)))
    threads = int(job.get("threads") or 0) or _idle_cores()
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)

    base_dir = str(job["base_dir"])
    out_dir = Path(job["out_dir"])
    adapter_out = out_dir / "adapter"
    train_samples, heldout = _job_samples(job)
    system_prompt = job.get("system_prompt") or None
    current_adapter = job.get("current_adapter") or None
    max_length = int(job["max_length"])
    cuda = backend == "unsloth" or torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"

    model, tokenizer, bf16, optim = _load_model(job, backend, base_dir, max_length,
                                                current_adapter, cuda)
    eos = _chat_tokens(tokenizer)

    emit("start", backend=backend, why=why, device=device, base_dir=base_dir,
         train_size=len(train_samples), heldout_size=len(heldout), max_steps=int(job["steps"]),
         optim=optim, bf16=bf16, current_adapter=current_adapter, threads=threads)

    # Before training the model IS the current one: a fresh LoRA starts with B=0 (the
    # base exactly), a continued one starts from the live adapter.
    eval_current, current_loss = (_evaluate("current", model, tokenizer, heldout, system_prompt,
                                            eos, max_length, device)
                                  if heldout else ([], float("nan")))

    trainer, progress, train_seconds = _fit(job, backend, model, tokenizer, train_samples,
                                            system_prompt, eos, out_dir, cuda=cuda, bf16=bf16,
                                            optim=optim)
    model = trainer.model

    t_eval = time.monotonic()
    eval_new, new_loss = (_evaluate("new", model, tokenizer, heldout, system_prompt, eos,
                                    max_length, device) if heldout else ([], float("nan")))
    eval_seconds = round(time.monotonic() - t_eval, 2)

    adapter_bytes = _save_adapter(model, adapter_out, base_dir)
    losses = progress.losses
    return {"adapter_dir": str(adapter_out), "backend": backend, "why": why,
            "steps": int(trainer.state.global_step),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "current_loss": current_loss, "new_loss": new_loss,
            "eval_current": eval_current, "eval_new": eval_new, "eval_seconds": eval_seconds,
            "train_seconds": round(train_seconds, 2),
            "seconds": round(time.monotonic() - t0, 2), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None),
            "adapter_bytes": adapter_bytes}


def _job_samples(job: TrainJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training samples, held-out items) the job names; refuses a job with nothing to train."""
    train_samples = read_samples(job["train_path"])
    if job.get("eval_path"):
        heldout = read_eval_items(job["eval_path"])
    elif job.get("heldout_path"):     # a plain golden file: every row is one item
        heldout = [{"id": str(i), "set": "heldout", **s}
                   for i, s in enumerate(read_samples(job["heldout_path"]))]
    else:
        heldout = []
    if not train_samples:
        raise ValueError(f"no usable samples in {job['train_path']}")
    return train_samples, heldout


def _load_model(job: TrainJob, backend: str, base_dir: str, max_length: int,
                current_adapter: str | None, cuda: bool) -> tuple[Any, Any, bool, str]:
    """(model with a trainable LoRA, tokenizer, bf16, optimizer name): a fresh adapter,
    or the live one continued. Unsloth on CUDA, transformers + PEFT otherwise."""
    import torch
    if backend == "unsloth":
        from unsloth import FastLanguageModel, is_bfloat16_supported
        bf16 = bool(is_bfloat16_supported())
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=base_dir, max_seq_length=max_length, dtype=None, load_in_4bit=False)
        if current_adapter:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, current_adapter, is_trainable=True)
        else:
            model = FastLanguageModel.get_peft_model(
                model, r=int(job["lora_r"]), lora_alpha=int(job["lora_alpha"]),
                target_modules=TARGET_MODULES, lora_dropout=0, bias="none",
                use_gradient_checkpointing="unsloth", random_state=int(job.get("seed", 3407)))
        optim = "adamw_8bit" if _has_bnb() else "adamw_torch"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from peft import LoraConfig, PeftModel, get_peft_model
        bf16 = bool(cuda and torch.cuda.is_bf16_supported())
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
        if cuda:
            # transformers types .to through functools.wraps, which drops the bound self
            model = model.to("cuda")  # type: ignore[arg-type]
        if current_adapter:
            model = PeftModel.from_pretrained(model, current_adapter, is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(
                r=int(job["lora_r"]), lora_alpha=int(job["lora_alpha"]),
                target_modules=TARGET_MODULES, lora_dropout=0.0, bias="none",
                task_type="CAUSAL_LM"))
        optim = "adamw_8bit" if cuda and _has_bnb() else "adamw_torch"
    return model, tokenizer, bf16, optim


def _chat_tokens(tokenizer: Any) -> str | None:
    """The turn-end token samples are rendered with (None if the vocabulary has none);
    gives the tokenizer a pad token when it lacks one."""
    vocab = tokenizer.get_vocab()
    eos = "<|im_end|>" if "<|im_end|>" in vocab else None
    pad = next((t for t in ("<|endoftext|>", "<pad>") if t in vocab), None)
    if tokenizer.pad_token is None and pad:
        tokenizer.pad_token = pad
    return eos


def _fit(job: TrainJob, backend: str, model: Any, tokenizer: Any,
         train_samples: list[dict[str, Any]], system_prompt: str | None, eos: str | None,
         out_dir: Path, *, cuda: bool, bf16: bool, optim: str) -> tuple[Any, Any, float]:
    """Supervised fine-tuning on the rendered samples: (trainer, progress callback,
    training seconds)."""
    from datasets import Dataset
    texts = [render(tokenizer, s, system_prompt, eos) for s in train_samples]
    dataset = Dataset.from_list([{"text": t} for t in texts])
    trainer_cls = _trainer_class(cuda) if backend == "trl" else None
    if trainer_cls is None:
        from trl import SFTTrainer
        trainer_cls = SFTTrainer
    args = _sft_config(job, out_dir, cuda=cuda, bf16=bf16, optim=optim, eos=eos)
    progress = _progress_callback(int(job["steps"]))
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[progress])
    t_train = time.monotonic()
    trainer.train()
    return trainer, progress, time.monotonic() - t_train


def _save_adapter(model: Any, adapter_out: Path, base_dir: str) -> int:
    """Save the adapter naming its base by a stable path; its size in bytes."""
    model.save_pretrained(str(adapter_out))
    # The adapter must name a base by a stable path, not the temp trainer dir.
    cfg_path = adapter_out / "adapter_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_dir
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return sum(p.stat().st_size for p in adapter_out.rglob("*") if p.is_file())


def _ppl(loss: float) -> float | None:
    if loss is None or math.isnan(loss):
        return None
    return math.exp(min(loss, 50.0))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m a4ps.fine_tuning.train_worker JOB.json", file=sys.stderr)
        return 2
    _claim_stdout()
    try:
        job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        result = train(job)
    except BaseException as e:  # report anything, then exit non-zero
        traceback.print_exc()
        emit("error", message=f"{type(e).__name__}: {e}")
        return 1
    emit("done", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
