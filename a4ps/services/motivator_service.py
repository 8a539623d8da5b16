"""Autotelic motivation: the system sets itself goals when idle, and reflects on dissonance.

Why a service of its own: self-generated work must never crowd out the user. So the
motivator only *queues* tasks (origin ``motivator`` for goals, ``reflection`` for
reflections) at a low priority in the durable TaskQueue, which hands out self-generated
work only while no user task waits; it never runs the graph itself (and a user task
arriving while one runs preempts it: :mod:`a4ps.task_control`). It is bounded by an
on/off switch and a pause (settings, UI), a goals-per-hour rate limit and a daily
budget of self-generated tasks, all kept in a durable :class:`~.ledger.Ledger` so a
restart resets none of them; it skips idle goals while one is still waiting or
running, and never queues the same goal text twice within
``motivator.duplicate_window_s``.

Events in: ``system.idle`` -> ALFRED proposes one goal (grounded in the codex and recent
memories) -> ``goal.generated``; ``dissonance.high`` -> a reflection task asking BRICK
and ROBIN why they diverged; ``task.done`` of a reflection -> its answer stored in
memory (kind ``reflection``), whoever ran the task. Subscribers only enqueue: the model
call and the queue/memory writes happen on the motivator's own thread.

:class:`IdleWatch` is the small clock the daemon's worker ticks to publish
``system.idle``.
"""
from __future__ import annotations

import collections
import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..fine_tuning.keys import content_key
from .ledger import Ledger
from .service_thread import ServiceThread

if TYPE_CHECKING:
    from ..codex import Codex
    from ..config import Settings
    from ..events import Event, EventBus
    from ..memory import MemoryStore
    from ..proto import ProtoManager
    from ..tasks import TaskQueue

log = logging.getLogger(__name__)

GOAL_ORIGIN = "motivator"
REFLECTION_ORIGIN = "reflection"
SELF_ORIGINS = (GOAL_ORIGIN, REFLECTION_ORIGIN)
HOUR = 3600.0
DAY = 86400.0
MAX_GOAL_CHARS = 300
# short generations: while ALFRED drafts, the single resident model is busy, and a user
# task that arrives meanwhile waits for it
GOAL_MAX_TOKENS = 64
_RECENT_MEMORIES = 5


def text_of(record: Any) -> str:
    """The text of a memory record, whether a dict or an object."""
    if isinstance(record, dict):
        return str(record.get("text") or "")
    return str(getattr(record, "text", "") or "")


def clip(text: Any, n: int) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= n else s[: n - 1].rstrip() + "…"


# -- idle detection ---------------------------------------------------------------------

class IdleWatch:
    """Publishes ``system.idle {idle_s}`` when no task ran for ``idle_after_s``.

    The daemon's worker calls :meth:`touch` when it runs a task (task events on the bus
    also count as activity) and :meth:`tick` whenever it waits. While the system stays
    idle the event repeats once per ``idle_after_s``; the motivator's rate limits decide
    what, if anything, to do about it.
    """

    _ACTIVITY = ("task.queued", "task.step", "task.done", "task.failed", "task.cancelled")

    def __init__(self, bus: EventBus, idle_after_s: float,
                 clock: Callable[[], float] = time.monotonic, *, watch_tasks: bool = True) -> None:
        if idle_after_s <= 0:
            raise ValueError(f"idle_after_s must be > 0, got {idle_after_s}")
        self.bus = bus
        self.idle_after_s = float(idle_after_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._last_activity = clock()
        self._last_published: float | None = None
        self._unsubs = [bus.subscribe(t, self._on_activity) for t in self._ACTIVITY] \
            if watch_tasks else []

    def _on_activity(self, _event: Event) -> None:
        self.touch()

    def touch(self) -> None:
        """Something ran: restart the idle clock."""
        with self._lock:
            self._last_activity = self.clock()
            self._last_published = None

    @property
    def idle_s(self) -> float:
        with self._lock:
            return self.clock() - self._last_activity

    def tick(self) -> bool:
        """Publish ``system.idle`` if it is due; True when it published."""
        with self._lock:
            now = self.clock()
            idle = now - self._last_activity
            if idle < self.idle_after_s:
                return False
            if self._last_published is not None and now - self._last_published < self.idle_after_s:
                return False
            self._last_published = now
        self.bus.publish("system.idle", {"idle_s": round(idle, 3)})
        return True

    def close(self) -> None:
        for unsub in self._unsubs:
            unsub()
        self._unsubs = []


# -- goal text ----------------------------------------------------------------------------

_GOAL_PREFIX = re.compile(r"^\s*(?:[-*#>\d.)\s]+)?\**\s*(?:goal|new goal|proposed goal|task)\s*\**\s*[:\-–]\s*",
                          re.IGNORECASE)
_PLACEHOLDER = re.compile(r"<[^>]*>|\bone sentence\b", re.IGNORECASE)


GOAL_INSTRUCTION = ("Propose ONE concrete goal for the team to work on now: something to "
                    "explore, practise or consolidate, grounded in our principles and recent "
                    "memories.")
_FILLER = set("the a an to of and or in on for our is be we this that it as with".split())


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]{3,}", text.lower()) if w not in _FILLER}


