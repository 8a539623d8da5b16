"""The Curator: ALFRED judges past interactions and keeps the best as a golden set.

Each pass takes the newest not-yet-curated interactions from memory (by recency, not
by a semantic query) and:

1. admits only interactions whose task came from an admitted origin
   (``curator.admit_origins``, by default only ``user``): the system's own goals and
   reflections carry their origin through memory and are not trained on;
2. collapses near-duplicates (the same task and answer, or a cosine of the two above
   ``curator.dedup_similarity`` to a row already kept);
3. asks ALFRED, through the judge (:class:`~a4ps.fine_tuning.judge.Judge`), for a
   score in 1..5 and which persona, BRICK or ROBIN, mattered more. The judge first
   runs cheap checks that cap the score with a reason (at 1: empty, repetition loop,
   task echo, refusal, a wrongly stated sum, off topic by embedding similarity; at 2:
   one word, prose cut off mid-sentence), then asks the model
   (see judge.py for what a 135M model is asked). A judgement the model could not
   make is no score, never a default; why a sample was not kept is recorded
   (``ScoredSample.reason``, the ``curator.scored`` event);
4. keeps samples at or above ``curator.score_threshold`` in chat format (user = task,
   assistant = final answer; persona turns, score and vote in ``meta``), routed by a
   hash of the task's text either to the golden (training) set
   ``<golden_dir>/golden.jsonl`` or to the held-out evaluation set
   ``<golden_dir>/eval.jsonl`` the fine-tuning gate measures on (never both).

Every looked-at interaction is marked curated, so it is never counted twice. Votes
are counted over the current golden set; when it reaches ``curator.trigger_size`` the
file is archived (moved to ``<golden_dir>/archive/``, so new samples start a fresh
set) and the persona with the most votes is fine-tuned on the archived file.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..fine_tuning.eval_set import EvalSet, content_key, routes_to_eval
from ..fine_tuning.judge import CANDIDATES, Judge
from ..memory import MemoryStore
from ..models.embeddings import Embedder
from ..models.errors import ModelError

if TYPE_CHECKING:
    from ..config import Settings
    from ..events import EventBus
    from ..proto import ProtoManager

log = logging.getLogger(__name__)

GOLDEN_FILE = "golden.jsonl"
USER_ORIGIN = "user"


def interaction_origin(meta: dict[str, Any]) -> str:
    """Where the interaction's task came from: ``user``, ``motivator``, ``reflection``...

    The graph stores the task's origin in the memory row's meta. Rows written before
    it did are told apart by the kind their task carried (goals and reflections
    always had one; user tasks had none)."""
    origin = meta.get("origin")
    if isinstance(origin, str) and origin:
        return origin
    kind = meta.get("kind")
    if kind == "goal":
        return "motivator"
    if kind == "reflection":
        return "reflection"
    return USER_ORIGIN


@dataclass
class ScoredSample:
    memory_id: str
    task_id: str
    score: float | None
    vote: str | None
    kept: bool
    route: str | None = None          # "train" | "eval" for a kept sample
    skipped: str | None = None        # why it was not judged (origin, duplicate...)
    origin: str = USER_ORIGIN
    method: str = ""
    error: str | None = None
    reason: str | None = None         # why it was not kept (a failed check, or the score)
    flags: list[str] = field(default_factory=list)   # the judge's failed cheap checks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CurationReport:
    """One pass: what was judged, what was kept, the votes, and any fine-tune."""

    scored: list[ScoredSample] = field(default_factory=list)
    added: int = 0
    held_out: int = 0                 # kept samples routed to the evaluation set
    skipped: dict[str, int] = field(default_factory=dict)
    dataset_size: int = 0
    eval_size: int = 0
    votes: dict[str, int] = field(default_factory=dict)
    triggered: bool = False
    persona: str | None = None
    archived_to: str | None = None
    finetune: dict[str, Any] | None = None
    note: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scored"] = [s.to_dict() for s in self.scored]
        return d


def split_interaction(text: str, meta: dict[str, Any]) -> tuple[str, str]:
    """(task, final answer) of an interaction record.

    The cognitive graph stores ``"Task: ...\\nAnswer: ..."`` as the text; ``meta`` may
    also carry ``task``/``answer`` explicitly, which win.
    """
    task, answer = meta.get("task"), meta.get("answer")
    if task and answer:
        return str(task), str(answer)
    body = text or ""
    if body.startswith("Task:") and "\nAnswer:" in body:
        head, _, tail = body.partition("\nAnswer:")
        return (str(task or head[len("Task:"):].strip()), str(answer or tail.strip()))
    return str(task or body.strip()), str(answer or "")


def _row_text(row: dict[str, Any]) -> str:
    msgs = row.get("messages") or []
    task = next((m.get("content") for m in msgs if m.get("role") == "user"), "")
    answer = next((m.get("content") for m in reversed(msgs) if m.get("role") == "assistant"), "")
    return f"{task}\n{answer}"


def _turns(meta: dict[str, Any]) -> dict[str, str]:
    out = {}
    for who in ("brick", "robin"):
        if meta.get(who):
            out[who.upper()] = str(meta[who])
    turns = meta.get("turns")
    if isinstance(turns, list):      # a richer transcript, if the graph provides one
        for t in turns:
            if isinstance(t, dict) and t.get("persona") and t.get("text"):
                out.setdefault(str(t["persona"]).upper(), str(t["text"]))
    return out


class FinetuneOutcome(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class Finetuner(Protocol):
    """The fine-tuning seam the curator triggers (:class:`PersonaFinetuner` is the one
    implementation; ``running`` is read with getattr, so a minimal one may omit it)."""

    def finetune(self, persona: str, dataset_path: Path) -> FinetuneOutcome: ...

    def cancel(self) -> bool: ...


class Curator:
    """ALFRED-as-judge over memory, the golden and eval sets, the vote, the trigger.

    ``judge``: an object with ``score(task, answer, turns) -> Verdict`` and
    ``vote(task, answer, turns) -> str | None`` (default: a :class:`Judge` over the
    ModelManager the protos provide). ``embedder``: for the
    near-duplicate check (default: the memory's).
    """

    def __init__(self, settings: Settings, bus: EventBus, protos: ProtoManager,
                 memory: MemoryStore, finetuner: Finetuner | None = None, *,
                 judge: Any = None, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.protos = protos
        self.memory = memory
        self.finetuner = finetuner
        self._judge = judge
        self.embedder = embedder if embedder is not None else getattr(memory, "embedder", None)
        self.eval_set = EvalSet(settings.golden_dir)
        self._vectors: dict[str, np.ndarray] = {}   # row text -> unit vector (dedup cache)
        self._lock = threading.Lock()        # one pass at a time
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_report: CurationReport | None = None

    # -- paths ---------------------------------------------------------------------------
    @property
    def golden_path(self) -> Path:
        return Path(self.settings.golden_dir) / GOLDEN_FILE

    @property
    def archive_dir(self) -> Path:
        return Path(self.settings.golden_dir) / "archive"

    def golden_rows(self) -> list[dict[str, Any]]:
        path = self.golden_path
        if not path.exists():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

    @property
    def judge(self) -> Any:
        if self._judge is None:
            self._judge = Judge(self.protos.service("models"), self.protos,
                                embedder=self.embedder)
        return self._judge

    def votes(self) -> dict[str, int]:
        c = Counter((r.get("meta") or {}).get("critical_persona") for r in self.golden_rows())
        return {p: int(c.get(p, 0)) for p in CANDIDATES}

    # -- thread ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="a4ps-curator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self.finetuner is not None and getattr(self.finetuner, "running", False):
            self.finetuner.cancel()      # a stopping daemon does not wait an hour for training
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("curator did not stop within %.0fs (a judge call may be running)", timeout)
        self._thread = None

    def request(self) -> None:
        """Run a pass on the thread now instead of at the next interval."""
        self._wake.set()

    def _loop(self) -> None:
        interval = float(self.settings.curator.interval_s)
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.run_once()
            except Exception:  # the loop survives anything a pass throws
                log.exception("curation pass failed")

    # -- one pass --------------------------------------------------------------------------
    def run_once(self, *, finetune: bool = True) -> CurationReport:
        """Judge the newest uncurated interactions, grow the golden set, maybe fine-tune."""
        t0 = time.monotonic()
        with self._lock:
            report = CurationReport()
            self._curate(report)
            rows = self.golden_rows()
            report.dataset_size = len(rows)
            report.eval_size = len(self.eval_set)
            report.votes = self.votes()
            if finetune and report.dataset_size >= int(self.settings.curator.trigger_size):
                self._trigger(report)
            report.seconds = round(time.monotonic() - t0, 3)
            self.last_report = report
            return report

    def _curate(self, report: CurationReport) -> None:
        cfg = self.settings.curator
        try:
            records = self.memory.recent(int(cfg.batch_size), uncurated_only=True, kind="interaction")
        except Exception as e:
            report.note = f"could not read memory: {type(e).__name__}: {e}"
            log.warning("curator: %s", report.note)
            return
        if not records:
            report.note = "nothing new to curate"
            return
        admitted = set(cfg.admit_origins)
        golden = self.golden_rows()
        held = self.eval_set.rows()
        seen = {(r.get("meta") or {}).get("memory_id") for r in golden + held}
        kept_texts = [_row_text(r) for r in golden + held]
        done: list[str] = []
        new_rows: list[dict[str, Any]] = []
        new_eval: list[dict[str, Any]] = []
        for rec in records:
            if self._stop.is_set():
                break
            meta = rec.meta or {}
            task, answer = split_interaction(rec.text, meta)
            sample = ScoredSample(memory_id=str(rec.id), task_id=str(rec.task_id or ""),
                                  score=None, vote=None, kept=False,
                                  origin=interaction_origin(meta))
            skip: tuple[str, str] | None = None          # (kind, detail)
            if sample.origin not in admitted:
                skip = ("origin", f"origin {sample.origin!r} is not admitted "
                                  f"(curator.admit_origins = {sorted(admitted)})")
            elif not answer.strip():
                skip = ("no_answer", "interaction has no final answer")
            elif rec.id in seen:
                skip = ("seen", "already in the golden or eval set")
            else:
                dup = self._duplicate_of(f"{task}\n{answer}", kept_texts)
                if dup is not None:
                    skip = ("duplicate", f"near-duplicate of a kept sample (cosine {dup:.3f})")
            if skip is not None:
                sample.skipped = skip[1]
                report.skipped[skip[0]] = report.skipped.get(skip[0], 0) + 1
                done.append(rec.id)
                report.scored.append(sample)
                self._publish(sample)
                continue
            turns = _turns(meta)
            try:
                verdict = self.judge.score(task, answer, turns)
                if verdict.score is not None and verdict.score >= float(cfg.score_threshold):
                    # only kept rows are counted for the vote: no need to ask for the others
                    verdict.vote = self.judge.vote(task, answer, turns)
            except ModelError as e:
                # the judge's model failed: leave it uncurated, try again next pass
                sample.error = f"judge failed: {type(e).__name__}: {e}"
                log.warning("curator: %s on %s", sample.error, rec.id)
                report.scored.append(sample)
                self._publish(sample)
                break
            sample.score, sample.vote, sample.method = verdict.score, verdict.vote, verdict.method
            sample.flags = list(getattr(verdict, "flags", None) or [])
            sample.reason = getattr(verdict, "reason", None)
            if sample.score is None:
                sample.error = verdict.error or "ALFRED gave no score"
                log.info("curator: no judgement for %s: %s", rec.id, sample.error)
            elif sample.score < float(cfg.score_threshold):
                sample.reason = (sample.reason or f"score {sample.score:g} is below the "
                                 f"threshold {float(cfg.score_threshold):g}")
                log.info("curator: not kept %s: %s", rec.id, sample.reason)
            elif sample.score >= float(cfg.score_threshold):
                sample.kept = True
                key = content_key(task)
                sample.route = "eval" if routes_to_eval(key, float(cfg.eval_fraction)) else "train"
                row = {
                    "messages": [{"role": "user", "content": task},
                                 {"role": "assistant", "content": answer}],
                    "meta": {"memory_id": rec.id, "task_id": rec.task_id, "score": sample.score,
                             "critical_persona": sample.vote, "turns": turns,
                             "origin": sample.origin, "key": key,
                             "dissonance": rec.dissonance, "judged_at": time.time()}}
                (new_eval if sample.route == "eval" else new_rows).append(row)
                kept_texts.append(_row_text(row))
                seen.add(rec.id)
            done.append(rec.id)
            report.scored.append(sample)
            self._publish(sample)
        if new_rows:
            self._append(new_rows)
            report.added = len(new_rows)
        if new_eval:
            report.held_out = self.eval_set.append(new_eval)
        if done:
            try:
                self.memory.mark_curated(done)
            except Exception as e:
                # the golden file already de-duplicates by memory id
                log.warning("curator: could not mark %d records curated: %s", len(done), e)

    def _duplicate_of(self, text: str, kept: list[str]) -> float | None:
        """The similarity to the closest kept row if ``text`` is a near-duplicate, else None."""
        if not kept:
            return None
        norm = " ".join(text.lower().split())
        if any(" ".join(k.lower().split()) == norm for k in kept):
            return 1.0
        if self.embedder is None:
            return None
        missing = [t for t in dict.fromkeys(kept + [text]) if t not in self._vectors]
        if missing:
            vecs = np.asarray(self.embedder.embed(missing), dtype=np.float64)
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs = vecs / np.where(norms > 0, norms, 1.0)
            self._vectors.update(zip(missing, vecs))
        q = self._vectors[text]
        best = max(float(np.dot(q, self._vectors[k])) for k in kept)
        return best if best >= float(self.settings.curator.dedup_similarity) else None

    def _publish(self, s: ScoredSample) -> None:
        self.bus.publish("curator.scored", {
            "memory_id": s.memory_id, "task_id": s.task_id, "score": s.score, "vote": s.vote,
            "kept": s.kept, "route": s.route, "skipped": s.skipped, "origin": s.origin,
            "threshold": float(self.settings.curator.score_threshold), "error": s.error,
            "reason": s.reason, "flags": s.flags})

    def _append(self, rows: list[dict[str, Any]]) -> None:
        path = self.golden_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
            fh.flush()

    def _trigger(self, report: CurationReport) -> None:
        votes = report.votes
        if self.finetuner is None:
            report.note = (f"golden set has {report.dataset_size} samples (trigger "
                           f"{self.settings.curator.trigger_size}) but no fine-tuner is attached")
            return
        if getattr(self.finetuner, "running", False):
            report.note = "a fine-tune is already running; the golden set waits"
            return
        # most votes wins; a tie (or no votes at all) goes to the first candidate, BRICK
        persona = max(CANDIDATES, key=lambda p: (votes.get(p, 0), -CANDIDATES.index(p)))
        if not any(votes.values()):
            log.info("curator: no persona votes in the golden set; fine-tuning %s", persona)
        archived = self._archive(persona)
        report.triggered, report.persona, report.archived_to = True, persona, str(archived)
        self.bus.log("info", f"curator: golden set reached {report.dataset_size}; fine-tuning "
                             f"{persona} (votes {votes}) on {archived.name}")
        try:
            ft = self.finetuner.finetune(persona, archived)
            report.finetune = ft.to_dict()
        except Exception as e:  # the curator survives a broken forge
            log.exception("fine-tune of %s failed", persona)
            report.finetune = {"persona": persona, "ok": False, "swapped": False,
                               "reason": f"{type(e).__name__}: {e}"}

    def _archive(self, persona: str) -> Path:
        """Move the golden set aside (atomic rename): new samples start a fresh file."""
        self.archive_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = self.archive_dir / f"golden-{stamp}-{persona}.jsonl"
        n = 1
        while target.exists():
            n += 1
            target = self.archive_dir / f"golden-{stamp}-{persona}-{n}.jsonl"
        self.golden_path.replace(target)
        return target
