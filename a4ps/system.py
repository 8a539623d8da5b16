"""System: builds and owns every part from Settings, and starts/stops them in order.

There are no module-level singletons: a test builds ``System(settings)`` on a temp
data directory, a daemon builds one for real. Construction is cheap (models load on
first use); ``start()`` loads the living image (or seeds the personas from the codex)
and starts the background threads; ``stop()`` stops them and saves the image.

Lifecycle: CREATED -> STARTED -> STOPPED. Calling out of order raises SystemStateError
naming the next step.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .codex import Codex
from .cognition import generation
from .config import CODEX_PATH as CODEX_PATH  # re-exported: tests and services read it here
from .config import PERSONAS, Settings, redact_url
from .events import Event, EventBus
from .image import ImageStore, LoadInfo, SaveRetry
from .lock import DataLock
from .proto import MethodWatchdog, ProtoManager
from .snapshots import TaskGate, TimeMachine
from .cognition.graph import CognitiveGraph
from .fine_tuning.unsloth_forge import PersonaFinetuner
from .memory import MemoryManager
from .models.embeddings import make_embedder
from .models.manager import ModelManager
from .persona_file import PersonaFiles
from .services.curator_service import Curator
from .services.motivator_service import Motivator
from .services.philosopher import Philosopher
from .task_queues import open_task_queue
from .tools.registry import ToolRegistry
from .tools.sandbox import make_sandbox
from .tools.tool_forge import ToolForge, build_prompt
from .cognition.state import TaskCancelled
from .services.ledger import Ledger
from .task_control import finish_stopped
from .tools.seed_tools import seed

if TYPE_CHECKING:
    from .models.base import ChatBackend
    from .models.embeddings import Embedder
    from .tasks import Task
    from .tools.sandbox import SandboxRunner

log = logging.getLogger(__name__)


# The live method every persona inherits from the "persona" proto. Kept as source so
# it can be edited in the inspector while the system runs.
INVOKE_LLM = '''\
def invoke_llm(self, prompt, full=False, **kw):
    """Ask this persona's model; prompt is text or a list of chat messages.
    Returns the reply text, or with full=True the whole Generation (tokens, finish)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not messages or messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": self.system_prompt})
    kw.setdefault("temperature", self.temperature)
    out = self.service("models").generate(self.model_name, messages, **kw)
    return out if full else out.text
