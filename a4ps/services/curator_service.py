"""The Curator: ALFRED judges past interactions and keeps the best as a golden set.

Each pass takes the newest not-yet-curated interactions from memory (by recency, not
by a semantic query), asks ALFRED for a score on a fixed rubric (logical rigour,
creative synthesis, task efficacy) and which persona, BRICK or ROBIN, mattered more.
Samples at or above ``curator.score_threshold`` are appended to
``<golden_dir>/golden.jsonl`` in chat format (user = task, assistant = final answer;
the persona turns, score and vote in ``meta``). Every judged interaction is marked
curated, so it is never counted twice. Votes are counted over the current golden
set; when it reaches ``curator.trigger_size`` the file is archived (moved to
``<golden_dir>/archive/``, so new samples start a fresh set) and the persona with the
most votes is fine-tuned on the archived file.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..fine_tuning.evaluation import CANDIDATES, interaction_prompt, parse_score, parse_vote

log = logging.getLogger(__name__)

GOLDEN_FILE = "golden.jsonl"


@dataclass
class ScoredSample:
    memory_id: str
    task_id: str
    score: float | None
    vote: str | None
    kept: bool
    reply: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CurationReport:
    """One pass: what was judged, what was kept, the votes, and any fine-tune."""

    scored: list[ScoredSample] = field(default_factory=list)
    added: int = 0
    dataset_size: int = 0
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


class Curator:
    """ALFRED-as-judge over memory, the golden dataset, the vote, the trigger.

    ``judge``: ``fn(prompt) -> reply``; default asks the ALFRED proto's ``invoke_llm``.
    """

    def __init__(self, settings, bus, protos, memory, finetuner=None, *,
                 judge: Callable[[str], str] | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.protos = protos
        self.memory = memory
        self.finetuner = finetuner
        self._judge_fn = judge
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
            report.votes = self.votes()
            if finetune and report.dataset_size >= int(self.settings.curator.trigger_size):
                self._trigger(report)
            report.seconds = round(time.monotonic() - t0, 3)
            self.last_report = report
            return report

    def _judge(self, prompt: str) -> str:
        if self._judge_fn is not None:
            return self._judge_fn(prompt)
        return self.protos.get("ALFRED").invoke_llm(prompt, temperature=0.0, max_tokens=32)

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
        seen = {(r.get("meta") or {}).get("memory_id") for r in self.golden_rows()}
        done: list[str] = []
        new_rows: list[dict[str, Any]] = []
        for rec in records:
            if self._stop.is_set():
                break
            meta = rec.meta or {}
            task, answer = split_interaction(rec.text, meta)
            sample = ScoredSample(memory_id=str(rec.id), task_id=str(rec.task_id or ""),
                                  score=None, vote=None, kept=False)
            if not answer.strip():
                sample.error = "interaction has no final answer"
                done.append(rec.id)
                report.scored.append(sample)
                self._publish(sample)
                continue
            turns = _turns(meta)
            try:
                reply = self._judge(interaction_prompt(task, answer, turns))
            except Exception as e:
                # the judge (model) failed: leave it uncurated, try again next pass
                sample.error = f"judge failed: {type(e).__name__}: {e}"
                log.warning("curator: %s on %s", sample.error, rec.id)
                report.scored.append(sample)
                self._publish(sample)
                break
            sample.reply = str(reply)[:500]
            sample.score = parse_score(reply)
            sample.vote = parse_vote(reply)
            if sample.score is None:
                sample.error = "no score from 1.0 to 5.0 in the judge's reply"
                log.info("curator: unparseable judgement for %s: %r", rec.id, sample.reply[:200])
            elif sample.score >= float(cfg.score_threshold) and rec.id not in seen:
                sample.kept = True
                new_rows.append({
                    "messages": [{"role": "user", "content": task},
                                 {"role": "assistant", "content": answer}],
                    "meta": {"memory_id": rec.id, "task_id": rec.task_id, "score": sample.score,
                             "critical_persona": sample.vote, "turns": turns,
                             "dissonance": rec.dissonance, "judged_at": time.time()}})
                seen.add(rec.id)
            done.append(rec.id)
            report.scored.append(sample)
            self._publish(sample)
        if new_rows:
            self._append(new_rows)
            report.added = len(new_rows)
        if done:
            try:
                self.memory.mark_curated(done)
            except Exception as e:
                # the golden file already de-duplicates by memory id
                log.warning("curator: could not mark %d records curated: %s", len(done), e)

    def _publish(self, s: ScoredSample) -> None:
        self.bus.publish("curator.scored", {
            "memory_id": s.memory_id, "task_id": s.task_id, "score": s.score, "vote": s.vote,
            "kept": s.kept, "threshold": float(self.settings.curator.score_threshold),
            "error": s.error})

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
            report.finetune = ft.to_dict() if hasattr(ft, "to_dict") else dict(ft)
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