def is_echo(goal: str, instruction: str = GOAL_INSTRUCTION, threshold: float = 0.6) -> bool:
    """True when most of the goal's words come from the instruction (a tiny model's
    favourite non-answer: "The goal is to explore, practise and consolidate...")."""
    words = _content_words(goal)
    if not words:
        return True
    return len(words & _content_words(instruction)) / len(words) >= threshold


def parse_goal(reply: Any) -> str | None:
    """The goal in a model's reply, or None when there is no usable one.

    Prefers a ``GOAL:`` line; otherwise the first substantial line. Strips bullets,
    markdown and quotes, keeps the first two sentences, caps the length. A reply that
    only echoes the instruction, or is too short to be a goal, gives None.
    """
    if not isinstance(reply, str) or not reply.strip():
        return None
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    chosen = next((ln for ln in lines if _GOAL_PREFIX.match(ln)), None)
    if chosen is None:
        chosen = next((ln for ln in lines if len(ln.split()) >= 4), lines[0])
    goal = _GOAL_PREFIX.sub("", chosen)
    goal = re.sub(r"^(?:\s*(?:[-*#>]+|\d+[.)]))+\s*", "", goal).strip().strip("*_`\"'“”").strip()
    sentences = re.split(r"(?<=[.!?])\s+", goal)
    goal = " ".join(sentences[:2]).strip()
    if _PLACEHOLDER.search(goal) or len(goal.split()) < 4 or not re.search(r"[A-Za-z]", goal):
        return None
    if is_echo(goal):
        return None
    return clip(goal, MAX_GOAL_CHARS)


# -- the motivator --------------------------------------------------------------------------

