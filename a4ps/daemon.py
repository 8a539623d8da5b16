"""The single backend process: owns a System, runs tasks, and serves ZeroMQ.

Threads, and what each one touches:

* **bus** (``a4ps-bus``): the only thread that touches the ROUTER and PUB sockets.
  It waits on the ROUTER and on a wake-up pipe; per command it only checks the
  framing and the size, reads the envelope's scalar fields (never the args) and
  authenticates, then hands it to the handler pool; sends replies and events that
  other threads queued; sends a heartbeat every ``bus.heartbeat_interval_s``. Its
  work per message is bounded whatever the client sends.
* **handlers** (a small pool): decode and validate the args (strict, bounded) and
  run the command handlers against the System, so neither a slow command nor a
  hostile 1 MiB message delays pings, heartbeats or events.
* **worker** (``a4ps-worker``): claims tasks from the durable queue one at a time and
  runs them with ``system.run_task``.
* the System's own threads (autosave, curator, motivator, philosopher).

Every EventBus topic is forwarded to PUB through a thread-safe queue. Each event
gets a sequence number when it is queued; if the queue overflows the oldest events
are dropped, and the gap in ``seq`` tells the client to ask ``system.snapshot``.

Shutdown (SIGTERM/SIGINT, or :meth:`Daemon.stop`): stop claiming tasks, wait up to
``shutdown_grace_s`` for the running task to finish, then ``system.stop()`` (which
saves the image). A task still running after the grace period has its graph
checkpointed after the last finished node and is marked as *interrupted* in the
queue (``TaskQueue.interrupt``): a clean interruption, so the next start re-queues it
without counting an attempt and resumes it from that checkpoint. Only a task left
running by an unclean death (SIGKILL, a crash) counts towards the crash cap.
"""
from __future__ import annotations

import collections
import hmac
import logging
import os
import secrets
import signal
import stat
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

from . import protocol as P
from .lock import LOCK_NAME as LOCK_NAME  # re-exported: the daemon's lock file name
from .lock import DataLock, DataLockHeld
from .protocol import ErrorCode, ProtocolError
from .step_buffer import StepBuffer
from .task_control import TaskSupervisor
from .codex import CodexError
from .fine_tuning.unsloth_forge import FinetuneError
from .persona_file import PersonaFileError
from .proto import ProtoError
from .services.motivator_service import IdleWatch
from .snapshots import SnapshotConflict, SnapshotError, SnapshotNotFound
from .tasks import TaskNotFound

if TYPE_CHECKING:
    import zmq

    from .events import Event
    from .system import System
    from .tasks import Task

log = logging.getLogger(__name__)

Handler = Callable[[Any], Any]
EVENT_QUEUE_MAX = 200_000
PUB_HWM = 100_000


class DaemonError(RuntimeError):
    """The daemon cannot start (lock held, address in use...); the message says why."""


class CommandError(Exception):
    """Raised by a handler to answer with a specific error code."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message


# -- lock and token ------------------------------------------------------------------

# the one-writer lock lives in a4ps.lock (the System takes it too); old names kept
DaemonLock = DataLock
DaemonLockError = DataLockHeld

def ensure_token(path: Path) -> str:
    """Read the daemon token, creating it (mode 0600) on first start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("token file %s had mode %o; tightening to 600", path, mode)
            os.chmod(path, 0o600)
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
    token = secrets.token_urlsafe(32)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # whatever the umask was
    return token


# -- the daemon ----------------------------------------------------------------------

@dataclass
class _Command:
    handler: Handler
    args_model: type[BaseModel]
    inline: bool = False   # cheap and side-effect free: run on the bus thread


