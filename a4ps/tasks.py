"""Durable priority task queue: the ``TaskQueue`` seam and its SQLite implementation.

(Several daemons sharing one queue: :mod:`a4ps.tasks_postgres`, by setting.)

Why SQLite: a task the user submitted must survive a crash. ``submit()`` returns only
after the row is committed (WAL, ``synchronous=FULL``), so a SIGKILL or power loss after
that point cannot lose it. After a restart the daemon calls :meth:`SqliteTaskQueue.recover`,
which puts tasks that were ``running`` when the process died back in the queue (or fails
them once they have been interrupted ``max_attempts`` times, so a task that kills the
daemon cannot crash-loop it forever). A *graceful* stop is not a crash: the daemon
marks the task it could not finish in time with :meth:`TaskQueue.interrupt`, and
``recover`` re-queues such a task without counting an attempt.

Ordering: user tasks always run before self-generated ones (motivator goals,
reflections), whatever their priority; within each group lower ``priority`` runs first,
then submission order. So a self-generated task is never handed out while a user task
is queued.

States: queued -> running -> done | failed; queued -> cancelled; running ->
(cancel_requested) -> cancelled when the worker acknowledges with ``cancel(id,
force=True)``, or done/failed if it finishes first; running -> queued through
``requeue`` when a self-generated task is preempted (no attempt counted).

Thread-safe: one connection guarded by a lock; ``claim`` runs in a ``BEGIN IMMEDIATE``
transaction, so it is also atomic across processes sharing the file.
"""
from __future__ import annotations

import builtins
import json
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol, Self, runtime_checkable

if TYPE_CHECKING:
    from .events import Bus

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")
USER = "user"
DEFAULT_USER_PRIORITY = 0
DEFAULT_SELF_PRIORITY = 10
DEFAULT_MAX_ATTEMPTS = 3
# A blocking claim() also re-checks the database this often, to see tasks that another
# process (e.g. `a4ps ask` writing the same file) submitted.
_POLL_S = 0.25

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    origin TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    meta TEXT NOT NULL DEFAULT '{}',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    interrupted INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    -- generated, so "user tasks first" is part of the index order
    is_self INTEGER GENERATED ALWAYS AS (origin != 'user') VIRTUAL
);
CREATE INDEX IF NOT EXISTS tasks_pick ON tasks (status, is_self, priority, seq);
"""
# columns added after the first release: (name, definition), added to older files
_ADDED_COLUMNS = (("interrupted", "INTEGER NOT NULL DEFAULT 0"),
                  ("interruptions", "INTEGER NOT NULL DEFAULT 0"))


class TaskQueueError(RuntimeError):
    """The queue file cannot be opened; the message names it and what to do."""


class TaskNotFound(KeyError):
    """No task with that id."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "task not found"


@dataclass
class Task:
    id: str
    text: str
    origin: str
    priority: int
    status: str
    created: float
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    cancel_requested: bool = False
    interrupted: bool = False       # a graceful stop caught it running (not a crash)
    interruptions: int = 0          # how many graceful stops it has lived through

    @property
    def self_generated(self) -> bool:
        return self.origin != USER

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loads(s: str | None) -> Any:
    if s is None:
        return None
    try:
        return json.loads(s)
    except ValueError:  # a row written by something else; show it rather than crash
        return {"raw": s}


def _dumps(obj: Any) -> str:
    # default=str: a result holding e.g. a Path or numpy float must not fail finish().
    return json.dumps(obj, default=str, ensure_ascii=False)


_COLS = ("id, text, origin, priority, status, created, started, finished, result, error, "
         "attempts, meta, cancel_requested, interrupted, interruptions")
# a running task's new state after its daemon stopped (a Recovery): finished and
# started are set for a terminal state, cleared for a requeue; None keeps the error
_RECOVER_SQL = ("UPDATE tasks SET status = ?, finished = ?, "
                "started = CASE WHEN ? = 'queued' THEN NULL ELSE started END, attempts = ?, "
                "interrupted = 0, interruptions = interruptions + ?, "
                "error = COALESCE(?, error) WHERE id = ?")


