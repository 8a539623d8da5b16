"""The persona forge: LoRA fine-tune, evaluation gate, cognitive atomic swap.

``PersonaFinetuner.finetune(persona, dataset)``:

1. reads the training rows and builds the evaluation items training never sees: the
   curator's held-out rows (``<golden_dir>/eval.jsonl``, see :mod:`.eval_set`), an
   optional held-out file, and the persona's capability suite (``config/eval/``).
   A training row whose task is also an evaluation item is dropped (no leakage);
2. asks the ModelManager to release the resident model (one model in memory: the
   seed's 8 GB rule), then trains a LoRA adapter in a **child process**
   (:mod:`a4ps.fine_tuning.train_worker`) supervised from here: a reader thread turns
   its JSON lines into ``finetune.progress`` events, this thread enforces the timeout.
   The child picks Unsloth when it imports and finds CUDA, else TRL+PEFT on the CPU,
   and reports every evaluation item's loss before and after training.
   A crash or kill of the child is reported; the live persona is untouched;
3. stages the candidate (:meth:`PersonaFinetuner.stage`): on the embedded backend the
   model id ``smollm2-135m+lora:<adapter dir>``; on Ollama, ``create`` with the
   adapter blobs over the persona's base tag;
4. runs the gate (:mod:`a4ps.fine_tuning.evaluation`): paired per-item comparison on
   the held-out items with a bootstrap confidence bound, the capability suite, and
   ALFRED's constrained judgement of both models' answers;
5. swaps only on that evidence: one ``protos.update`` sets the persona's
   ``model_name`` and appends to ``model_lineage``, so a task already running keeps
   the old model and the next one uses the new. A refused candidate is recorded in
   the lineage too (``status: "rejected"``), with the gate's numbers either way.

``rollback(persona)`` makes the previous live version live again.
Files: ``<adapter_dir>/<PERSONA>/v<N>/`` holds ``train.jsonl``, ``eval.jsonl``,
``job.json``, ``train.log``, ``adapter/`` and ``comparison.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..config import PROJECT_ROOT
from ..models.base import AdapterHost
from ..models.embedded import LORA_TAG, adapter_model_id, ensure_base_checkpoint, stage_adapter
from ..models.ollama_backend import OllamaBackend
from ..proto import ProtoError
from .errors import FinetuneError as FinetuneError  # its home is errors.py
from .eval_set import EvalSet, content_key, load_suite, row_answer, row_task
from .evaluation import Comparison, GatePolicy, compare_set, decide, judge_answers
from .judge import Judge
from .train_worker import TrainJob, read_golden

if TYPE_CHECKING:
    from ..config import Settings
    from ..events import EventBus
    from ..models.manager import ModelManager
    from ..proto import Proto, ProtoManager


log = logging.getLogger(__name__)

TRAINABLE = ("ALFRED", "BRICK", "ROBIN")
WORKER_MODULE = "a4ps.fine_tuning.train_worker"
JUDGE_ANSWER_TOKENS = 48     # each model's answer to a held-out task, for ALFRED to judge


@dataclass
class FinetuneReport:
    """What one fine-tune did. ``swapped`` tells whether the persona now uses it."""

    persona: str
    version: int | None = None
    ok: bool = False                  # training finished and produced an adapter
    swapped: bool = False
    reason: str = ""
    backend: str | None = None        # "unsloth" | "trl"
    backend_why: str | None = None
    steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    train_size: int = 0
    heldout_size: int = 0
    suite_size: int = 0
    leaked: int = 0                   # training rows dropped: their task is an eval item
    adapter_dir: str | None = None
    adapter_bytes: int | None = None
    previous_model: str | None = None
    model_name: str | None = None     # the candidate's model id/tag
    comparison: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    # wall seconds per stage (None: the child did not say)
    stages: dict[str, float | None] = field(default_factory=dict)
    exit_code: int | None = None
    log_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _ChildResult:
    events: list[dict[str, Any]]
    exit_code: int | None
    timed_out: bool

    def last(self, name: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("event") == name), None)


def eval_items(persona: str, heldout_rows: list[dict[str, Any]], suite_root: Path | None = None
               ) -> list[dict[str, Any]]:
    """The gate's items ``{id, set, user, assistant}``: held-out rows, then the suite."""
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in heldout_rows:
        key = content_key(row_task(row))
        if key in seen:
            continue
        seen.add(key)
        items.append({"id": key[:16], "set": "heldout", "user": row_task(row),
                      "assistant": row_answer(row)})
    for it in load_suite(persona, suite_root):
        items.append({"id": it.id, "set": "suite", "user": it.prompt, "assistant": it.reference})
    return items


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