class Motivator:
    """Self-generated goals (on idle) and reflections (on high dissonance), rate-limited."""

    def __init__(self, settings: Settings, bus: EventBus, protos: ProtoManager,
                 memory: MemoryStore, tasks: TaskQueue, codex: Codex,
                 clock: Callable[[], float] = time.time, *,
                 ledger: Ledger | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.protos = protos
        self.memory = memory
        self.tasks = tasks
        self.codex = codex
        self.clock = clock
        # durable limits: the counters, the reflected-on tasks and the pause survive a
        # restart (an in-memory ledger when none is given, as in unit tests)
        self.ledger = ledger if ledger is not None else Ledger()
        self._lock = threading.Lock()
        now = clock()
        # the config pauses it at every start; otherwise the last pause/resume holds
        self._paused = bool(settings.motivator.paused) or bool(self.ledger.get_flag("paused", False))
        self._goal_times: collections.deque[float] = collections.deque(
            self.ledger.times("goal", now - HOUR))
        self._self_times: collections.deque[float] = collections.deque(sorted(
            self.ledger.times("goal", now - DAY) + self.ledger.times("reflection", now - DAY)))
        self._reflected: set[str] = self.ledger.refs("reflection")   # task ids reflected on
        self._stored: set[str] = set()         # reflection task ids already stored
        self._idle_waiting = False             # one idle job in the queue at most
        self.skipped: collections.Counter[str] = collections.Counter()
        self.goals_generated = 0
        self.reflections_queued = 0
        self.reflections_stored = 0
        self.last_goal: dict[str, Any] | None = None
        self._thread = ServiceThread("a4ps-motivator")
        self._unsubs: list[Callable[[], None]] = []

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> Motivator:
        if self._unsubs:
            return self
        self._thread.start()
        self._unsubs = [self.bus.subscribe("system.idle", self._on_idle),
                        self.bus.subscribe("dissonance.high", self._on_dissonance),
                        self.bus.subscribe("task.done", self._on_task_done)]
        return self

    def stop(self) -> None:
        for unsub in self._unsubs:
            unsub()
        self._unsubs = []
        self._thread.stop()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait for the work already received (tests, shutdown)."""
        return self._thread.flush(timeout)

    # -- switches ------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.settings.motivator.enabled)

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop generating work; queued self-generated tasks wait (see allow_self_generated)."""
        self._set_paused(True)

    def resume(self) -> None:
        self._set_paused(False)

    def set_paused(self, paused: bool) -> None:
        self._set_paused(bool(paused))

    def _set_paused(self, paused: bool) -> None:
        with self._lock:
            changed = self._paused != paused
            self._paused = paused
            self.ledger.set_flag("paused", paused)     # survives a restart
        if changed:
            self.bus.log("info", f"motivator {'paused' if paused else 'resumed'}",
                         part="motivator", paused=paused)

    @property
    def allow_self_generated(self) -> bool:
        """Whether the worker may claim self-generated tasks now (pass to TaskQueue.claim)."""
        return self.enabled and not self._paused

    def status(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            self._expire(now)
            s = self.settings.motivator
            return {
                "enabled": self.enabled, "paused": self._paused,
                "goals_last_hour": len(self._goal_times), "goals_per_hour": s.goals_per_hour,
                "self_tasks_today": len(self._self_times), "daily_budget": s.daily_budget,
                "goals_generated": self.goals_generated,
                "reflections_queued": self.reflections_queued,
                "reflections_stored": self.reflections_stored,
                "last_goal": dict(self.last_goal) if self.last_goal else None,
                "durable": self.ledger.path is not None,
                "skipped": dict(self.skipped),
                "working": self._thread.pending(),
            }

    # -- budget ----------------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        while self._goal_times and now - self._goal_times[0] >= HOUR:
            self._goal_times.popleft()
        while self._self_times and now - self._self_times[0] >= DAY:
            self._self_times.popleft()

    def _refusal(self, kind: str) -> str | None:
        """Why new self-generated work of ``kind`` may not be queued now, or None."""
        if not self.enabled:
            return "disabled"
        if self._paused:
            return "paused"
        s = self.settings.motivator
        with self._lock:
            self._expire(self.clock())
            if len(self._self_times) >= s.daily_budget:
                return "daily_budget"
            if kind == "goal" and len(self._goal_times) >= s.goals_per_hour:
                return "rate_limit"
        return None

    def _spend(self, kind: str, ref: str | None = None) -> None:
        with self._lock:
            now = self.clock()
            self._self_times.append(now)
            if kind == "goal":
                self._goal_times.append(now)
            self.ledger.record(kind, now, ref)
            self.ledger.prune(kind, now - 2 * DAY)

    def _skip(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] += 1
        log.debug("motivator skipped: %s", reason)

    # -- subscribers (publisher's thread: enqueue only) ----------------------------------------
    def _on_idle(self, event: Event) -> None:
        with self._lock:
            if self._idle_waiting:   # a burst of idle events makes one job
                self.skipped["coalesced"] += 1
                return
            self._idle_waiting = True
        self._thread.submit(lambda: self._idle_job(event.payload))

    def _on_dissonance(self, event: Event) -> None:
        self._thread.submit(lambda: self.reflect(event.payload))

    def _on_task_done(self, event: Event) -> None:
        p = event.payload
        origin = p.get("origin")
        meta = p.get("meta") or {}
        if origin == REFLECTION_ORIGIN or meta.get("kind") == "reflection":
            self._thread.submit(lambda: self.store_reflection(p))

    def _idle_job(self, payload: dict[str, Any]) -> None:
        with self._lock:
            self._idle_waiting = False
        self.generate_goal(trigger="idle", idle_s=payload.get("idle_s"))

    # -- goals ----------------------------------------------------------------------------------
    def generate_goal(self, *, trigger: str = "idle", idle_s: float | None = None) -> Any:
        """Ask ALFRED for one goal and queue it; returns the Task or None (and why in status)."""
        reason = self._refusal("goal")
        if reason is None and self.tasks.pending_count(origin="user"):
            reason = "user_tasks_waiting"
        if reason is None and self.tasks.pending_count(origin=GOAL_ORIGIN):
            reason = "goal_already_queued"
        if reason is None and any(t.origin == GOAL_ORIGIN for t in self.tasks.running()):
            reason = "goal_running"
        if reason is not None:
            self._skip(reason)
            return None
        self._spend("goal")  # reserve before the (slow) model call
        memories = self._recent_memories()
        prompt = self.goal_prompt(memories)
        reply, source = None, "alfred"
        try:
            reply = self.protos.get("ALFRED").invoke_llm(prompt, max_tokens=GOAL_MAX_TOKENS)
        except Exception as e:  # model unavailable: a templated goal still helps
            log.warning("motivator: ALFRED could not propose a goal (%s); using a template", e)
        goal = parse_goal(reply)
        if goal is None:
            goal, source = self.template_goal(memories), "template"
        if self.is_duplicate(goal):
            self._skip("duplicate_goal")
            log.info("motivator: not queueing %r again within %.0fs", goal,
                     self.settings.motivator.duplicate_window_s)
            return None
        self.ledger.record("goal_text", self.clock(), content_key(goal))
        task = self.tasks.submit(goal, origin=GOAL_ORIGIN, meta={
            "kind": "goal", "trigger": trigger, "idle_s": idle_s, "source": source,
            "codex_version": self.codex.version,
            "memories": [clip(text_of(m), 120) for m in memories]})
        with self._lock:
            self.goals_generated += 1
            self.last_goal = {"task_id": task.id, "goal": goal, "at": self.clock(), "source": source}
        self.bus.publish("goal.generated", {"task_id": task.id, "goal": goal, "trigger": trigger,
                                            "source": source, "priority": task.priority})
        return task

    def is_duplicate(self, goal: str) -> bool:
        """The same goal text (case, spacing, punctuation aside) is queued or running
        now, or was queued within ``motivator.duplicate_window_s``."""
        key = content_key(goal)
        window = float(self.settings.motivator.duplicate_window_s)
        if key in self.ledger.refs("goal_text", since=self.clock() - window):
            return True
        live = self.tasks.list(status=("queued", "running"), limit=200)
        return any(t.origin == GOAL_ORIGIN and content_key(t.text) == key for t in live)

    def _recent_memories(self) -> list[Any]:
        if self.memory is None:
            return []
        try:
            return list(self.memory.recent(_RECENT_MEMORIES))
        except Exception as e:
            log.warning("motivator: cannot read recent memories (%s)", e)
            return []

    def goal_prompt(self, memories: list[Any]) -> str:
        principles = []
        for name, pc in self.codex.personas.items():
            for pid, text in pc.principles.items():
                principles.append(f"- {name}.{pid}: {text}")
        mem = "\n".join(f"- {clip(text_of(m), 200)}" for m in memories) or "- (nothing yet)"
        return (f"The system is idle. {GOAL_INSTRUCTION}\n\n"
                f"Principles:\n{chr(10).join(principles)}\n\n"
                f"Recent memories:\n{mem}\n\n"
                "Answer with one line:\nGOAL: <the goal, one sentence>")

    def template_goal(self, memories: list[Any]) -> str:
        """A clear goal built without the model (it answered nothing usable)."""
        for m in memories:
            t = clip(text_of(m), 120)
            if t:
                return f"Consolidate what we learned from this recent exchange: \"{t}\""
        pcs = [(n, pid, txt) for n, pc in self.codex.personas.items()
               for pid, txt in pc.principles.items()]
        if pcs:
            n, pid, txt = pcs[self.goals_generated % len(pcs)]
            return f"Practise {n}'s principle '{pid}' on a small example: {txt}"
        return "Review recent work and note one thing to do better next time."

    # -- reflections ------------------------------------------------------------------------------
    def reflect(self, payload: dict[str, Any]) -> Any:
        """Queue a reflection task on a high-dissonance task; returns the Task or None."""
        about = str(payload.get("task_id") or "")
        if not about:
            self._skip("dissonance_without_task_id")
            return None
        origin = payload.get("origin")
        if origin is None:
            try:
                origin = self.tasks.get(about).origin
            except Exception:
                origin = None
        if origin == REFLECTION_ORIGIN:  # a reflection on a reflection would loop
            self._skip("reflection_on_reflection")
            return None
        with self._lock:
            if about in self._reflected:
                self.skipped["already_reflected"] += 1
                return None
        reason = self._refusal("reflection")
        if reason is not None:
            self._skip(reason)
            return None
        with self._lock:
            self._reflected.add(about)
        self._spend("reflection", about)
        brick, robin = payload.get("brick") or "", payload.get("robin") or ""
        d = payload.get("dissonance")
        text = self.reflection_text(payload.get("text") or "", brick, robin, d)
        task = self.tasks.submit(text, origin=REFLECTION_ORIGIN, meta={
            "kind": "reflection", "about_task_id": about, "brick": clip(brick, 2000),
            "robin": clip(robin, 2000), "dissonance": d,
            "about_text": clip(payload.get("text") or "", 500)})
        with self._lock:
            self.reflections_queued += 1
        return task

    @staticmethod
    def reflection_text(text: str, brick: str, robin: str, dissonance: Any) -> str:
        d = f" (dissonance {float(dissonance):.2f})" if isinstance(dissonance, (int, float)) else ""
        parts = [f"Reflect on an earlier task where BRICK and ROBIN diverged{d}.",
                 f"The task was: \"{clip(text, 400) or '(unknown)'}\"."]
        if brick:
            parts.append(f"BRICK answered: \"{clip(brick, 400)}\".")
        if robin:
            parts.append(f"ROBIN answered: \"{clip(robin, 400)}\".")
        parts.append("BRICK and ROBIN: examine why your answers diverged, what each of you "
                     "missed, and how you would reconcile them next time.")
        return " ".join(parts)

    def store_reflection(self, payload: dict[str, Any]) -> str | None:
        """Store a finished reflection task's answer in memory as a note; returns its id."""
        task_id = str(payload.get("task_id") or "")
        with self._lock:
            if not task_id or task_id in self._stored:
                return None
            self._stored.add(task_id)
        meta = dict(payload.get("meta") or {})
        answer = payload.get("answer")
        if not answer:
            result = payload.get("result") or {}
            answer = result.get("answer") if isinstance(result, dict) else None
        if not answer and task_id:
            try:
                t = self.tasks.get(task_id)
                meta = meta or dict(t.meta)
                answer = (t.result or {}).get("answer")
            except Exception:
                pass
        if not answer or not str(answer).strip():
            self._skip("empty_reflection")
            return None
        about = meta.get("about_task_id")
        about_text = meta.get("about_text") or ""
        head = f"Reflection on task {about}" if about else "Reflection"
        if about_text:
            head += f" (\"{clip(about_text, 160)}\")"
        note = f"{head}: {str(answer).strip()}"
        mem_id: str = self.memory.add(note, kind="reflection", persona="ALFRED", task_id=task_id,
                                      dissonance=meta.get("dissonance") or 0.0,
                                      meta={"about_task_id": about, "reflection_task_id": task_id,
                                            "note": True})
        with self._lock:
            self.reflections_stored += 1
        return mem_id