def requeued_meta(meta: dict[str, Any], *, reason: str, by: str | None) -> dict[str, Any]:
    """A requeued task's meta: one more ``preempted``, and why, by whom and when it
    stopped (``last_stop``). Shared by every queue so they record a requeue alike."""
    meta = dict(meta)
    meta["preempted"] = int(meta.get("preempted") or 0) + 1
    meta["last_stop"] = {"reason": reason, "by": by, "at": time.time()}
    return meta


def _row(r: tuple[Any, ...]) -> Task:
    return Task(id=r[0], text=r[1], origin=r[2], priority=r[3], status=r[4], created=r[5],
                started=r[6], finished=r[7], result=_loads(r[8]), error=r[9],
                attempts=r[10], meta=_loads(r[11]) or {}, cancel_requested=bool(r[12]),
                interrupted=bool(r[13]), interruptions=r[14])


def _private_file(path: Path) -> None:
    """Create ``path`` with mode 0600 (or tighten an existing one): tasks hold what the
    user asked, which other local users have no business reading."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if p.exists() and stat.S_IMODE(p.stat().st_mode) & 0o077:
                os.chmod(p, 0o600)
    except OSError as e:   # e.g. a read-only directory: connect() says so properly
        log.debug("could not make %s private: %s", path, e)


@runtime_checkable
class TaskQueue(Protocol):
    """The durable task queue every part uses (the daemon's worker, handlers, services).

    Two implementations: :class:`SqliteTaskQueue` (one machine, ``<data_dir>/tasks.sqlite``)
    and :class:`~a4ps.tasks_postgres.PostgresTaskQueue` (several daemons sharing one
    PostgreSQL database). :func:`a4ps.task_queues.open_task_queue` builds the one
    ``tasks.queue`` names.
    Both keep the states, ordering and recovery rules in this module's docstring; the
    shared queue's ``recover`` requeues only the tasks of daemons that are gone.
    """

    def submit(self, text: str, *, origin: str = USER, priority: int | None = None,
               meta: dict[str, Any] | None = None) -> Task: ...

    def claim(self, *, allow_self_generated: bool = True,
              timeout: float | None = None) -> Task | None: ...

    def finish(self, task_id: str, result: dict[str, Any]) -> bool: ...

    def fail(self, task_id: str, error: str) -> bool: ...

    def cancel(self, task_id: str, *, force: bool = False, reason: str | None = None) -> bool: ...

    def cancel_requested(self, task_id: str) -> bool: ...

    def requeue(self, task_id: str, *, reason: str, by: str | None = None) -> bool: ...

    def running(self) -> list[Task]: ...

    def get(self, task_id: str) -> Task: ...

    def list(self, status: str | Iterable[str] | None = None,
             limit: int = 50) -> builtins.list[Task]: ...

    def pending_count(self, origin: str | None = None) -> int: ...

    def interrupt(self, task_id: str) -> bool: ...

    def recover(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> builtins.list[Task]: ...

    def close(self) -> None: ...


def new_task(text: str, *, origin: str = USER, priority: int | None = None,
             meta: dict[str, Any] | None = None) -> Task:
    """A queued task from what a caller submitted, or a ValueError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("task text must be a non-empty string")
    if not isinstance(origin, str) or not origin.strip():
        raise ValueError("task origin must be a non-empty string such as 'user' or 'motivator'")
    if priority is None:
        priority = DEFAULT_USER_PRIORITY if origin == USER else DEFAULT_SELF_PRIORITY
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"task priority must be an int (lower runs first), got {priority!r}")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"task meta must be a dict, got {type(meta).__name__}")
    return Task(id=uuid.uuid4().hex, text=text, origin=origin, priority=priority,
                status="queued", created=time.time(), meta=dict(meta or {}))


