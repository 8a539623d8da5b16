"""The philosophical loop: recurring dissonance becomes a proposed codex amendment.

Why: when BRICK and ROBIN keep diverging on the same kind of question, a principle is
probably missing or wrong. The philosopher watches ``dissonance.high`` events, groups
them by meaning (embedding cosine >= ``philosopher.similarity``, a threshold chosen
from data: :mod:`.similarity`), and once ``philosopher.recurrence_count`` similar tasks
accrue, or at the scheduled review (``philosopher.interval_s``, from at least two
similar tasks), asks ALFRED to draft an amendment. It only *proposes*:
:meth:`Codex.propose` stores the draft as pending and publishes ``codex.proposed``;
nothing changes until a human approves it (UI, ``a4ps codex approve``).

ALFRED drafts through ``ModelManager.structured`` (a JSON object with persona,
principle id, text and rationale, decoded under the schema where the backend can).
When no usable draft comes back (the backend cannot decide, the text is a
placeholder, unchanged, rejected before...) the philosopher says so: by default it
proposes nothing and reports the recurrence (``philosopher.no_draft`` event, status
``unresolved``) instead of dressing a template up as ALFRED's proposal; with
``philosopher.template_fallback`` it proposes a template whose rationale opens by
saying ALFRED's draft was unusable and why. The rationale always cites the task ids
behind it. An amendment the human rejected before is never proposed again.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..codex import CodexError
from ..models.errors import ModelError
from .motivator_service import clip, text_of
from .service_thread import ServiceThread

if TYPE_CHECKING:
    from ..codex import Amendment, Codex
    from ..config import Settings
    from ..events import Event, EventBus
    from ..memory import MemoryStore
    from ..models.embeddings import Embedder
    from ..proto import ProtoManager

log = logging.getLogger(__name__)

MAX_RECORDS = 500          # dissonance events kept for clustering
MAX_PENDING_OWN = 3        # the philosopher's own pending proposals before it waits
SCHEDULE_MIN_TASKS = 2     # a scheduled review needs at least this many similar tasks
MAX_PRINCIPLE_CHARS = 400
TEMPLATE_MARK = "[templated]"
MAX_UNRESOLVED = 20        # recurrences without a usable draft kept in status()

_STOP = set("""a an and are as at be but by can could did do does for from has have how i if
in into is it its me my no not of on or our so than that the their them then there these
they this to too us was we were what when where which who why will with would you your
about should please tell explain give make get just more most some any all also""".split())


@dataclass
class DissonanceRecord:
    task_id: str
    text: str
    dissonance: float | None
    brick: str
    robin: str
    vec: np.ndarray
    at: float
    used: bool = False


@dataclass
class Draft:
    persona: str
    principle_id: str
    text: str
    rationale: str
    templated: bool
    notes: list[str] = field(default_factory=list)


def _slug(s: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", str(s).strip().lower()).strip("_")
    return s[:40].strip("_")


def _is_placeholder(text: str) -> bool:
    return bool(re.search(r"<[^>]*>|\bsnake_case\b|\bone sentence\b", text, re.IGNORECASE))


class Philosopher:
    """Turns recurring high dissonance into pending codex amendments (never applies them)."""

    def __init__(self, settings: Settings, bus: EventBus, protos: ProtoManager,
                 memory: MemoryStore, codex: Codex, embedder: Embedder,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.bus = bus
        self.protos = protos
        self.memory = memory
        self.codex = codex
        self.embedder = embedder
        self.clock = clock
        self._lock = threading.Lock()
        self.records: list[DissonanceRecord] = []
        self._seen: set[str] = set()
        self._next_review = clock() + settings.philosopher.interval_s
        self.proposed: list[str] = []          # ids of amendments this philosopher made
        self.unresolved: list[dict[str, Any]] = []   # recurrences ALFRED drafted nothing usable for
        self.skipped: Counter[str] = Counter()
        self.last_error: str | None = None
        self._thread = ServiceThread("a4ps-philosopher", tick=self.tick,
                                     tick_s=min(5.0, settings.philosopher.interval_s))
        self._unsub: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Philosopher:
        if self._unsub is None:
            self._thread.start()
            self._unsub = self.bus.subscribe("dissonance.high", self._on_dissonance)
            self._thread.submit(self.recall_evidence)
        return self

    def stop(self) -> None:
        if self._unsub is not None:
            self._unsub()
            self._unsub = None
        self._thread.stop()

    def flush(self, timeout: float = 60.0) -> bool:
        return self._thread.flush(timeout)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"enabled": bool(self.settings.philosopher.enabled),
                    "tracked": sum(not r.used for r in self.records),
                    "proposed": list(self.proposed), "skipped": dict(self.skipped),
                    "unresolved": [dict(u) for u in self.unresolved],
                    "similarity": float(self.settings.philosopher.similarity),
                    "next_review_in_s": round(self._next_review - self.clock(), 1),
                    "last_error": self.last_error}

    # -- evidence ------------------------------------------------------------------------
    def _on_dissonance(self, event: Event) -> None:
        payload = dict(event.payload)
        self._thread.submit(lambda: self.observe(payload))

    def _embed(self, text: str) -> np.ndarray:
        v = np.asarray(self.embedder.embed([text]), dtype=np.float64).reshape(-1)
        n = np.linalg.norm(v)
        return v / n if n > 0 and np.isfinite(n) else v * 0.0

    def observe(self, payload: dict[str, Any]) -> Amendment | None:
        """Record one high-dissonance task; draft an amendment if it makes a recurrence."""
        task_id = str(payload.get("task_id") or "")
        text = str(payload.get("text") or "").strip()
        if not task_id or not text:
            self._note_skip("evidence_without_task_or_text")
            return None
        if payload.get("origin") == "reflection" or (payload.get("meta") or {}).get("kind") == "reflection":
            self._note_skip("reflection_task")   # dissonance about a reflection is not new evidence
            return None
        with self._lock:
            if task_id in self._seen:
                return None
            self._seen.add(task_id)
        d = payload.get("dissonance")
        rec = DissonanceRecord(task_id, text, float(d) if isinstance(d, (int, float)) else None,
                               str(payload.get("brick") or ""), str(payload.get("robin") or ""),
                               self._embed(text), self.clock())
        with self._lock:
            self.records.append(rec)
            if len(self.records) > MAX_RECORDS:
                self.records = self.records[-MAX_RECORDS:]
            cluster = self._similar_to(rec)
        if len(cluster) >= self.settings.philosopher.recurrence_count:
            return self.draft_from(cluster, trigger="recurrence")
        return None

    def recall_evidence(self, limit: int = 200) -> Amendment | None:
        """Rebuild the evidence from remembered high-dissonance interactions (after a
        restart); tasks already cited by an amendment count as spent. Drafts if the
        recalled evidence already holds a recurrence."""
        if self.memory is None:
            return None
        try:
            remembered = self.memory.recent(limit, kind="interaction")
        except Exception as e:
            log.warning("philosopher: cannot read memory to recall evidence (%s)", e)
            return None
        high = self.settings.cognition.dissonance_high
        spent = {t for a in list(self.codex.proposals.values()) for t in a.sources}
        added = 0
        for m in reversed(remembered):  # oldest first, like live events
            meta = getattr(m, "meta", None) or {}
            d = getattr(m, "dissonance", None)
            task_id = str(getattr(m, "task_id", "") or "")
            if (not task_id or not isinstance(d, (int, float)) or d <= high
                    or meta.get("kind") in ("reflection", "goal")):
                continue
            with self._lock:
                if task_id in self._seen:
                    continue
                self._seen.add(task_id)
            text = text_of(m)
            mt = re.match(r"\s*Task:\s*(.*?)(?:\nAnswer:|$)", text, re.DOTALL)
            text = (mt.group(1) if mt else text).strip()
            if not text:
                continue
            rec = DissonanceRecord(task_id, text, float(d), str(meta.get("brick") or ""),
                                   str(meta.get("robin") or ""), self._embed(text),
                                   float(getattr(m, "ts", 0.0) or self.clock()),
                                   used=task_id in spent)
            with self._lock:
                self.records.append(rec)
            added += 1
        if added:
            log.info("philosopher: recalled %d high-dissonance task(s) from memory", added)
        groups = self.clusters()
        if groups and len(groups[0]) >= self.settings.philosopher.recurrence_count:
            return self.draft_from(groups[0], trigger="recurrence")
        return None

    def _similar_to(self, rec: DissonanceRecord) -> list[DissonanceRecord]:
        sim = self.settings.philosopher.similarity
        return [r for r in self.records
                if not r.used and float(np.dot(r.vec, rec.vec)) >= sim]

    def clusters(self) -> list[list[DissonanceRecord]]:
        """Unused evidence grouped greedily by similarity, largest first."""
        with self._lock:
            left = [r for r in self.records if not r.used]
            out = []
            while left:
                seed = left[0]
                group = [r for r in left if float(np.dot(r.vec, seed.vec))
                         >= self.settings.philosopher.similarity]
                out.append(group)
                left = [r for r in left if r not in group]
            return sorted(out, key=len, reverse=True)

    # -- schedule --------------------------------------------------------------------------
    def tick(self) -> Amendment | None:
        """Run the scheduled review if it is due (the thread calls this while idle)."""
        if self.clock() < self._next_review:
            return None
        return self.review()

    def review(self) -> Amendment | None:
        """Draft from the largest similar group of unused evidence, if big enough."""
        self._next_review = self.clock() + self.settings.philosopher.interval_s
        groups = self.clusters()
        if not groups or len(groups[0]) < min(SCHEDULE_MIN_TASKS,
                                              self.settings.philosopher.recurrence_count):
            self._note_skip("review_without_recurrence")
            return None
        return self.draft_from(groups[0], trigger="schedule")

    # -- drafting ------------------------------------------------------------------------------
    def _note_skip(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] += 1

    def draft_schema(self) -> dict[str, Any]:
        """What ALFRED is asked to fill in (the model seam's JSON-schema subset)."""
        return {"type": "object", "required": ["persona", "principle_id", "text", "rationale"],
                "properties": {
                    "persona": {"enum": sorted(self.codex.personas)},
                    "principle_id": {"type": "string", "maxLength": 40},
                    "text": {"type": "string", "maxLength": MAX_PRINCIPLE_CHARS},
                    "rationale": {"type": "string", "maxLength": 600}}}

    def draft_from(self, cluster: list[DissonanceRecord], *, trigger: str) -> Amendment | None:
        """Ask ALFRED for an amendment from this evidence and propose it (pending)."""
        if not self.settings.philosopher.enabled:
            self._note_skip("disabled")
            return None
        own_pending = [a for a in self.codex.pending() if a.id in self.proposed]
        if len(own_pending) >= MAX_PENDING_OWN:
            self._note_skip("too_many_pending")  # wait for the human; keep the evidence
            return None
        with self._lock:
            for r in cluster:
                r.used = True  # this evidence is spent, whatever the outcome
        draft, why = self.ask_draft(cluster)
        if draft is not None:
            a = self._propose(draft, cluster, trigger)
            if a is not None:
                return a
            why = "the codex refused ALFRED's draft (see the log)"
        return self._unusable(cluster, trigger, why)

    def ask_draft(self, cluster: list[DissonanceRecord]) -> tuple[Draft | None, str]:
        """(a usable draft, "") or (None, why ALFRED's draft is unusable)."""
        alfred = self.protos.get("ALFRED")
        messages = [{"role": "system", "content": alfred.get("system_prompt") or ""},
                    {"role": "user", "content": self.draft_prompt(cluster)}]
        try:
            fields = self.protos.service("models").structured(
                str(alfred.get("model_name")), messages, self.draft_schema())
        except ModelError as e:
            self.last_error = f"ALFRED could not draft: {type(e).__name__}: {e}"
            log.warning("philosopher: %s", self.last_error)
            return None, f"ALFRED gave no draft ({type(e).__name__}: {e})"
        return self.check_draft(fields, cluster)

    def _propose(self, d: Draft, cluster: list[DissonanceRecord], trigger: str) -> Amendment | None:
        try:
            a = self.codex.propose(d.persona, d.principle_id, d.text, d.rationale,
                                   origin="philosopher", sources=[r.task_id for r in cluster])
        except CodexError as e:  # rejected before, already pending, no change...
            self._note_skip("refused_by_codex")
            log.info("philosopher: codex refused a %s draft: %s",
                     "templated" if d.templated else "drafted", e)
            return None
        with self._lock:
            self.proposed.append(a.id)
        self.bus.log("info", f"philosopher proposed an amendment to {a.persona}.{a.principle_id}"
                     f" ({trigger}, {len(cluster)} tasks)", part="philosopher",
                     proposal_id=a.id)
        return a

    def _unusable(self, cluster: list[DissonanceRecord], trigger: str, why: str) -> Amendment | None:
        """No usable draft: say so. A template is proposed only if the settings ask, and
        then its rationale says it is one."""
        finding = {"sources": [r.task_id for r in cluster], "reason": why, "trigger": trigger,
                   "evidence": self._evidence_line(cluster), "at": self.clock()}
        with self._lock:
            self.unresolved = (self.unresolved + [finding])[-MAX_UNRESOLVED:]
        self._note_skip("unusable_draft")
        if self.settings.philosopher.template_fallback:
            a = self._propose(self.template_draft(cluster, why), cluster, trigger)
            if a is not None:
                return a
        self.bus.publish("philosopher.no_draft", dict(finding))
        self.bus.log("warning", f"philosopher: {len(cluster)} similar high-dissonance tasks "
                     f"recur, but ALFRED's draft was unusable: {why}. Nothing was proposed; "
                     f"propose an amendment yourself with `a4ps codex propose`.",
                     part="philosopher", sources=finding["sources"])
        return None

    def draft_prompt(self, cluster: list[DissonanceRecord]) -> str:
        ev = []
        for r in cluster[:6]:
            d = f"{r.dissonance:.2f}" if r.dissonance is not None else "?"
            line = f"- task {r.task_id} (dissonance {d}): \"{clip(r.text, 160)}\""
            if r.brick:
                line += f" BRICK: \"{clip(r.brick, 120)}\""
            if r.robin:
                line += f" ROBIN: \"{clip(r.robin, 120)}\""
            ev.append(line)
        codex_lines = [f"{n}.{pid}: {t}" for n, pc in self.codex.personas.items()
                       for pid, t in pc.principles.items()]
        notes = self._reflection_notes(cluster)
        notes_block = ("Reflections so far:\n" + "\n".join(f"- {n}" for n in notes) + "\n\n") \
            if notes else ""
        return ("BRICK (logic) and ROBIN (empathy) keep diverging on similar tasks:\n"
                + "\n".join(ev) + "\n\n" + notes_block
                + "The current codex:\n" + "\n".join(codex_lines) + "\n\n"
                "Draft ONE amendment: change one principle, or add a new one, so that they "
                "converge on such tasks. Give the persona it belongs to, the principle id to "
                "change (or a new snake_case id), the new principle text (one sentence) and "
                "the rationale (one or two sentences).")

    def _reflection_notes(self, cluster: list[DissonanceRecord]) -> list[str]:
        if self.memory is None:
            return []
        try:
            hits = self.memory.search(cluster[0].text, 3, kind="reflection")
        except Exception as e:
            log.debug("philosopher: no reflections for context (%s)", e)
            return []
        return [clip(text_of(h), 200) for h in hits if text_of(h)]

    def _evidence_line(self, cluster: list[DissonanceRecord]) -> str:
        ds = [r.dissonance for r in cluster if r.dissonance is not None]
        mean = f", mean dissonance {sum(ds) / len(ds):.2f}" if ds else ""
        return (f"Evidence: {len(cluster)} similar high-dissonance tasks "
                f"({', '.join(r.task_id for r in cluster)}{mean}).")

    def check_draft(self, fields: dict[str, Any], cluster: list[DissonanceRecord]
                    ) -> tuple[Draft | None, str]:
        """(a usable Draft, "") or (None, what is wrong with ALFRED's draft)."""
        personas = {n.upper(): n for n in self.codex.personas}
        persona = personas.get(re.sub(r"[^A-Za-z]", "", str(fields.get("persona", ""))).upper())
        raw_id = str(fields.get("principle_id", ""))
        principle = _slug(raw_id)
        text = " ".join(str(fields.get("text", "")).split())
        if persona is None:
            return None, f"it names no persona of the codex ({fields.get('persona')!r})"
        if not principle or not re.match(r"^[a-z]", principle):
            return None, f"its principle id {raw_id!r} is not usable"
        if _is_placeholder(text) or _is_placeholder(raw_id):
            return None, "it only echoes the instruction's placeholders"
        if not (4 <= len(text.split()) and len(text) <= MAX_PRINCIPLE_CHARS):
            return None, f"its principle text is too short or too long ({text[:60]!r})"
        current = self.codex.personas[persona].principles.get(principle, "")
        if current.strip() == text:
            return None, f"it repeats {persona}.{principle} unchanged"
        if self.codex.was_rejected(persona, principle, text):
            self._note_skip("rejected_before")
            return None, f"it repeats an amendment you rejected before ({persona}.{principle})"
        why = " ".join(str(fields.get("rationale", "")).split())
        why = "" if _is_placeholder(why) else clip(why, 600)
        rationale = f"{why} {self._evidence_line(cluster)}".strip()
        return Draft(persona, principle, text, rationale, templated=False), ""

    def template_draft(self, cluster: list[DissonanceRecord], why: str) -> Draft:
        """A template built only from the evidence; its rationale says it is one."""
        # keywords shared by at least half the tasks, in the order the first one uses them
        per_text = [set(re.findall(r"[a-z]{3,}", r.text.lower())) - _STOP for r in cluster]
        counts = Counter(w for ws in per_text for w in ws)
        first = [w for w in dict.fromkeys(re.findall(r"[a-z]{3,}", cluster[0].text.lower()))
                 if w not in _STOP]
        top = [w for w in first if counts[w] * 2 >= len(cluster)][:3] or first[:3] or ["recurring"]
        principle = _slug("reconcile_" + "_".join(top[:2]))
        text = (f"When BRICK and ROBIN diverge on questions about {', '.join(top)}, name the "
                "disagreement plainly and weigh logic and care together before answering.")
        rationale = (f"{TEMPLATE_MARK} ALFRED's draft was unusable ({why}). This is not "
                     f"ALFRED's proposal: the text is a generic template built from the "
                     f"evidence; rewrite or reject it. {self._evidence_line(cluster)}")
        return Draft("ALFRED", principle, text, rationale, templated=True)