class Daemon:
    """Serve ``system`` over ZeroMQ and run its tasks. See the module docstring."""

    def __init__(self, system: System, *, lock: DaemonLock | None = None,
                 shutdown_grace_s: float = 20.0, handler_threads: int = 4,
                 from_snapshot: str | None = None) -> None:
        self.system = system
        self.from_snapshot = from_snapshot   # restore this snapshot before serving
        self.settings = system.settings
        self.bus_settings = self.settings.bus
        self.shutdown_grace_s = shutdown_grace_s
        # the data directory's one-writer lock: the caller's, else the System's own
        self.lock = lock or getattr(system, "lock", None) or DataLock(self.settings.data_dir / LOCK_NAME)
        self.boot_id = uuid.uuid4().hex[:12]
        self.token = ""
        self._commands: dict[str, _Command] = {}
        self.task_steps = StepBuffer()   # task.steps: what a running task said so far
        self._register_defaults()
        # bus-thread state
        self._events: collections.deque[Any] = collections.deque(maxlen=EVENT_QUEUE_MAX)
        self._replies: collections.deque[Any] = collections.deque()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._wake_r, self._wake_w = -1, -1
        self._wake_pending = False
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._bus_thread: threading.Thread | None = None
        self._bus_ready = threading.Event()
        self._bus_error: BaseException | None = None
        self._bus_stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=handler_threads,
                                        thread_name_prefix="a4ps-handler")
        self._unsubscribe: Callable[[], None] | None = None
        # worker state
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self.current_task: Task | None = None
        self.supervisor = TaskSupervisor(
            system.tasks, system.bus,
            preempt=getattr(getattr(self.settings, "motivator", None), "preempted_goals", "requeue"))
        self.tasks_run = 0
        # lifecycle
        self.started_at: float | None = None
        self.stopping = False
        self.unsaved_at_stop: str | None = None
        self._stop_requested = threading.Event()
        self._stopped = False
        self.stats: collections.Counter[str] = collections.Counter()

    # -- command table -------------------------------------------------------------
    def register(self, cmd: str, handler: Handler,
                 args_model: type[BaseModel] | None = None, *, inline: bool = False) -> None:
        """Add or replace a command. ``handler(args)`` gets the validated args model."""
        if args_model is None:
            args_model = P.COMMANDS.get(cmd, P.NoArgs)
        P.check_args_model(cmd, args_model)
        self._commands[cmd] = _Command(handler, args_model, inline)

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    def _register_defaults(self) -> None:
        s = self.system
        reg = self.register
        reg("system.ping", lambda a: {"pong": True, "boot_id": self.boot_id,
                                      "pid": os.getpid()}, inline=True)
        reg("system.status", lambda a: {**s.status(), "daemon": self.daemon_status()})
        reg("system.snapshot", self._snapshot)
        reg("system.save", self._system_save)
        reg("task.submit", self._task_submit)
        reg("task.cancel", self._task_cancel)
        reg("task.get", lambda a: self._task(a.id).to_dict())
        reg("task.list", lambda a: [t.to_dict() for t in s.tasks.list(a.status, limit=a.limit)])
        reg("task.steps", self._task_steps)
        reg("proto.list", lambda a: [p.to_dict() for p in s.protos])
        reg("proto.get", lambda a: self._proto(a.name).to_dict())
        reg("proto.update", self._proto_update)
        reg("proto.clone", self._proto_clone)
        reg("proto.remove", self._proto_remove)
        reg("proto.revert_method", self._proto_revert)
        reg("tool.list", lambda a: s.tools.list())
        reg("codex.get", lambda a: s.codex.to_dict())
        reg("codex.decide", self._codex_decide)
        reg("codex.propose", self._codex_propose)
        motivator = getattr(s, "motivator", None)
        if callable(getattr(motivator, "set_paused", None)):
            reg("motivator.pause", self._motivator_pause)
        if getattr(s, "curator", None) is not None and getattr(s, "finetuner", None) is not None:
            reg("curator.run", lambda a: s.curator.run_once(finetune=a.finetune).to_dict())
            reg("finetune.run", self._finetune_run)
            reg("models.lineage", self._models_lineage)
            reg("models.rollback", self._models_rollback)
        if getattr(s, "timemachine", None) is not None:
            reg("image.snapshots", lambda a: {"snapshots": s.timemachine.list()})
            reg("image.diff", lambda a: self._time_travel(s.timemachine.diff, a.snapshot,
                                                          a.against))
            reg("image.restore", self._image_restore)
            reg("image.snapshot", lambda a: self._time_travel(s.timemachine.snapshot, a.name))
        if getattr(s, "personas", None) is not None:
            reg("persona.export", self._persona_export)
            reg("persona.import", self._persona_import)

    # -- handlers ------------------------------------------------------------------
    def daemon_status(self) -> dict[str, Any]:
        task = self.current_task
        threads = {t.name: t.is_alive() for t in (self._bus_thread, self._worker) if t}
        threads.update({t.name: t.is_alive() for t in threading.enumerate()
                        if t.name.startswith("a4ps-") and t.name not in threads})
        return {
            "pid": os.getpid(), "boot_id": self.boot_id, "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0,
            "stopping": self.stopping, "current_task": getattr(task, "id", None),
            "tasks_run": self.tasks_run, "threads": threads,
            "event_seq": self._seq, "event_queue": len(self._events),
            "commands": dict(self.stats), "command_addr": self.bus_settings.command_addr,
            "event_addr": self.bus_settings.event_addr,
        }

    def _system_save(self, _a: Any) -> dict[str, Any]:
        try:
            return self.system.save()
        except Exception as e:  # recorded, published and retried by the System
            raise CommandError(ErrorCode.UNAVAILABLE,
                               f"the image could not be saved ({type(e).__name__}: {e}); "
                               "the previous image is intact and the save is retried; "
                               "system.status shows image.save_error") from None

    def _snapshot(self, _a: Any) -> dict[str, Any]:
        seq = self._seq  # events after this one are newer than the snapshot
        snap = self.system.snapshot()
        return {**snap, "daemon": {"boot_id": self.boot_id, "seq": seq, "pid": os.getpid()}}

    def _task(self, task_id: Any) -> Any:
        try:
            return self.system.tasks.get(str(task_id))
        except TaskNotFound:
            raise CommandError(ErrorCode.NOT_FOUND, f"no task with id {task_id!r}") from None

    def _task_submit(self, a: P.TaskSubmitArgs) -> dict[str, Any]:
        try:
            task = self.system.tasks.submit(a.text, priority=a.priority, origin="user")
        except ValueError as e:
            raise CommandError(ErrorCode.INVALID_ARGS, str(e)) from None
        return task.to_dict()

    def _task_cancel(self, a: P.TaskIdArgs) -> dict[str, Any]:
        """Queued: cancelled now. Running: stopped at its next node boundary (or inside
        the generation), then ``cancelled``; ``task.cancelled`` says when."""
        task = self._task(a.id)
        if not self.system.tasks.cancel(task.id):
            raise CommandError(ErrorCode.CONFLICT,
                               f"task {task.id} already finished ({task.status})")
        if task.status == "queued":
            self.system.bus.publish("task.cancelled", {
                "task_id": task.id, "origin": task.origin, "reason": "cancelled by request",
                "requeued": False, "node": None})
        else:
            self.supervisor.cancel(task.id)
        return self.system.tasks.get(task.id).to_dict()

    def _task_steps(self, a: P.TaskStepsArgs) -> dict[str, Any]:
        """The steps and streamed text of a task so far (a UI connecting mid-task)."""
        tid = str(a.task_id)
        got = self.task_steps.get(tid)
        if got is None:   # not seen since this daemon started: say so, from the queue
            task = self._task(tid)
            got = {"steps": [], "partial": None, "seq": 0, "status": task.status}
        return {"task_id": tid, **got}

    def _proto_clone(self, a: P.ProtoCloneArgs) -> dict[str, Any]:
        """A new proto delegating to ``name`` (Self-style clone), e.g. from a morph's halo."""
        self._proto(a.name)
        try:
            return self.system.protos.clone(a.name, a.new_name, **(a.slots or {})).to_dict()
        except ProtoError as e:
            code = ErrorCode.CONFLICT if "already exists" in str(e) else ErrorCode.INVALID_ARGS
            raise CommandError(code, str(e)) from None

    def _proto_remove(self, a: P.ProtoNameArgs) -> dict[str, Any]:
        self._proto(a.name)
        if a.name in self.system.codex.personas:
            raise CommandError(ErrorCode.CONFLICT, f"{a.name} is a codex persona the system "
                               "needs; remove a clone instead, or edit its slots")
        try:
            self.system.protos.remove(a.name)
        except ProtoError as e:
            raise CommandError(ErrorCode.CONFLICT, f"{e}: remove those first") from None
        return {"removed": a.name}

    def _proto(self, name: str) -> Any:
        proto = self.system.protos.find(name)
        if proto is None:
            raise CommandError(ErrorCode.NOT_FOUND, f"no proto named {name!r}; "
                               "proto.list shows the names")
        return proto

    def _proto_update(self, a: P.ProtoUpdateArgs) -> dict[str, Any]:
        proto = self._proto(a.name)
        if a.expected_version is not None and a.expected_version != proto.version:
            raise CommandError(ErrorCode.CONFLICT,
                               f"proto {a.name!r} is at version {proto.version}, not "
                               f"{a.expected_version}: reload it and try again")
        try:
            updated = self.system.protos.update(a.name, a.slots, methods=a.methods,
                                                delete=a.delete,
                                                expected_version=a.expected_version,
                                                origin="user")
        except ProtoError as e:
            code = ErrorCode.CONFLICT if "reload it" in str(e) else ErrorCode.INVALID_ARGS
            raise CommandError(code, str(e)) from None
        return updated.to_dict()

    def _proto_revert(self, a: P.ProtoRevertArgs) -> dict[str, Any]:
        """Put back a method's previous source (the inspector's "revert")."""
        self._proto(a.name)
        try:
            reverted = self.system.protos.revert_method(a.name, a.method,
                                                        expected_version=a.expected_version)
        except ProtoError as e:
            code = ErrorCode.CONFLICT if "reload it" in str(e) else ErrorCode.INVALID_ARGS
            raise CommandError(code, str(e)) from None
        return reverted.to_dict()

    def _codex_error(self, e: Exception) -> CommandError:
        msg = str(e)
        if msg.startswith("no amendment"):
            return CommandError(ErrorCode.NOT_FOUND, msg)
        if "stale" in msg or "already" in msg or "rejected before" in msg or "changed since" in msg:
            return CommandError(ErrorCode.CONFLICT, msg)
        return CommandError(ErrorCode.INVALID_ARGS, msg)

    def _codex_decide(self, a: P.CodexDecideArgs) -> dict[str, Any]:
        try:
            amendment = self.system.codex.decide(a.proposal_id, a.version, a.approve,
                                                 by="user", reason=a.reason or "")
        except CodexError as e:
            raise self._codex_error(e) from None
        return {**amendment.to_dict(), "codex_version": self.system.codex.version}

    def _codex_propose(self, a: P.CodexProposeArgs) -> dict[str, Any]:
        try:
            amendment = self.system.codex.propose(a.persona, a.principle_id, a.proposed_text,
                                                  a.rationale, origin="user")
        except CodexError as e:
            raise self._codex_error(e) from None
        return amendment.to_dict()

    def _persona_name(self, persona: str) -> str:
        name = persona.upper()
        if name not in self.system.protos:
            raise CommandError(ErrorCode.NOT_FOUND, f"no persona {persona!r}")
        return name

    def _finetune_run(self, a: P.FinetuneArgs) -> dict[str, Any]:
        """Train, gate and swap now (long: minutes). Progress goes out as events."""
        persona = self._persona_name(a.persona)
        dataset = Path(a.dataset) if a.dataset else self.system.curator.golden_path
        if not dataset.exists():
            raise CommandError(ErrorCode.NOT_FOUND, f"no dataset at {dataset}: run `a4ps curate` "
                               "until the golden set has samples, or pass a dataset file")
        if self.system.finetuner.running:
            raise CommandError(ErrorCode.CONFLICT, "a fine-tune is already running")
        if a.heldout and not Path(a.heldout).exists():
            raise CommandError(ErrorCode.NOT_FOUND, f"no held-out file at {a.heldout}")
        return self.system.finetuner.finetune(persona, dataset, steps=a.steps,
                                              heldout_path=a.heldout).to_dict()

    def _models_lineage(self, a: P.PersonaArgs) -> dict[str, Any]:
        persona = self._persona_name(a.persona)
        return {"persona": persona, "model_name": self.system.protos.get(persona).get("model_name"),
                "lineage": self.system.finetuner.lineage(persona)}

    def _models_rollback(self, a: P.PersonaArgs) -> dict[str, Any]:
        try:
            return self.system.finetuner.rollback(self._persona_name(a.persona))
        except FinetuneError as e:
            raise CommandError(ErrorCode.CONFLICT, str(e)) from None

    @staticmethod
    def _time_travel(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except SnapshotNotFound as e:
            raise CommandError(ErrorCode.NOT_FOUND, str(e)) from None
        except SnapshotConflict as e:
            raise CommandError(ErrorCode.CONFLICT, str(e)) from None
        except SnapshotError as e:
            raise CommandError(ErrorCode.INVALID_ARGS, str(e)) from None

    def _image_restore(self, a: P.ImageRestoreArgs) -> dict[str, Any]:
        """Waits for the running task to finish (image.restore_wait_s), then restores."""
        restored: dict[str, Any] = self._time_travel(self.system.timemachine.restore, a.snapshot)
        return restored

    @staticmethod
    def _persona_file(fn: Callable[..., dict[str, Any]], path: str,
                      **kw: Any) -> dict[str, Any]:
        if not Path(path).is_absolute():
            raise CommandError(ErrorCode.INVALID_ARGS, f"path {path!r} must be absolute (it is "
                               "read or written by the daemon, not in your working folder)")
        try:
            return fn(path, **kw)
        except PersonaFileError as e:
            code = ErrorCode.CONFLICT if "exists" in str(e) else ErrorCode.INVALID_ARGS
            raise CommandError(code, str(e)) from None

    def _persona_export(self, a: P.PersonaExportArgs) -> dict[str, Any]:
        return self._persona_file(lambda path, **kw: self.system.personas.export(
            a.name, path, **kw), a.path, golden=a.golden, overwrite=a.overwrite)

    def _persona_import(self, a: P.PersonaImportArgs) -> dict[str, Any]:
        """Checks the whole file, then installs it (long with re-embedding: progress
        goes out as persona.progress events)."""
        return self._persona_file(self.system.personas.import_, a.path, as_name=a.as_name)

    def _motivator_pause(self, a: P.PauseArgs) -> dict[str, Any]:
        motivator = self.system.motivator
        motivator.set_paused(a.paused)
        status = getattr(motivator, "status", None)
        return {"paused": a.paused, **(status() if callable(status) else {})}

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Daemon:
        """Lock the data dir, start the System, bind the sockets, start the worker."""
        if not self.lock.held:
            self.lock.acquire(kind="daemon", command_addr=self.bus_settings.command_addr,
                              event_addr=self.bus_settings.event_addr)
        try:
            self.token = ensure_token(self.settings.token_path)
            state = getattr(getattr(self.system, "state", None), "value", None)
            if state in (None, "created"):
                self.system.start(lock=self.lock, skip_newer_image=bool(self.from_snapshot))
            if self.from_snapshot:
                self._restore_at_start(self.from_snapshot)
            recovered = self.system.tasks.recover()
            if recovered:
                log.info("recovered %d interrupted task(s): %s", len(recovered),
                         [t.id for t in recovered])
            self._unsubscribe = self.system.bus.subscribe("*", self._on_event)
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._bus_thread = threading.Thread(target=self._bus_loop, name="a4ps-bus",
                                                daemon=True)
            self._bus_thread.start()
            self._bus_ready.wait(10)
            if self._bus_error is not None:
                raise self._bus_error
            self.started_at = time.time()
            self._worker = threading.Thread(target=self._work_loop, name="a4ps-worker",
                                            daemon=True)
            self._worker.start()
        except BaseException:
            self._teardown_bus()
            try:
                self.system.stop()
            except Exception:
                log.exception("stopping the system after a failed start")
            self.lock.release()
            raise
        log.info("daemon %s (pid %d) serving commands on %s, events on %s",
                 self.boot_id, os.getpid(), self.bus_settings.command_addr,
                 self.bus_settings.event_addr)
        self.system.bus.publish("log", {"level": "info", "message": "daemon started",
                                        "pid": os.getpid(), "boot_id": self.boot_id})
        return self

    def _restore_at_start(self, ref: str) -> None:
        try:
            out = self.system.timemachine.restore(ref)
        except SnapshotError as e:
            raise DaemonError(f"--from-snapshot {ref}: {e}") from None
        log.info("started from snapshot %s (the state before is snapshot %s)",
                 out["restored"], out["pre_restore"])

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (safe from a signal handler)."""
        self._stop_requested.set()

    def stop(self) -> bool:
        """Graceful shutdown; True when the running task (if any) finished in time."""
        if self._stopped:
            return True
        self.stopping = True
        self._worker_stop.set()
        self.unsaved_at_stop = None
        finished = True
        if self._worker is not None:
            self._worker.join(self.shutdown_grace_s)
            finished = not self._worker.is_alive()
        if finished:
            self.system.stop()   # stops services, saves the image
            self.unsaved_at_stop = getattr(self.system, "unsaved_at_stop", None)
        else:
            task = self.current_task
            log.warning("task %s still running after %gs; saving the image and leaving it "
                        "to resume from its checkpoint on the next start (a clean "
                        "interruption: no attempt counted)",
                        getattr(task, "id", "?"), self.shutdown_grace_s)
            if task is not None:
                try:
                    self.system.tasks.interrupt(task.id)
                except Exception:
                    log.exception("could not mark task %s as interrupted; the next start "
                                  "will count it as a crash", task.id)
            try:
                self.system.save()
            except Exception as e:
                self.unsaved_at_stop = f"{type(e).__name__}: {e}"
                log.error("saving the image at shutdown failed: %s", e)
        self._pool.shutdown(wait=finished, cancel_futures=True)
        self._teardown_bus()
        self.lock.release()
        self._stopped = True
        log.info("daemon %s stopped", self.boot_id)
        return finished

    def run(self, *, hard_exit: bool = True) -> int:
        """Start, serve until SIGTERM/SIGINT, stop. Returns the exit code.

        ``hard_exit``: once everything is saved, leave with ``os._exit`` instead of
        returning: native finalizers (LanceDB's loop, torch) took 6-10 s at
        interpreter exit here, which would make shutdown time unbounded in practice.
        """
        def on_signal(signum: int, _frame: Any) -> None:
            if self._stop_requested.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s: shutting down", signal.Signals(signum).name)
            self._stop_requested.set()

        # a thread waiting for the GIL asks for it after this long: 5 ms by default,
        # which a busy handler thread would add to every ping and heartbeat
        sys.setswitchinterval(0.0005)
        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self._stop_requested.wait(1.0):
                pass
            finished = self.stop()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        code = 0
        if self.unsaved_at_stop:
            print(f"a4ps daemon: the image could not be saved at shutdown "
                  f"({self.unsaved_at_stop}); the last image on disk is kept",
                  file=sys.stderr)
            code = 1
        if hard_exit or not finished:
            # (not finished: the worker is inside a model call we cannot interrupt)
            # everything is saved and checkpointed, so leave without waiting
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            logging.shutdown()
            os._exit(code)
        return code

    # -- worker --------------------------------------------------------------------------
    def _work_loop(self) -> None:
        tasks = self.system.tasks
        motivator = getattr(self.system, "motivator", None)
        idle = None
        if motivator is not None:
            idle = IdleWatch(self.system.bus, self.system.settings.motivator.idle_after_s)
        while not self._worker_stop.is_set():
            try:
                allow = True if motivator is None else bool(motivator.allow_self_generated)
                task = tasks.claim(allow_self_generated=allow, timeout=0.5)
            except Exception:
                if self._worker_stop.is_set():
                    return
                log.exception("claiming a task failed; retrying")
                self._worker_stop.wait(1.0)
                continue
            if task is None:
                if idle is not None:
                    idle.tick()  # publishes system.idle once per idle period
                continue
            if idle is not None:
                idle.touch()
            self.current_task = task
            try:
                self.supervisor.run(task, self.system.run_task)
            except Exception:  # run_task records failures itself; this is a bug guard
                log.exception("running task %s failed", task.id)
            finally:
                self.current_task = None
                self.tasks_run += 1

    # -- events (any thread) -> bus thread ---------------------------------------------
    def _on_event(self, event: Event) -> None:
        seq = self.enqueue_event(event.topic, event.payload, event.ts)
        self.task_steps.record(event.topic, event.payload, seq, event.ts or time.time())

    def enqueue_event(self, topic: str, payload: dict[str, Any], ts: float | None = None) -> int:
        """Queue an event for PUB; returns its sequence number."""
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
            self._events.append((topic, seq, ts or time.time(), payload))
        self._wake()
        return seq

    def _wake(self) -> None:
        if not self._wake_pending and self._wake_w >= 0:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    # -- bus thread ------------------------------------------------------------------------
    def _bind(self) -> tuple[Any, Any]:
        import zmq
        ctx = self._ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        pub = ctx.socket(zmq.PUB)
        limit = self.bus_settings.max_message_bytes
        for sock in (router, pub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, 500)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1500)
        # bigger than the limit, so a slightly-too-big message gets a too_large reply;
        # a huge one is cut off by zmq (the peer is disconnected) before it costs memory
        router.setsockopt(zmq.MAXMSGSIZE, 2 * limit + 65536)
        router.setsockopt(zmq.SNDHWM, 10_000)
        pub.setsockopt(zmq.SNDHWM, PUB_HWM)
        for sock, addr, key in ((router, self.bus_settings.command_addr, "bus.command_addr"),
                                (pub, self.bus_settings.event_addr, "bus.event_addr")):
            try:
                sock.bind(addr)
            except zmq.ZMQError as e:
                ctx.destroy(linger=0)
                self._ctx = None
                raise DaemonError(f"cannot bind {addr} ({e}): another program uses it; set "
                                  f"{key} (A4PS_{key.upper().replace('.', '__')})") from None
        return router, pub

    def _bus_loop(self) -> None:
        import zmq
        try:
            router, pub = self._bind()
        except BaseException as e:
            self._bus_error = e
            self._bus_ready.set()
            return
        self._bus_ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        interval = self.bus_settings.heartbeat_interval_s
        next_beat = time.monotonic()
        limit = self.bus_settings.max_message_bytes
        try:
            while not self._bus_stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat(interval)
                    next_beat = now + interval
                self._flush(router, pub)
                timeout_ms = max(0, int((next_beat - time.monotonic()) * 1000)) + 1
                ready = dict(poller.poll(timeout_ms))
                if self._wake_r in ready:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    self._wake_pending = False
                if router in ready:
                    for _ in range(1000):  # fairness: then events and heartbeats again
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        try:
                            self._on_frames(router, frames, limit)
                        except Exception as e:   # a bug must cost one reply, not the bus
                            log.exception("handling a message on the bus thread failed")
                            self._reply(frames[:1] + [b""], P.Reply.failure(
                                "", ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))
            self._flush(router, pub)  # last events (e.g. "daemon stopping")
        except Exception:
            log.exception("the bus thread failed; the daemon stops serving")
            self._stop_requested.set()
        finally:
            router.close(linger=0)
            pub.close(linger=0)

    def _heartbeat(self, interval: float) -> None:
        self.enqueue_event(P.HEARTBEAT, {
            "boot_id": self.boot_id, "pid": os.getpid(), "interval_s": interval,
            "uptime_s": round(time.time() - (self.started_at or time.time()), 3),
            "busy": getattr(self.current_task, "id", None), "stopping": self.stopping})

    def _flush(self, router: Any, pub: Any) -> None:
        import zmq
        replies, events = self._replies, self._events
        while replies:
            envelope, body = replies.popleft()
            try:
                router.send_multipart([*envelope, body], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the client left or is not reading: nothing to do
        while events:
            topic, seq, ts, payload = events.popleft()
            try:
                pub.send_multipart(P.encode_event(topic, seq, ts, payload), zmq.NOBLOCK)
            except zmq.Again:
                pass  # HWM: counted by the client as a seq gap
            except Exception:
                log.exception("could not publish %s event", topic)

    def _reply(self, envelope: list[bytes], reply: P.Reply) -> None:
        """Queue a reply (any thread)."""
        self.stats["ok" if reply.ok else (reply.error.code if reply.error else "error")] += 1
        try:
            body = P.encode_reply(reply)
        except Exception as e:
            log.exception("cannot encode the reply to %s", reply.id)
            body = P.encode_reply(P.Reply.failure(reply.id, ErrorCode.INTERNAL,
                                                  f"reply not encodable: {e}"))
        self._replies.append((envelope, body))
        if threading.current_thread() is not self._bus_thread:
            self._wake()

    def _on_frames(self, router: Any, frames: list[bytes], limit: int) -> None:
        """Bus thread: framing, size, envelope, token; nothing that grows with the args.
        Every path here ends in exactly one reply (or hands the command to a handler
        thread, which replies)."""
        if len(frames) == 3 and frames[1] == b"":
            envelope, body = frames[:2], frames[2]
        else:
            self._reply(frames[:1] + [b""], P.Reply.failure(
                "", ErrorCode.BAD_FRAME,
                f"expected [empty delimiter, body] frames, got {len(frames) - 1} frame(s): "
                "send REQ framing (a DEALER sends b'' first)"))
            return
        try:
            env = P.read_envelope(body, max_bytes=limit)
            token = env.token
            if token is None or not hmac.compare_digest(token.encode(), self.token.encode()):
                raise ProtocolError(ErrorCode.UNAUTHORIZED,
                                    "missing or wrong token: read it from "
                                    f"{self.settings.token_path}", env.request_id)
            head = P.check_envelope(env)
            cmd = self._commands.get(head.cmd)
            if cmd is None:
                raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                                    f"unknown command {head.cmd!r}; known: "
                                    f"{', '.join(self.commands)}", head.id)
        except ProtocolError as e:
            self._reply(envelope, P.Reply.failure(e.request_id, e.code, e.message))
            return
        if self.stopping and head.cmd not in ("system.ping", "system.status"):
            self._reply(envelope, P.Reply.failure(head.id, ErrorCode.UNAVAILABLE,
                                                  "the daemon is shutting down; retry when "
                                                  "it is back"))
            return
        small = env.args_end is None and len(body) - (env.args_start or 0) <= 64
        if cmd.inline and small:
            self._run_handler(envelope, head, cmd, env)
        else:
            try:
                self._pool.submit(self._run_handler, envelope, head, cmd, env)
            except RuntimeError:  # pool shut down
                self._reply(envelope, P.Reply.failure(head.id, ErrorCode.UNAVAILABLE,
                                                      "the daemon is shutting down"))

    def _run_handler(self, envelope: list[bytes], head: P.RequestHead, cmd: _Command,
                     env: P.Envelope) -> None:
        """Handler thread (or the bus thread for small inline commands): decode and
        validate the args, run the handler, reply."""
        try:
            args = P.validate_args(head.cmd, P.decode_args(env), {head.cmd: cmd.args_model})
            result = cmd.handler(args)
            reply = P.Reply.success(head.id, result)
        except (CommandError, ProtocolError) as e:
            reply = P.Reply.failure(head.id, e.code, e.message)
        except Exception as e:
            log.exception("command %s failed", head.cmd)
            reply = P.Reply.failure(head.id, ErrorCode.INTERNAL,
                                    f"{head.cmd} failed: {type(e).__name__}: {e}")
        self._reply(envelope, reply)

    def _teardown_bus(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._bus_stop.set()
        self._wake_pending = False
        self._wake()
        if self._bus_thread is not None:
            self._bus_thread.join(5)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