class PersonaFinetuner:
    """Fine-tunes a persona's model and swaps it in when it passes the gate.

    ``backend``: "auto" (Unsloth on CUDA, else TRL+PEFT), "trl" or "unsloth" (fail if
    unavailable). ``python``: the interpreter for the training child. ``ollama``: an
    object with ``create_with_adapter(tag, base, dir)`` (default: the ModelManager's
    backend when it has one, else an :class:`OllamaBackend` on demand). ``suite_root``:
    where the capability suites are (default ``config/eval``).
    """

    def __init__(self, settings: Settings, bus: EventBus, protos: ProtoManager,
                 models: ModelManager, *, backend: str = "auto",
                 python: str | None = None, ollama: AdapterHost | None = None,
                 base_checkpoint: Path | str | None = None,
                 suite_root: Path | str | None = None) -> None:
        if backend not in ("auto", "trl", "unsloth"):
            raise ValueError(f"backend must be 'auto', 'trl' or 'unsloth', not {backend!r}")
        self.settings = settings
        self.bus = bus
        self.protos = protos
        self.models = models
        self.backend = backend
        self.python = python or sys.executable
        self._ollama = ollama
        self._base_checkpoint = Path(base_checkpoint) if base_checkpoint else None
        self._busy = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self.suite_root = Path(suite_root) if suite_root else None

    # -- public ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._busy.locked()

    def finetune(self, persona: str, dataset_path: str | Path, *, steps: int | None = None,
                 heldout_path: str | Path | None = None) -> FinetuneReport:
        """Train, gate and (maybe) swap. Never raises for a failed run: read the report.

        ``heldout_path``: evaluate on this file instead of a split of the dataset
        (then every dataset row is trained on).
        """
        t0 = time.monotonic()
        report = FinetuneReport(persona=persona)
        if not self._busy.acquire(blocking=False):
            report.reason = "another fine-tune is running; try again when it has finished"
            return report
        try:
            self._run(report, persona, Path(dataset_path), steps,
                      Path(heldout_path) if heldout_path else None)
        except FinetuneError as e:
            report.reason = str(e)
        except Exception as e:  # a bug here must not take the daemon down
            log.exception("fine-tune of %s failed", persona)
            report.reason = f"fine-tune failed: {type(e).__name__}: {e}"
        finally:
            self._proc = None
            self._busy.release()
            report.seconds = round(time.monotonic() - t0, 2)
        if not report.swapped:
            self.bus.log("warning" if not report.ok else "info",
                         f"fine-tune of {persona}: {'kept the live model' if report.ok else 'failed'}"
                         f" - {report.reason}", persona=persona, version=report.version)
        return report

    def cancel(self) -> bool:
        """Stop a running training child (the report will say it was killed)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        proc.kill()
        return True

    def lineage(self, persona: str) -> list[dict[str, Any]]:
        proto = self._persona(persona)
        return [dict(e) for e in (proto.get("model_lineage") or [])]

    def rollback(self, persona: str) -> dict[str, Any]:
        """Make the previous live version live again; returns {from, to, version}."""
        proto = self._persona(persona)
        lineage = [dict(e) for e in (proto.get("model_lineage") or [])]
        live_idx = next((i for i in range(len(lineage) - 1, -1, -1)
                         if lineage[i].get("status") == "live"), None)
        if live_idx is None:
            raise FinetuneError(f"{persona} has no fine-tuned version to roll back from "
                                f"(model_lineage is empty)")
        if proto.get("model_name") != lineage[live_idx].get("model_name"):
            raise FinetuneError(
                f"{persona}'s model_name ({proto.get('model_name')}) is not its live lineage "
                f"version ({lineage[live_idx].get('model_name')}); it was changed by hand, "
                f"so set it by hand")
        prev_idx = next((i for i in range(live_idx - 1, -1, -1)
                         if lineage[i].get("status") == "superseded"), None)
        if prev_idx is None:
            raise FinetuneError(f"{persona} is on its first version; there is nothing to roll back to")
        prev, cur = lineage[prev_idx], lineage[live_idx]
        adir = prev.get("adapter_dir")
        if adir and prev.get("backend", "embedded") == "embedded" and \
                not (Path(adir) / "adapter_config.json").is_file():
            raise FinetuneError(f"version {prev['version']}'s adapter is gone ({adir}); "
                                f"cannot roll back to it")
        cur["status"] = "rolled_back"
        cur["rolled_back_at"] = time.time()
        prev["status"] = "live"
        self.bus.publish("model.swapping", {"persona": persona, "old": cur["model_name"],
                                            "new": prev["model_name"], "rollback": True})
        self.protos.update(persona, {"model_name": prev["model_name"], "model_lineage": lineage},
                           expected_version=proto.version)
        out = {"persona": persona, "from": cur["model_name"], "to": prev["model_name"],
               "version": prev["version"]}
        self.bus.publish("model.swapped", {**out, "old": cur["model_name"],
                                           "new": prev["model_name"], "rollback": True})
        return out

    # -- the run -------------------------------------------------------------------------
    def _persona(self, persona: str) -> Proto:
        proto = self.protos.find(persona)
        if proto is None:
            raise FinetuneError(f"no persona proto named {persona!r}; personas are "
                                f"{[n for n in TRAINABLE if n in self.protos]}")
        return proto

    def _run(self, report: FinetuneReport, persona: str, dataset: Path, steps: int | None,
             heldout_path: Path | None) -> None:
        """Split the data, train a candidate in a child, stage it, gate it, swap it in.

        Each step fills ``report``; a step that ends the run says why in ``report.reason``."""
        proto = self._persona(persona)
        train_rows, items, steps = self._split_data(report, persona, dataset, steps, heldout_path)
        current_model = str(proto.get("model_name"))
        report.previous_model = current_model
        backend_kind = self._model_backend(proto)
        lineage = [dict(e) for e in (proto.get("model_lineage") or [])]
        current_adapter = self._current_adapter(current_model, lineage, backend_kind)
        version, vdir = self._version_dir(report, persona, lineage, train_rows, items)
        self._write_job(vdir, proto, current_adapter, steps)
        done = self._train_candidate(report, persona, version, vdir, steps)
        if done is None:
            return
        refused = self._refused_on_losses(done, current_model, backend_kind,
                                          done["adapter_dir"], items)
        candidate = self._stage_candidate(report, persona, proto, lineage, version,
                                          current_model, backend_kind, done["adapter_dir"],
                                          refused)
        if candidate is None:
            return
        cmp = self._gate(report, persona, vdir, done, current_model, candidate, items, proto,
                         steps, refused)
        if not cmp.passed:
            report.reason = f"the gate refused v{version}: {cmp.reason}"
            self._record(persona, proto, lineage, version, current_model, candidate, report,
                         backend_kind, status="rejected", swap=False, cmp=cmp)
            return
        self._swap_in(report, persona, proto, lineage, version, current_model, candidate,
                      backend_kind, cmp)

    def _split_data(self, report: FinetuneReport, persona: str, dataset: Path,
                    steps: int | None, heldout_path: Path | None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """(rows to train on, evaluation items, steps): never train on what the gate
        evaluates on."""
        cfg = self.settings.finetune
        if not dataset.is_file():
            raise FinetuneError(f"dataset {dataset} does not exist")
        rows = read_golden(dataset)
        hold_rows = EvalSet(self.settings.golden_dir).rows()[-int(cfg.eval_max_items):]
        if heldout_path is not None:
            if not heldout_path.is_file():
                raise FinetuneError(f"held-out file {heldout_path} does not exist")
            extra = read_golden(heldout_path)
            if not extra:
                raise FinetuneError(f"the held-out file {heldout_path} has no usable samples")
            hold_rows = hold_rows + extra
        items = eval_items(persona, hold_rows, self.suite_root)
        # never train on what the gate evaluates on
        held_keys = {content_key(it["user"]) for it in items}
        train_rows = [r for r in rows if content_key(row_task(r)) not in held_keys]
        report.leaked = len(rows) - len(train_rows)
        if not train_rows:
            raise FinetuneError(f"{dataset} has no usable sample to train on"
                                + (f" ({report.leaked} are evaluation items)" if report.leaked else ""))
        report.train_size = len(train_rows)
        report.heldout_size = sum(it["set"] == "heldout" for it in items)
        report.suite_size = sum(it["set"] == "suite" for it in items)
        steps = int(steps or cfg.max_steps)
        if steps < 1:
            raise FinetuneError(f"steps must be >= 1, got {steps}")
        return train_rows, items, steps

    def _version_dir(self, report: FinetuneReport, persona: str, lineage: list[dict[str, Any]],
                     train_rows: list[dict[str, Any]], items: list[dict[str, Any]]
                     ) -> tuple[int, Path]:
        """A fresh ``<adapter_dir>/<persona>/v<N>`` holding this run's train and eval data."""
        version = self._next_version(lineage)
        root = Path(self.settings.adapter_dir).resolve() / persona
        while (root / f"v{version}").exists():   # a failed or reset run kept its folder
            version += 1
        vdir = root / f"v{version}"
        vdir.mkdir(parents=True)
        report.version = version
        _write_jsonl(vdir / "train.jsonl", train_rows)
        _write_jsonl(vdir / "eval.jsonl", items)
        return version, vdir

    def _write_job(self, vdir: Path, proto: Any, current_adapter: Path | None, steps: int) -> None:
        """``job.json``: everything the training child needs, in one file."""
        cfg = self.settings.finetune
        base_dir = self._base_dir()
        job: TrainJob = {
            "base_dir": str(base_dir), "train_path": str(vdir / "train.jsonl"),
            "eval_path": str(vdir / "eval.jsonl"), "out_dir": str(vdir),
            "current_adapter": str(current_adapter) if current_adapter else None,
            "system_prompt": proto.get("system_prompt") or "",
            "steps": steps, "learning_rate": cfg.learning_rate, "lora_r": cfg.lora_r,
            "lora_alpha": cfg.lora_alpha, "warmup_steps": min(cfg.warmup_steps, max(0, steps - 1)),
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "max_length": cfg.max_length, "backend": self.backend, "seed": 3407,
            "threads": int(self.settings.models.embedded.threads or 0),
        }
        (vdir / "job.json").write_text(json.dumps(job, indent=2), encoding="utf-8")

    def _train_candidate(self, report: FinetuneReport, persona: str, version: int, vdir: Path,
                         steps: int) -> dict[str, Any] | None:
        """Run the training child; its ``done`` record, or None (``FAILED`` says why)."""
        cfg = self.settings.finetune
        # One model in memory: the live model leaves before training starts.
        self.models.release()
        t_child = time.monotonic()
        result = self._train(persona, vdir, steps, float(cfg.timeout_s))
        report.log_path = str(vdir / "train.log")
        report.exit_code = result.exit_code
        start = result.last("start") or {}
        report.backend, report.backend_why = start.get("backend"), start.get("why")
        done = result.last("done")
        report.stages["train_child"] = round(time.monotonic() - t_child, 2)
        if done is None or result.exit_code != 0:
            report.reason = self._failure_reason(result, vdir)
            (vdir / "FAILED").write_text(report.reason + "\n", encoding="utf-8")
            return None
        report.ok = True
        for k in ("steps", "first_loss", "last_loss", "adapter_bytes", "peak_rss_mb", "peak_gpu_mb"):
            setattr(report, k, done.get(k))
        report.train_seconds = done.get("train_seconds", done.get("seconds"))
        report.stages["train"] = report.train_seconds
        report.stages["eval_loss"] = done.get("eval_seconds")
        report.adapter_dir = done["adapter_dir"]
        self.bus.publish("model.tuned", {
            "persona": persona, "version": version, "adapter_dir": report.adapter_dir,
            "backend": report.backend, "steps": report.steps, "first_loss": report.first_loss,
            "last_loss": report.last_loss, "train_size": report.train_size,
            "seconds": report.train_seconds})
        return done

    def _refused_on_losses(self, done: dict[str, Any], current_model: str, backend_kind: str,
                           adapter_dir: Any, items: list[dict[str, Any]]) -> Comparison | None:
        """The gate's verdict on the losses alone when it already refuses, else None.

        A candidate the losses refuse is not staged: on the embedded engine staging merges
        the adapter and converts the whole model (its id costs nothing). Ollama still
        stages first, since creating the tag is how a missing base is found."""
        if backend_kind != "embedded":
            return None
        cmp = self._loss_comparison(done, current_model, adapter_model_id(Path(adapter_dir)),
                                    items)
        return None if cmp.passed else cmp

    def _stage_candidate(self, report: FinetuneReport, persona: str, proto: Any,
                         lineage: list[dict[str, Any]], version: int, current_model: str,
                         backend_kind: str, adapter_dir: Any,
                         refused: Comparison | None = None) -> str | None:
        """Stage the candidate where the persona's backend can run it: its model id, or
        None (recorded as a failed version; the persona keeps its model). A candidate
        already ``refused`` on its losses is named, never staged."""
        try:
            candidate = (refused.candidate_model if refused is not None else
                         self.stage(persona, version, Path(adapter_dir), current_model,
                                    lineage, backend_kind))
        except Exception as e:
            report.reason = (f"the adapter was trained but could not be staged on the "
                             f"{backend_kind} backend: {type(e).__name__}: {e}; "
                             f"{persona} keeps {current_model}")
            self._record(persona, proto, lineage, version, current_model, None, report,
                         backend_kind, status="failed", swap=False)
            return None
        report.model_name = candidate
        return candidate

    def _gate(self, report: FinetuneReport, persona: str, vdir: Path, done: dict[str, Any],
              current_model: str, candidate: str, items: list[dict[str, Any]], proto: Any,
              steps: int, refused: Comparison | None = None) -> Comparison:
        """Compare the candidate with the live model (:meth:`compare`, unless the losses
        already ``refused`` it); written to ``comparison.json`` and announced as the
        ``gate`` stage."""
        t_gate = time.monotonic()
        cmp = refused or self.compare(done, current_model, candidate, items, proto)
        report.comparison = cmp.to_dict()
        report.stages["gate"] = round(time.monotonic() - t_gate, 2)
        (vdir / "comparison.json").write_text(json.dumps(report.comparison, indent=2, default=str),
                                              encoding="utf-8")
        self.bus.publish("finetune.progress", {
            "persona": persona, "stage": "gate", "step": steps, "max_steps": steps,
            "loss": None, "passed": cmp.passed, "reason": cmp.reason})
        return cmp

    def _swap_in(self, report: FinetuneReport, persona: str, proto: Any,
                 lineage: list[dict[str, Any]], version: int, current_model: str,
                 candidate: str, backend_kind: str, cmp: Comparison) -> None:
        """Record the passed version as live and swap the persona onto it (unless its
        model changed during training)."""
        t_swap = time.monotonic()
        swapped = self._record(persona, proto, lineage, version, current_model, candidate,
                               report, backend_kind, status="live", swap=True, cmp=cmp)
        report.stages["swap"] = round(time.monotonic() - t_swap, 3)
        report.swapped = swapped
        report.reason = (f"v{version} passed the gate and is live: {cmp.reason}" if swapped else
                         f"v{version} passed the gate but {persona}'s model changed during "
                         f"training; kept the new one ({self.protos.get(persona).get('model_name')})")

    def compare(self, done: dict[str, Any], current_model: str, candidate: str,
                items: list[dict[str, Any]], proto: Any) -> Comparison:
        """The gate: the child's per-item losses, ALFRED's judgement, the decision."""
        policy = GatePolicy.from_settings(self.settings.finetune)
        cmp = self._loss_comparison(done, current_model, candidate, items)
        if not cmp.passed:
            return cmp          # refused on the losses: no need to ask ALFRED
        if policy.judge_samples > 0 and "ALFRED" in self.protos:
            samples = [{"user": it["user"], "assistant": it["assistant"]}
                       for it in items if it["set"] == "heldout"][:policy.judge_samples]
            # the gate cuts both models' answers at JUDGE_ANSWER_TOKENS itself: a cut-off
            # sentence there is not the answer's fault (both would tie at the cap). Not
            # grounding: it scores an answer by ALFRED's model's own likelihood, and the
            # current model's greedy answers are that model's (or its base's) own text,
            # so it would lean against every candidate; the rubric choice plus the
            # checks has no side
            judge = Judge(self.models, self.protos, embedder=self.models.embedder,
                          method="rubric", ignore=("unfinished",))
            cmp.judge = judge_answers(judge, self._answer_with(proto),
                                      samples, current_model, candidate,
                                      proto.get("system_prompt") or None)
            cmp.judge_current, cmp.judge_new = cmp.judge.current_mean, cmp.judge.new_mean
        return decide(cmp, policy)

    def _loss_comparison(self, done: dict[str, Any], current_model: str, candidate: str,
                         items: list[dict[str, Any]]) -> Comparison:
        """The gate's checks on the per-item losses alone (no judge asked yet)."""
        policy = GatePolicy.from_settings(self.settings.finetune)
        cur_items, new_items = done.get("eval_current") or [], done.get("eval_new") or []
        cmp = Comparison(current_model=current_model, candidate_model=candidate,
                         current_loss=_num(done.get("current_loss")),
                         new_loss=_num(done.get("new_loss")),
                         heldout_size=sum(it["set"] == "heldout" for it in items))
        cmp.current_ppl, cmp.new_ppl = _ppl(cmp.current_loss), _ppl(cmp.new_loss)
        heldout = compare_set("heldout", cur_items, new_items, rounds=policy.bootstrap_rounds)
        suite = compare_set("suite", cur_items, new_items, rounds=policy.bootstrap_rounds)
        cmp.heldout = heldout if heldout.n else None
        cmp.suite = suite if suite.n else None
        return decide(cmp, dataclasses.replace(policy, judge_samples=0))

    # -- pieces ---------------------------------------------------------------------------
    def _model_backend(self, proto: Proto) -> str:
        return str(proto.get("model_backend") or self.settings.models.backend)

    def _base_dir(self) -> Path:
        if self._base_checkpoint is not None:
            return self._base_checkpoint
        return Path(ensure_base_checkpoint(self.settings))

    @staticmethod
    def _current_adapter(current_model: str, lineage: list[dict[str, Any]], backend_kind: str
                         ) -> Path | None:
        """The live adapter to continue from (training resumes from what is live)."""
        if backend_kind == "embedded":
            _, sep, adir = current_model.partition(LORA_TAG)
            if sep and (Path(adir) / "adapter_config.json").is_file():
                return Path(adir)
            return None
        live = next((e for e in reversed(lineage) if e.get("status") == "live"
                     and e.get("model_name") == current_model), None)
        live_dir = live.get("adapter_dir") if live else None
        return (Path(live_dir) if live_dir and (Path(live_dir) / "adapter_config.json").is_file()
                else None)

    @staticmethod
    def _next_version(lineage: list[dict[str, Any]]) -> int:
        return max([int(e.get("version", 0)) for e in lineage] + [0]) + 1

    def _ollama_backend(self) -> AdapterHost:
        if self._ollama is not None:
            return self._ollama
        be = getattr(self.models, "backend", None)
        if isinstance(be, AdapterHost):      # has create_with_adapter
            return be
        self._ollama = OllamaBackend(self.settings)
        return self._ollama

    def stage(self, persona: str, version: int, adapter: Path, current_model: str,
              lineage: list[dict[str, Any]], backend_kind: str) -> str:
        """Make a trained adapter runnable on the persona's backend; returns its model id.

        The single place a candidate becomes something a backend can load (a hook for
        engines that merge a LoRA into their own weights)."""
        if backend_kind == "ollama":
            # the tag the current chain of versions started from (adapters are not stacked
            # in Ollama: each version is base + one adapter, trained from the live one)
            chain = _with_live_base(lineage, current_model, backend_kind)
            base = next((e["model_name"] for e in reversed(chain) if e.get("is_base")), current_model)
            tag = f"a4ps-{persona.lower()}:v{version}"
            return self._ollama_backend().create_with_adapter(tag, base, adapter)
        # make it runnable on the embedded engine now (CTranslate2 merges + converts
        # once), so neither the gate's judge nor the persona's next turn waits for it
        stage_adapter(self.settings, adapter)
        return adapter_model_id(adapter)

    def _answer_with(self, proto: Proto  # noqa: ARG002 - per-persona options may come later
                     ) -> Callable[[str, list[dict[str, str]]], str]:
        def chat(model: str, messages: list[dict[str, str]]) -> str:
            # greedy, so the two models are compared on their most likely answers
            return self.models.chat(model, messages, temperature=0.0,
                                    max_tokens=JUDGE_ANSWER_TOKENS)
        return chat

    def _record(self, persona: str, proto: Proto, lineage: list[dict[str, Any]], version: int,
                current_model: str, candidate: str | None, report: FinetuneReport,
                backend_kind: str, *, status: str, swap: bool,
                cmp: Comparison | None = None) -> bool:
        """Append the version to the lineage; on ``swap`` also switch the model (atomic).

        The entry keeps the gate's decision and all its numbers (``scores``)."""
        entry = {"version": version, "model_name": candidate, "adapter_dir": report.adapter_dir,
                 "backend": backend_kind, "train_backend": report.backend,
                 "dataset_size": report.train_size + report.leaked,
                 "train_size": report.train_size, "heldout_size": report.heldout_size,
                 "suite_size": report.suite_size, "steps": report.steps,
                 "first_loss": report.first_loss, "last_loss": report.last_loss,
                 "scores": cmp.numbers() if cmp is not None else {},
                 "decision": status, "parent_model": current_model, "status": status,
                 "created_at": time.time()}
        if swap:   # subscribers act first (the System pins a pre-swap snapshot)
            self.bus.publish("model.swapping", {"persona": persona, "old": current_model,
                                                "new": candidate, "version": version})
        for _ in range(3):
            proto = self.protos.get(persona)
            lin = [dict(e) for e in (proto.get("model_lineage") or [])]
            lin = _with_live_base(lin, current_model, backend_kind)
            changed_under_us = proto.get("model_name") != current_model
            slots: dict[str, Any] = {}
            if swap and not changed_under_us:
                for e in lin:
                    if e.get("status") == "live":
                        e["status"] = "superseded"
                slots["model_name"] = candidate
            elif swap:
                entry["status"] = "passed_not_swapped"
            slots["model_lineage"] = lin + [entry]
            try:
                self.protos.update(persona, slots, expected_version=proto.version)
            except ProtoError as e:   # a concurrent edit: re-read and try again
                if "version" in str(e):
                    continue
                raise
            if "model_name" in slots:
                self.bus.publish("model.swapped", {
                    "persona": persona, "old": current_model, "new": candidate,
                    "version": version, "adapter_dir": report.adapter_dir,
                    "comparison": entry["scores"]})
                return True
            return False
        raise FinetuneError(f"{persona} kept changing while the swap was tried; try again")

    # -- the child ---------------------------------------------------------------------------
    def _train(self, persona: str, vdir: Path, steps: int, timeout_s: float) -> _ChildResult:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        events: list[dict[str, Any]] = []
        with open(vdir / "train.log", "wb") as errlog:
            proc = subprocess.Popen(
                [self.python, "-m", WORKER_MODULE, str(vdir / "job.json")],
                stdout=subprocess.PIPE, stderr=errlog, stdin=subprocess.DEVNULL,
                cwd=str(PROJECT_ROOT), env=env, start_new_session=True)
            self._proc = proc
            reader = threading.Thread(target=self._read_child, args=(proc, persona, steps, events),
                                      name=f"finetune-{persona}-reader", daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill(proc)
            except BaseException:
                self._kill(proc)
                raise
            reader.join(timeout=10)
        return _ChildResult(events, proc.returncode, timed_out)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout=30)

    def _read_child(self, proc: subprocess.Popen[bytes], persona: str, steps: int,
                    events: list[dict[str, Any]]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                ev = json.loads(raw.decode("utf-8", "replace"))
            except ValueError:
                continue
            if not isinstance(ev, dict):
                continue
            events.append(ev)
            kind = ev.get("event")
            if kind == "progress":
                self.bus.publish("finetune.progress", {
                    "persona": persona, "step": ev.get("step"),
                    "max_steps": ev.get("max_steps", steps), "loss": ev.get("loss"),
                    "pid": proc.pid})
            elif kind == "loading":
                self.bus.publish("finetune.progress", {
                    "persona": persona, "step": 0, "max_steps": steps, "loss": None,
                    "stage": "loading", "pid": proc.pid})
            elif kind == "start":
                self.bus.publish("finetune.progress", {
                    "persona": persona, "step": 0, "max_steps": steps, "loss": None,
                    "stage": "training", "backend": ev.get("backend"), "why": ev.get("why"),
                    "pid": proc.pid})
            elif kind == "eval":
                self.bus.publish("finetune.progress", {
                    "persona": persona, "stage": f"eval_{ev.get('which')}", "loss": ev.get("loss"),
                    "step": steps if ev.get("which") == "new" else 0, "max_steps": steps})

    @staticmethod
    def _failure_reason(result: _ChildResult, vdir: Path) -> str:
        err = result.last("error")
        code = result.exit_code
        if result.timed_out:
            what = "training timed out (finetune.timeout_s) and was stopped"
        elif code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            what = f"the training process was killed by {name}"
        elif err is not None:
            what = f"training failed: {err.get('message')}"
        else:
            what = f"the training process exited with code {code} without finishing"
        tail = ""
        try:
            lines = (vdir / "train.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            tail = " | ".join(lines[-3:])
        except OSError:
            pass
        msg = f"{what}; the live persona is unchanged. Log: {vdir / 'train.log'}"
        if tail and err is None:
            msg += f" (last lines: {tail[-400:]})"
        return msg


def _with_live_base(lineage: list[dict[str, Any]], current_model: str, backend_kind: str
                    ) -> list[dict[str, Any]]:
    """Make sure the lineage's live entry is the persona's current model.

    The first tuning records the model it started from (version 0, ``is_base``). If
    the model was changed outside the forge (by hand, or a backend switch in the
    settings), the old live entry is marked ``detached`` and the current model
    becomes a new base, so a rollback never jumps to a model of another backend.
    """
    lin = [dict(e) for e in lineage]
    if any(e.get("status") == "live" and e.get("model_name") == current_model for e in lin):
        return lin
    for e in lin:
        if e.get("status") == "live":
            e["status"] = "detached"
    lin.append({"version": 0, "model_name": current_model, "adapter_dir": None,
                "backend": backend_kind, "status": "live", "is_base": True,
                "created_at": time.time()})
    return lin


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _ppl(loss: Any) -> float | None:
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return None
    return round(math.exp(min(float(loss), 50.0)), 4)