def status_filter(status: str | Iterable[str] | None) -> builtins.list[str]:
    """The statuses ``list()`` was asked for, checked against :data:`STATUSES`."""
    statuses = [status] if isinstance(status, str) else (list(status) if status else [])
    bad = [s for s in statuses if s not in STATUSES]
    if bad:
        raise ValueError(f"unknown task status {bad}; use one of {STATUSES}")
    return statuses


@dataclass(frozen=True)
class Recovery:
    """What becomes of a task found ``running`` after its daemon stopped (see
    :func:`recovery_for`)."""
    status: str                 # "cancelled" | "queued" | "failed"
    attempts: int
    clean: bool                 # a graceful stop: one more interruption, no attempt
    error: str | None           # None keeps the task's error


def recovery_for(task: Task, max_attempts: int) -> Recovery:
    """One rule for every queue: a requested cancel ends the task ``cancelled``; a
    graceful stop (``interrupted``) requeues it as it was; a crash requeues it with one
    more attempt, and the ``max_attempts``-th crash fails it."""
    attempts = task.attempts if task.interrupted else task.attempts + 1
    if task.cancel_requested:
        return Recovery("cancelled", attempts, False,
                        "cancelled (its daemon stopped while it ran)")
    if task.interrupted:
        return Recovery("queued", attempts, True, None)
    if attempts >= max_attempts:
        return Recovery("failed", attempts, False,
                        f"interrupted by a daemon crash {attempts} times "
                        f"(max_attempts={max_attempts}); not retried again. It may be what "
                        "crashes the daemon; resubmit it if you are sure it is safe.")
    return Recovery("queued", attempts, False, None)