'''

# What a persona is doing is not stored in the image: the UI derives it from the task
# events (one source of truth). Images written before kept a never-updated "status"
# slot, dropped on load. Morph positions are the UI's to choose until the user drags.
RETIRED_PERSONA_SLOTS = ("status",)


class SystemState(enum.Enum):
    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"


class SystemStateError(RuntimeError):
    pass


class System:
    """Owns: bus, protos, image, codex, models, memory, tasks, tools, forge, graph,
    curator, motivator, philosopher. Parts get what they need passed in explicitly."""

    def __init__(self, settings: Settings, *, chat_backend: ChatBackend | None = None,
                 embedder: Embedder | None = None, sandbox: SandboxRunner | None = None,
                 lock: DataLock | None = None) -> None:
        self.settings = settings
        self.state = SystemState.CREATED
        self.started_at: float | None = None
        self.last_load: LoadInfo | None = None
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # the one-writer lock on the data directory: taken in start() unless the
        # caller (the daemon, an offline CLI command) already holds it and passes it
        self.lock = lock or DataLock.for_data_dir(settings.data_dir)
        self._owns_lock = False

        self.bus = EventBus()
        ps = settings.protos
        self.protos = ProtoManager(
            self.bus, max_slot_bytes=ps.max_slot_bytes, max_slot_depth=ps.max_slot_depth,
            method_history=ps.method_history,
            watchdog=MethodWatchdog(ps.method_budget_s, ps.method_wall_budget_s))
        self.image = ImageStore.from_settings(settings, lock=self.lock)
        self.codex = Codex.from_toml(CODEX_PATH, self.bus)
        self.task_gate = TaskGate()
        self.timemachine = TimeMachine(self.image, self.bus, live_parts=self.image_parts,
                                       save=self.save, apply=self.restore_parts,
                                       gate=self.task_gate,
                                       wait_s=settings.image.restore_wait_s)
        self._codex_changes = 0        # codex events seen; _codex_saved: covered by a save
        self._codex_saved = 0
        self._save_retry = SaveRetry()
        self.unsaved_at_stop: str | None = None

        self.embedder = embedder or make_embedder(settings)
        # no chat_backend: the manager builds the one settings.models.backend names
        self.models = ModelManager(settings, self.bus, backend=chat_backend, embedder=self.embedder)

        self.memory = MemoryManager(settings, self.embedder, bus=self.bus)
        self.tasks = open_task_queue(settings, bus=self.bus)

        self.sandbox = sandbox or make_sandbox(settings)
        self.tools = ToolRegistry(self.protos, settings, self.bus, embedder=self.embedder,
                                  sandbox=self.sandbox)
        self.forge = ToolForge(self.tools, self.sandbox, self._brick_writes_tool, settings, self.bus)

        self.graph = CognitiveGraph(self.protos, self.models, self.memory, self.bus, settings,
                                    forge=self.forge, registry=self.tools)

        self.finetuner = PersonaFinetuner(settings, self.bus, self.protos, self.models)
        self.curator = Curator(settings, self.bus, self.protos, self.memory, finetuner=self.finetuner,
                               embedder=self.embedder)
        self.ledger = Ledger(settings.data_dir / "motivator.sqlite")   # durable limits, pause
        self.motivator = Motivator(settings, self.bus, self.protos, self.memory, self.tasks,
                                   self.codex, ledger=self.ledger)
        self.philosopher = Philosopher(settings, self.bus, self.protos, self.memory, self.codex,
                                       self.embedder)
        self.personas = PersonaFiles(settings, self.protos, self.codex, self.memory, self.models,
                                     self.embedder, self.bus, save=self.save)

        for name, part in (("models", self.models), ("memory", self.memory), ("bus", self.bus),
                           ("tasks", self.tasks), ("tools", self.tools), ("codex", self.codex)):
            self.protos.provide(name, part)

        self.bus.subscribe("codex.decided", self._on_codex_decided)
        self.bus.subscribe("codex.proposed", self._mark_codex_dirty)
        # a snapshot to go back to before every model swap and codex amendment
        self.bus.subscribe("model.swapping", lambda e: self._checkpoint("pre-swap"))
        self.bus.subscribe("codex.approving", lambda e: self._checkpoint("pre-amendment"))
        self._stop = threading.Event()
        self._autosave: threading.Thread | None = None
        self._save_lock = threading.Lock()
        self._graph_shape: dict[str, Any] | None = None

    # -- the tool forge's writer: BRICK ---------------------------------------------
    def _brick_writes_tool(self, spec: Any, feedback: str | None) -> str:
        return str(self.protos.get("BRICK").invoke_llm(
            build_prompt(spec, feedback, allowed_imports=self.forge.allowed_imports)))

    # -- lifecycle ------------------------------------------------------------------
    def start(self, *, services: bool = True, lock: DataLock | None = None,
              skip_newer_image: bool = False) -> System:
        """Take the data directory's lock, load the image (or seed it), then start
        autosave and the service threads. Raises :class:`a4ps.lock.DataLockHeld`
        naming the holder when another process (e.g. the daemon) writes this image.
        ``skip_newer_image``: start from the newest image this A4PS can read even if a
        newer A4PS wrote a later one (``--from-snapshot``; the newer one is kept)."""
        if self.state is not SystemState.CREATED:
            raise SystemStateError(f"System.start() needs a new System; this one is {self.state.value}")
        if lock is not None:
            self.lock = self.image.lock = lock
        if not self.lock.held:
            self.lock.acquire()
            self._owns_lock = True
        try:
            self._load_or_seed(skip_newer_image)
            if self.graph.checkpointer_url is not None:
                self.graph.graph    # a shared checkpoint store that cannot be used: fail now
        except BaseException:
            self._release_lock()
            raise
        self.state = SystemState.STARTED
        self.started_at = time.time()
        self.memory.maintain_in_background()
        self._autosave = threading.Thread(target=self._autosave_loop, name="a4ps-autosave", daemon=True)
        self._autosave.start()
        if services:
            self.start_services()
        return self

    def _load_or_seed(self, skip_newer: bool = False) -> None:
        self.image.sweep_temp()
        loaded = self.image.load(skip_newer=skip_newer)
        if loaded is None:
            log.info("no image in %s: seeding personas from %s", self.settings.data_dir, CODEX_PATH)
            self._ensure_personas()
            self._seed_tools()
            self.save()
            return
        parts, self.last_load = loaded
        self.protos.restore_image(parts["protos"])
        if "codex" in parts:
            self.codex.restore_image(parts["codex"])
        self._codex_saved = self._codex_changes
        self.image.remember(self.image_parts())   # an unchanged image is not written again
        self._ensure_personas()
        self._seed_tools()
        self.tools.sync_files()  # <data>/tools/ mirrors the image's tools
        log.info("loaded image %s (%d protos, codex v%d)", self.last_load.path,
                 len(self.protos), self.codex.version)

    def _release_lock(self) -> None:
        if self._owns_lock:
            self.lock.release()
            self._owns_lock = False

    def start_services(self) -> None:
        s = self.settings
        if s.curator.enabled:
            self.curator.start()
        if s.motivator.enabled:
            self.motivator.start()
        if s.philosopher.enabled:
            self.philosopher.start()

    def stop(self) -> None:
        """Stop the threads and save the image. Safe to call twice."""
        if self.state is SystemState.STOPPED:
            return
        if self.state is SystemState.CREATED:
            self.state = SystemState.STOPPED
            return
        self._stop.set()
        for part in (self.philosopher, self.motivator, self.curator):
            try:
                part.stop()
            except Exception:
                log.exception("stopping %s failed", type(part).__name__)
        if self._autosave is not None:
            self._autosave.join(timeout=5)
        self._final_save()
        for close in (self.graph.close, self.memory.close, self.tasks.close, self.ledger.close):
            try:
                close()
            except Exception:
                log.exception("closing %s failed", close)
        self._release_lock()
        self.state = SystemState.STOPPED

    def __enter__(self) -> System:
        return self.start() if self.state is SystemState.CREATED else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- image ------------------------------------------------------------------------
    def image_parts(self) -> dict[str, Any]:
        return {"protos": self.protos.image_state(), "codex": self.codex.image_state()}

    def save(self, *, trigger: str = "manual", name: str | None = None, keep: bool = False,
             note: str | None = None) -> dict[str, Any]:
        """Write the image now; ``keep`` also pins it as a snapshot the ring never prunes
        (then ``id`` is the pinned snapshot's id). The changes stay marked unsaved until
        the write has succeeded; a failure raises, is published as ``image.save_failed``
        and shows in ``status()["image"]["save_error"]``, and autosave retries it with
        backoff."""
        with self._save_lock:
            proto_mark, codex_mark = self.protos.change_mark, self._codex_changes
            try:
                info = self.image.save(self.image_parts(), trigger=trigger, name=name, note=note)
            except Exception as e:
                failure = self._save_retry.failed(e, self.image.path.parent)
                log.error("saving the image failed (attempt %d): %s; %s; retrying in %g s",
                          failure.attempts, failure.error, failure.hint, failure.retry_in_s)
                self.bus.publish("image.save_failed", {
                    "error": failure.error, "hint": failure.hint, "attempts": failure.attempts,
                    "retry_in_s": failure.retry_in_s})
                raise
            self.protos.mark_clean(proto_mark)
            self._codex_saved = codex_mark
            ended = self._save_retry.succeeded()
            ident = self.image.keep(trigger, name)["id"] if keep else info.id
        if ended is not None:
            log.warning("the image is saved again after %d failed attempt(s)", ended.attempts)
            self.bus.publish("image.save_recovered", {
                "attempts": ended.attempts, "path": str(info.path), "bytes": info.bytes,
                "failing_for_s": round(time.time() - ended.first_failed_at, 3)})
        return {"path": str(info.path), "bytes": info.bytes, "at": info.at,
                "seconds": round(info.serialize_s + info.write_s, 4), "written": info.written,
                "id": ident}

    def _final_save(self, retry_for_s: float = 5.0) -> None:
        """The save at stop: retried briefly (a full disk may be freed meanwhile), then
        reported loudly rather than raised, so the rest of the shutdown still runs."""
        deadline = time.monotonic() + retry_for_s
        while True:
            try:
                self.save(trigger="shutdown")
                self.unsaved_at_stop = None
                return
            except Exception as e:
                if time.monotonic() >= deadline:
                    self.unsaved_at_stop = f"{type(e).__name__}: {e}"
                    log.error("the image could NOT be saved at shutdown (%s); the last image "
                              "on disk is %s", self.unsaved_at_stop,
                              self.image.last_save.at if self.image.last_save else "the one loaded")
                    return
            while time.monotonic() < deadline and not self._save_retry.due(self.image):
                time.sleep(0.1)

    def restore_parts(self, parts: dict[str, Any]) -> None:
        """Make ``parts`` (a checked image) the live protos and codex, all or nothing."""
        before = self.image_parts()
        try:
            self.protos.restore_image(parts["protos"])
            if "codex" in parts:
                self.codex.restore_image(parts["codex"])
            self._ensure_personas()
        except Exception:
            self.protos.restore_image(before["protos"])
            self.codex.restore_image(before["codex"])
            raise
        self._codex_changes += 1   # the restored state is not the image on disk yet
        try:
            self.tools.sync_files()
        except Exception:       # the mirror is for reading; the image is the truth
            log.exception("mirroring the restored tools failed")

    def _checkpoint(self, trigger: str) -> None:
        if self.state is not SystemState.STARTED:
            return
        try:
            sid = self.timemachine.checkpoint(trigger)
            log.info("%s snapshot %s", trigger, sid)
        except Exception:
            log.exception("could not take the %s snapshot", trigger)

    @property
    def dirty(self) -> bool:
        return self.protos.dirty or self._codex_changes != self._codex_saved

    def _autosave_loop(self) -> None:
        """Save every ``image.autosave_interval_s`` when something changed; while a
        save is failing, retry on :class:`SaveRetry`'s schedule instead."""
        interval = self.settings.image.autosave_interval_s
        next_at = time.monotonic() + interval
        while True:
            failing = self._save_retry.failure is not None
            wait = 0.25 if failing else max(0.0, min(next_at - time.monotonic(), interval))
            if self._stop.wait(wait):
                return
            if failing:
                if not self._save_retry.due(self.image):
                    continue
            elif time.monotonic() < next_at:
                continue
            next_at = time.monotonic() + interval
            if self.dirty or failing:
                try:
                    self.save(trigger="autosave")
                except Exception:
                    pass   # logged, published and scheduled for retry by save()

    def _mark_codex_dirty(self, _event: Event) -> None:
        self._codex_changes += 1

    # -- personas -----------------------------------------------------------------------
    def _ensure_personas(self) -> None:
        """Every codex persona has a proto whose prompt and model match the settings.

        Seeds a fresh image, and repairs a loaded one (new codex personas, a backend
        switched in settings, slots the image no longer keeps: RETIRED_PERSONA_SLOTS)."""
        if "persona" not in self.protos:
            self.protos.create("persona", {"temperature": 0.7,
                                           "last_utterance": "", "dissonance": None},
                               methods={"invoke_llm": INVOKE_LLM})
        elif not isinstance(self.protos.get("persona").get("temperature"), (int, float)):
            self.protos.update("persona", {"temperature": 0.7})
        if "tool" not in self.protos:
            self.protos.create("tool", {"kind": "tool"})
        backend = self.settings.models.backend
        for name in self.codex.personas:
            pc = self.codex.persona(name)
            model = self.settings.models.persona_model(name) if name in PERSONAS else \
                self.settings.models.persona_model("ALFRED")
            if name not in self.protos:
                self.protos.clone("persona", name, role=pc.role, model_name=model,
                                  model_backend=backend, system_prompt=self.codex.system_prompt(name),
                                  model_lineage=[], **generation.defaults_for(name))
                continue
            proto = self.protos.get(name)
            # generation slots an older image lacks (an edited one is kept)
            changes: dict[str, Any] = {k: v for k, v in generation.defaults_for(name).items()
                                       if k not in proto.own_slots()}
            if proto.get("model_backend") != backend:
                # the user switched backends in settings: follow them
                changes.update(model_name=model, model_backend=backend)
            prompt = self.codex.system_prompt(name)
            if proto.get("system_prompt") != prompt:
                changes["system_prompt"] = prompt
            # an image from before the slot checks may lack what every turn needs
            if not isinstance(proto.get("role"), str) or not proto.get("role"):
                changes["role"] = pc.role
            if not isinstance(proto.get("model_name"), str) or not proto.get("model_name"):
                changes.update(model_name=model, model_backend=backend)
            retired = [k for k in RETIRED_PERSONA_SLOTS if k in proto.own_slots()]
            if changes or retired:
                self.protos.update(name, changes, delete=retired)
        persona = self.protos.get("persona")
        if "status" in persona.own_slots():
            self.protos.update("persona", delete=["status"])

    def _seed_tools(self) -> None:
        """The vetted seed tools (a4ps/tools/seed_tools.py) an image has never had."""
        if not self.settings.forge.seed_tools:
            return
        try:
            seed(self.tools)
        except Exception:      # a start never fails over a convenience
            log.exception("seeding the tools failed; the forge still works")

    def _on_codex_decided(self, event: Event) -> None:
        self._codex_changes += 1
        if event.payload.get("approved"):
            persona = event.payload.get("persona")
            if isinstance(persona, str) and persona in self.protos:
                self.protos.update(persona, {"system_prompt": self.codex.system_prompt(persona)})

    # -- tasks ------------------------------------------------------------------------------
    def run_task(self, task: Task, cancel: Any = None) -> dict[str, Any] | None:
        """Run one claimed task through the graph and record the outcome in the queue.
        A restore waits for it to finish (the task runs on one state, never two).

        The task's origin goes into the graph's meta, so its memory row says whether a
        user or the system itself asked (the curator trains only on what users asked).
        ``cancel``: a token (:class:`~a4ps.task_control.TaskStop` or ``threading.Event``);
        once set the run stops at the next node boundary (or inside the generation) and
        the task ends ``cancelled``, or is re-queued if the token says so (preemption).
        """
        with self.task_gate.task(f"task {task.id}"):
            return self._run_task(task, cancel)

    def _run_task(self, task: Task, cancel: Any = None) -> dict[str, Any] | None:
        meta = {**task.meta, "origin": task.origin}
        try:    # the checkpoint store too: a task must never be left running on error
            resume = self.graph.has_checkpoint(task.id)
            result = self.graph.run(task.id, task.text, resume=resume, meta=meta, cancel=cancel)
        except TaskCancelled as e:
            log.info("task %s stopped: %s", task.id, e)
            finish_stopped(self.tasks, self.bus, task, cancel if hasattr(cancel, "kind") else None,
                           node=e.node)
            return None
        except Exception as e:  # a task's failure must never take the worker down
            log.exception("task %s failed", task.id)
            self.tasks.fail(task.id, f"{type(e).__name__}: {e}")
            self.bus.publish("task.failed", {"task_id": task.id, "origin": task.origin,
                                             "error": f"{type(e).__name__}: {e}"})
            return None
        if result.get("error"):
            self.tasks.fail(task.id, result["error"])
            self.bus.publish("task.failed", {"task_id": task.id, "origin": task.origin,
                                             "error": result["error"], "result": result})
            return result
        self.tasks.finish(task.id, result)
        self.bus.publish("task.done", {"task_id": task.id, "origin": task.origin, "text": task.text,
                                       "meta": task.meta, "answer": result.get("answer", ""),
                                       "result": result})
        return result

    # -- views for the wire ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        last = self.image.last_save
        forge_off = self.forge.disabled_reason
        return {
            "state": self.state.value,
            "started_at": self.started_at,
            "data_dir": str(self.settings.data_dir),
            "backend": self.settings.models.backend,
            "stores": self.stores(),
            "models": self.models.stats(),
            "queue": {"pending": self.tasks.pending_count(),
                      "running": [t.id for t in self.tasks.list(status="running")]},
            "last_save": None if last is None else {"at": last.at, "bytes": last.bytes},
            "image": self.image_status(),
            "methods": self.protos.watchdog.status() if self.protos.watchdog else None,
            "protos": len(self.protos),
            "codex_version": self.codex.version,
            "forge": {"enabled": forge_off is None, "disabled_reason": forge_off},
            "motivator": self.motivator.status(),
            "philosopher": self.philosopher.status(),
            "curator": {"running": self.curator.running, "votes": self.curator.votes()},
        }

    def graph_shape(self) -> dict[str, Any]:
        """The cognitive graph's nodes and edges (the UI draws its live graph strip
        from them without importing cognition). Built once: the shape is fixed."""
        if self._graph_shape is None:
            g = self.graph.compile().get_graph()
            self._graph_shape = {
                "nodes": list(g.nodes),
                "edges": [{"source": e.source, "target": e.target,
                           "conditional": bool(e.conditional),
                           "label": e.data if isinstance(e.data, str) else None}
                          for e in g.edges]}
        return self._graph_shape

    def stores(self) -> dict[str, str]:
        """Where the task queue, checkpoints and memory live (passwords hidden)."""
        s = self.settings
        return {"tasks": redact_url(s.tasks.queue), "checkpoints":
                redact_url(s.cognition.checkpointer), "memory": redact_url(s.memory_uri)}

    def image_status(self) -> dict[str, Any]:
        """What was loaded (and what was skipped, and why), the last save, and a save
        that is failing (``save_error``: None when saves work)."""
        load, last = self.last_load, self.image.last_save
        failure = self._save_retry.failure
        return {
            "path": str(self.image.path),
            "loaded_from": None if load is None else str(load.path),
            "loaded_format": None if load is None else load.format,
            "loaded_saved_at": None if load is None else load.saved_at,
            "skipped": [] if load is None else [{"path": str(p), "reason": r}
                                                for p, r in load.skipped],
            "last_save": None if last is None else {"at": last.at, "bytes": last.bytes,
                                                    "written": last.written},
            "unsaved_changes": self.dirty,
            "save_error": None if failure is None else failure.to_dict(),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything a freshly connected UI needs."""
        return {
            "graph": self.graph_shape(),
            "protos": [p.to_dict() for p in self.protos],
            "tools": self.tools.list(),
            "codex": self.codex.to_dict(),
            "pending_amendments": [a.to_dict() for a in self.codex.pending()],
            "tasks": [t.to_dict() for t in self.tasks.list(limit=50)],
            "status": self.status(),
        }