class QueueBase(ABC):
    """What every queue does alike, whatever stores it: checking what is submitted,
    the blocking claim, the terminal verbs and their events. A store implements
    ``_insert``, ``_claim_once``, ``_terminal``, ``get`` and ``close``;
    ``_before_claim`` is its hook for housekeeping while a worker waits."""

    path: Any
    bus: Bus | None

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"task queue {self.path} is closed")

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        if self.bus is not None:
            self.bus.publish(topic, payload)

    def _wake_waiters(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- what a store provides ------------------------------------------------------
    @abstractmethod
    def _insert(self, task: Task) -> None:
        """Commit ``task`` (queued) so that it survives a crash."""

    @abstractmethod
    def _claim_once(self, allow_self_generated: bool) -> Task | None:
        """Atomically mark the next task running and return it, or None."""

    @abstractmethod
    def _terminal(self, task_id: str, status: str, *, result: Any = None,
                  error: str | None = None, allowed: Iterable[str] = ("running",)) -> bool:
        """End a task in ``status`` if it is in one of ``allowed``; False if not."""

    def _before_claim(self) -> None:
        """Housekeeping before each claim attempt (the shared queue's sweep)."""

    @abstractmethod
    def get(self, task_id: str) -> Task:
        """The task with that id, or :class:`TaskNotFound`."""

    @abstractmethod
    def close(self) -> None:
        """Release the store; blocked claim() calls return None."""

    # -- API ------------------------------------------------------------------------
    def submit(self, text: str, *, origin: str = USER, priority: int | None = None,
               meta: dict[str, Any] | None = None) -> Task:
        """Queue a task; once this returns the task is committed and survives a crash."""
        task = new_task(text, origin=origin, priority=priority, meta=meta)
        self._insert(task)
        self._wake_waiters()
        self._publish("task.queued", {"task_id": task.id, "text": task.text,
                                      "origin": task.origin, "priority": task.priority})
        return task

    def claim(self, *, allow_self_generated: bool = True,
              timeout: float | None = None) -> Task | None:
        """Take the next task and mark it running, or return None.

        ``timeout`` None or 0: do not wait. Otherwise wait up to that many seconds for
        a task to arrive (from this process or another). ``allow_self_generated=False``
        only hands out user tasks (e.g. while the motivator is paused).
        """
        deadline = None if not timeout else time.monotonic() + timeout
        while True:
            self._before_claim()
            task = self._claim_once(allow_self_generated)
            if task is not None or deadline is None:
                return task
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self._cond:
                if self._closed:
                    return None
                self._cond.wait(min(left, _POLL_S))

    def finish(self, task_id: str, result: dict[str, Any]) -> bool:
        """Mark a running task done with its result. False if it was no longer running
        (on a shared queue: if another daemon runs it now)."""
        return self._terminal(task_id, "done", result=result)

    def fail(self, task_id: str, error: str) -> bool:
        """Mark a task failed with a readable reason. False if already finished."""
        return self._terminal(task_id, "failed", error=str(error),
                              allowed=("running", "queued"))

    def cancel_requested(self, task_id: str) -> bool:
        """Cheap check a worker makes between graph steps."""
        return self.get(task_id).cancel_requested

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SqliteTaskQueue(QueueBase):
    """Durable queue of tasks in one SQLite file (``settings.tasks_path``)."""

    def __init__(self, path: Path | str, bus: Bus | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.bus = bus
        super().__init__()
        _private_file(self.path)   # SQLite's -wal/-shm files copy the database's mode
        try:
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            with self._lock:
                self._db.executescript(_SCHEMA)
                have = {r[1] for r in self._db.execute("PRAGMA table_info(tasks)")}
                for name, definition in _ADDED_COLUMNS:
                    if name not in have:
                        self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {definition}")
        except sqlite3.DatabaseError as e:
            raise TaskQueueError(
                f"task queue {self.path} cannot be opened ({e}); if the file is corrupt, "
                "move it aside and restart (queued tasks in it would be lost)") from e

    # -- plumbing -------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``) under this process's lock."""
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _get(self, db: sqlite3.Connection, task_id: str) -> Task:
        r = db.execute(f"SELECT {_COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if r is None:
            raise TaskNotFound(f"no task with id {task_id!r} (see `a4ps tasks` / list())")
        return _row(r)

    # -- the store ------------------------------------------------------------------
    def _insert(self, task: Task) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO tasks (id, text, origin, priority, status, created, meta) "
                "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                (task.id, task.text, task.origin, task.priority, task.created, _dumps(task.meta)))

    def _claim_once(self, allow_self_generated: bool) -> Task | None:
        with self._tx() as db:
            where = "status = 'queued'" + ("" if allow_self_generated else " AND is_self = 0")
            r = db.execute(f"SELECT id FROM tasks WHERE {where} "
                           "ORDER BY is_self, priority, seq LIMIT 1").fetchone()
            if r is None:
                return None
            db.execute("UPDATE tasks SET status = 'running', started = ? WHERE id = ?",
                       (time.time(), r[0]))
            return self._get(db, r[0])

    def _terminal(self, task_id: str, status: str, *, result: Any = None,
                  error: str | None = None, allowed: Iterable[str] = ("running",)) -> bool:
        with self._tx() as db:
            t = self._get(db, task_id)
            if t.status not in allowed:
                log.warning("task %s is %s; not marking it %s", task_id, t.status, status)
                return False
            db.execute("UPDATE tasks SET status = ?, finished = ?, result = ?, error = ? "
                       "WHERE id = ?",
                       (status, time.time(), None if result is None else _dumps(result),
                        error, task_id))
            return True

    def cancel(self, task_id: str, *, force: bool = False, reason: str | None = None) -> bool:
        """Cancel a task. Queued: cancelled at once. Running: flagged ``cancel_requested``
        for the worker, which stops and confirms with ``cancel(id, force=True)``.
        ``reason`` is kept as the task's error. Returns False if the task had already
        finished."""
        with self._tx() as db:
            t = self._get(db, task_id)
            if t.status in TERMINAL:
                return False
            if t.status == "queued" or force:
                db.execute("UPDATE tasks SET status = 'cancelled', finished = ?, "
                           "cancel_requested = 1, error = COALESCE(?, error, 'cancelled') "
                           "WHERE id = ?", (time.time(), reason, task_id))
            else:
                db.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ?", (task_id,))
            return True

    def requeue(self, task_id: str, *, reason: str, by: str | None = None) -> bool:
        """Put a running task back in the queue without counting an attempt (it was
        stopped on purpose, e.g. a goal preempted by a user task). Its graph
        checkpoint is kept, so it resumes where it stopped. ``meta["preempted"]``
        counts how often. False if the task was no longer running."""
        with self._tx() as db:
            t = self._get(db, task_id)
            if t.status != "running":
                return False
            meta = requeued_meta(t.meta, reason=reason, by=by)
            db.execute("UPDATE tasks SET status = 'queued', started = NULL, "
                       "cancel_requested = 0, meta = ? WHERE id = ?", (_dumps(meta), task_id))
        self._wake_waiters()
        return True

    def running(self) -> list[Task]:
        """The tasks marked running (oldest first)."""
        with self._lock:
            self._check_open()
            return [_row(r) for r in self._db.execute(
                f"SELECT {_COLS} FROM tasks WHERE status = 'running' ORDER BY seq")]

    def get(self, task_id: str) -> Task:
        with self._lock:
            self._check_open()
            return self._get(self._db, task_id)

    def list(self, status: str | Iterable[str] | None = None, limit: int = 50) -> builtins.list[Task]:
        """Newest first, optionally only some statuses."""
        statuses = status_filter(status)
        sql = f"SELECT {_COLS} FROM tasks"
        if statuses:
            sql += f" WHERE status IN ({','.join('?' * len(statuses))})"
        sql += " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            self._check_open()
            return [_row(r) for r in self._db.execute(sql, (*statuses, int(limit)))]

    def pending_count(self, origin: str | None = None) -> int:
        """Queued tasks, optionally of one origin."""
        sql = "SELECT COUNT(*) FROM tasks WHERE status = 'queued'"
        args: tuple[str, ...] = ()
        if origin is not None:
            sql, args = sql + " AND origin = ?", (origin,)
        with self._lock:
            self._check_open()
            return int(self._db.execute(sql, args).fetchone()[0])

    def interrupt(self, task_id: str) -> bool:
        """A graceful stop could not wait for this running task: mark it so the next
        :meth:`recover` re-queues it without counting an attempt (the graph resumes it
        from its last checkpoint). False if it was no longer running."""
        with self._tx() as db:
            cur = db.execute("UPDATE tasks SET interrupted = 1 WHERE id = ? AND status = 'running'",
                             (task_id,))
            return cur.rowcount == 1

    def recover(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> builtins.list[Task]:
        """Call once at daemon start, before any worker claims.

        Tasks a graceful stop interrupted (:meth:`interrupt`) go back to ``queued`` as
        they were. Tasks left ``running`` by an unclean death go back with
        ``attempts + 1``; one interrupted so ``max_attempts`` times fails with a clear
        error instead (it may be what kills the daemon). A running task whose cancel
        was requested is cancelled. Returns the tasks touched, in their new state.
        """
        touched: list[str] = []
        now = time.time()
        with self._tx() as db:
            rows = db.execute(f"SELECT {_COLS} FROM tasks WHERE status = 'running' "
                              "ORDER BY seq").fetchall()
            for t in map(_row, rows):
                r = recovery_for(t, max_attempts)
                db.execute(_RECOVER_SQL, (r.status, now if r.status != "queued" else None,
                                          r.status, r.attempts, int(r.clean), r.error, t.id))
                touched.append(t.id)
        if touched:
            log.info("recovered %d interrupted task(s)", len(touched))
            self._wake_waiters()
        return [self.get(i) for i in touched]

    def close(self) -> None:
        """Close the file; blocked claim() calls return None."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._db.close()
