"""The task queue in PostgreSQL, so several daemons can share it (``tasks.queue = "postgres://…"``).

Same API and states as the SQLite queue in :mod:`a4ps.tasks` (it is a ``TaskQueue``);
what changes is that more than one daemon claims from it, each with its own image and
personas:

* **Claiming** is one ``UPDATE … WHERE seq = (SELECT … FOR UPDATE SKIP LOCKED)``: two
  daemons claiming at once never get the same task and never wait for each other.
  Order is the SQLite queue's: user tasks before self-generated ones, then
  ``priority``, then submission order.
* **Who runs what.** Every queue object registers a *worker* row and holds a session
  advisory lock on its id for as long as its connection lives; a claimed task records
  that worker as its ``owner``. When a daemon dies (even by SIGKILL) PostgreSQL drops
  its session and the lock with it. Any daemon (in ``recover()`` at start, and every
  ``sweep_interval_s`` while it waits for work) requeues the ``running`` tasks whose
  owner's lock is free, with the SQLite queue's attempt rule (``max_attempts``
  interruptions fail the task). So a task never runs on two daemons at once while
  their connections are up, and a task interrupted by a crash runs again, elsewhere.
  ``finish``/``fail`` of a running task only count from its owner, so a daemon that
  lost its task (its connection dropped and another daemon took the task over) cannot
  overwrite the other's outcome.
* **Self-generated tasks stay home.** A task whose origin is not ``user`` (a goal, a
  reflection) is about the personas and memory of the daemon that made it, so it is
  pinned to that daemon's ``tasks.worker_name`` and only that daemon claims it; user
  tasks go to whichever daemon is free.

psycopg is imported only here, only when a PostgreSQL queue is configured.
"""
from __future__ import annotations

import builtins
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .config import redact_url
from .tasks import (DEFAULT_MAX_ATTEMPTS, TERMINAL, USER, QueueBase, Task, TaskNotFound,
                    TaskQueueError, recovery_for, requeued_meta, status_filter)

if TYPE_CHECKING:
    from .events import Bus

log = logging.getLogger(__name__)

_LOCK_NS = 0x0A4B5        # advisory-lock namespace: (namespace, worker id)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS a4ps_tasks (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    origin TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued','running','done','failed','cancelled')),
    created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    result JSONB,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    meta JSONB NOT NULL DEFAULT '{}',
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    owner BIGINT,
    pinned TEXT,
    interrupted BOOLEAN NOT NULL DEFAULT false,
    interruptions INTEGER NOT NULL DEFAULT 0,
    is_self BOOLEAN GENERATED ALWAYS AS (origin <> 'user') STORED
);
CREATE INDEX IF NOT EXISTS a4ps_tasks_pick ON a4ps_tasks (is_self, priority, seq)
    WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS a4ps_tasks_running ON a4ps_tasks (owner)
    WHERE status = 'running';
CREATE TABLE IF NOT EXISTS a4ps_task_workers (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started DOUBLE PRECISION NOT NULL
);
"""

_COLS = ("id, text, origin, priority, status, created, started, finished, result, error, "
         "attempts, meta, cancel_requested, interrupted, interruptions")
# a4ps.tasks' _RECOVER_SQL for this table: the task also leaves its (gone) owner
_RECOVER_SQL = ("UPDATE a4ps_tasks SET status = %s, finished = %s, "
                "started = CASE WHEN %s = 'queued' THEN NULL ELSE started END, attempts = %s, "
                "owner = NULL, interrupted = false, interruptions = interruptions + %s, "
                "error = COALESCE(%s, error) WHERE id = %s")


class TaskQueueUnavailable(TaskQueueError):
    """The PostgreSQL queue cannot be reached or used; the message says what to do."""


def _row(r: tuple[Any, ...]) -> Task:
    return Task(id=r[0], text=r[1], origin=r[2], priority=r[3], status=r[4], created=r[5],
                started=r[6], finished=r[7], result=r[8], error=r[9], attempts=r[10],
                meta=r[11] or {}, cancel_requested=bool(r[12]), interrupted=bool(r[13]),
                interruptions=r[14])


def _jsonb(obj: Any) -> Any:
    from psycopg.types.json import Jsonb
    # default=str: a result holding e.g. a Path or numpy float must not fail finish()
    return Jsonb(obj, dumps=lambda o: json.dumps(o, default=str, ensure_ascii=False))


def default_worker_name(data_dir: Any) -> str:
    """``host:data_dir``: stable across restarts, so pinned goals find their daemon."""
    return f"{socket.gethostname()}:{data_dir}"


class PostgresTaskQueue(QueueBase):
    """The durable priority task queue in a PostgreSQL database, shared by daemons."""

    def __init__(self, url: str, bus: Bus | None = None, *, worker_name: str | None = None,
                 connect_timeout_s: float = 10.0, sweep_interval_s: float = 1.0,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        self.url = url
        self.path = redact_url(url)          # what messages name (the SQLite queue's path)
        self.bus = bus
        self.worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.connect_timeout_s = connect_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self.max_attempts = max_attempts
        super().__init__()
        self._last_sweep = 0.0
        self._db: Any = None
        self._live: Any = None
        self.worker_id: int | None = None
        with self._lock:
            self._db = self._connect()
            with self._db.transaction():
                # one daemon at a time creates the tables (CREATE IF NOT EXISTS races)
                self._db.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_NS,))
                self._db.execute(_SCHEMA)
            self.worker_id = self._db.execute(
                "INSERT INTO a4ps_task_workers (name, host, pid, started) "
                "VALUES (%s, %s, %s, %s) RETURNING id",
                (self.worker_name, socket.gethostname(), os.getpid(), time.time())
            ).fetchone()[0]
            self._hold_liveness_lock()

    # -- connections ----------------------------------------------------------------
    def _connect(self) -> Any:
        import psycopg
        try:
            return psycopg.connect(self.url, autocommit=True,
                                   connect_timeout=max(1, int(self.connect_timeout_s)))
        except psycopg.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TaskQueueUnavailable(
                f"cannot reach the PostgreSQL task queue at {self.path}: {first}; is the "
                f"server running and the database created? (or set tasks.queue = "
                f"\"sqlite\")") from e

    def _hold_liveness_lock(self) -> None:
        """A connection of its own whose session lock says "this worker is alive".

        Server-side keepalives make PostgreSQL notice a vanished host within about
        25 s (a killed process on a live host is noticed at once: its socket closes).
        """
        live = self._connect()
        for knob, value in (("tcp_keepalives_idle", 10), ("tcp_keepalives_interval", 5),
                            ("tcp_keepalives_count", 3)):
            live.execute(f"SET {knob} = {int(value)}")
        live.execute("SELECT pg_advisory_lock(%s, %s::integer)", (_LOCK_NS, self.worker_id))
        self._live = live

    def _probe_liveness(self) -> None:
        """Check the liveness connection still stands (a dropped one only shows when
        used) and, if not, reconnect and take the lock again."""
        import psycopg
        with self._lock:
            if self._closed:
                return
            try:
                self._live.execute("SELECT 1")
            except psycopg.Error:
                pass                  # now marked broken: _ensure_connections replaces it
            self._ensure_connections()

    def _ensure_connections(self) -> None:
        if self._db is None or self._db.closed or self._db.broken:
            log.warning("task queue connection lost; reconnecting to %s", self.path)
            self._db = self._connect()
        if self._live is None or self._live.closed or self._live.broken:
            log.warning("task queue liveness connection lost; reconnecting (tasks this "
                        "daemon was running may have been handed to another daemon)")
            self._hold_liveness_lock()

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A transaction on the main connection under this process's lock."""
        with self._lock:
            self._check_open()
            self._ensure_connections()
            with self._db.transaction():
                yield self._db

    def _get(self, db: Any, task_id: str) -> Task:
        r = db.execute(f"SELECT {_COLS} FROM a4ps_tasks WHERE id = %s", (task_id,)).fetchone()
        if r is None:
            raise TaskNotFound(f"no task with id {task_id!r} (see `a4ps tasks` / list())")
        return _row(r)

    # -- the store ------------------------------------------------------------------
    def _insert(self, task: Task) -> None:
        pinned = None if task.origin == USER else self.worker_name
        with self._tx() as db:
            db.execute(
                "INSERT INTO a4ps_tasks (id, text, origin, priority, status, created, meta, "
                "pinned) VALUES (%s, %s, %s, %s, 'queued', %s, %s, %s)",
                (task.id, task.text, task.origin, task.priority, task.created,
                 _jsonb(task.meta), pinned))

    def _before_claim(self) -> None:
        """Requeue dead daemons' tasks every ``sweep_interval_s`` while claiming."""
        if time.monotonic() - self._last_sweep >= self.sweep_interval_s:
            self._sweep(self.max_attempts)

    def _claim_once(self, allow_self_generated: bool) -> Task | None:
        self._probe_liveness()     # never claim under a lock we no longer hold
        with self._tx() as db:
            where = "status = 'queued' AND (pinned IS NULL OR pinned = %s)"
            if not allow_self_generated:
                where += " AND NOT is_self"
            r = db.execute(
                f"UPDATE a4ps_tasks SET status = 'running', started = %s, owner = %s "
                f"WHERE seq = (SELECT seq FROM a4ps_tasks WHERE {where} "
                f"ORDER BY is_self, priority, seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
                f"RETURNING {_COLS}",
                (time.time(), self.worker_id, self.worker_name)).fetchone()
            return None if r is None else _row(r)

    def _terminal(self, task_id: str, status: str, *, result: Any = None,
                  error: str | None = None, allowed: Iterable[str] = ("running",)) -> bool:
        with self._tx() as db:
            t = self._get(db, task_id)
            if t.status not in allowed:
                log.warning("task %s is %s; not marking it %s", task_id, t.status, status)
                return False
            r = db.execute(
                "UPDATE a4ps_tasks SET status = %s, finished = %s, result = %s, error = %s "
                "WHERE id = %s AND (status <> 'running' OR owner = %s) RETURNING id",
                (status, time.time(), None if result is None else _jsonb(result), error,
                 task_id, self.worker_id)).fetchone()
            if r is None:
                log.warning("task %s is run by another worker now; not marking it %s",
                            task_id, status)
                return False
            return True

    def cancel(self, task_id: str, *, force: bool = False, reason: str | None = None) -> bool:
        """Cancel a task. Queued: cancelled at once. Running: flagged ``cancel_requested``
        for the worker that runs it (on whichever daemon), which stops and confirms with
        ``cancel(id, force=True)``. ``reason`` is kept as the task's error. Returns
        False if the task had already finished."""
        with self._tx() as db:
            t = self._get(db, task_id)
            if t.status in TERMINAL:
                return False
            if t.status == "queued" or force:
                db.execute("UPDATE a4ps_tasks SET status = 'cancelled', finished = %s, "
                           "cancel_requested = true, owner = NULL, "
                           "error = COALESCE(%s, error, 'cancelled') WHERE id = %s",
                           (time.time(), reason, task_id))
            else:
                db.execute("UPDATE a4ps_tasks SET cancel_requested = true WHERE id = %s",
                           (task_id,))
            return True

    def requeue(self, task_id: str, *, reason: str, by: str | None = None) -> bool:
        """Put a task this worker runs back in the queue without counting an attempt (it
        was stopped on purpose, e.g. a goal preempted by a user task); its checkpoint
        keeps what it finished. ``meta["preempted"]`` counts how often. False if this
        worker no longer runs it."""
        with self._tx() as db:
            t = self._get(db, task_id)
            if t.status != "running":
                return False
            meta = requeued_meta(t.meta, reason=reason, by=by)
            r = db.execute("UPDATE a4ps_tasks SET status = 'queued', started = NULL, "
                           "owner = NULL, cancel_requested = false, meta = %s "
                           "WHERE id = %s AND status = 'running' AND owner = %s RETURNING id",
                           (_jsonb(meta), task_id, self.worker_id)).fetchone()
        if r is None:
            return False
        self._wake_waiters()
        return True

    def interrupt(self, task_id: str) -> bool:
        """A graceful stop could not wait for this running task: mark it, so it is
        re-queued (by whichever daemon sweeps next) without counting an attempt and
        resumes from its checkpoint. False if this worker no longer runs it."""
        with self._tx() as db:
            return db.execute(
                "UPDATE a4ps_tasks SET interrupted = true WHERE id = %s AND status = 'running' "
                "AND owner = %s RETURNING id", (task_id, self.worker_id)).fetchone() is not None

    def running(self, *, all_daemons: bool = False) -> builtins.list[Task]:
        """The tasks this daemon runs, oldest first (what the SQLite queue's ``running``
        means on one machine); ``all_daemons``: every daemon's."""
        sql = f"SELECT {_COLS} FROM a4ps_tasks WHERE status = 'running'"
        args: tuple[Any, ...] = ()
        if not all_daemons:
            sql, args = sql + " AND owner = %s", (self.worker_id,)
        with self._tx() as db:
            return [_row(r) for r in db.execute(sql + " ORDER BY seq", args)]

    def get(self, task_id: str) -> Task:
        with self._tx() as db:
            return self._get(db, task_id)

    def list(self, status: str | Iterable[str] | None = None, limit: int = 50) -> builtins.list[Task]:
        """Newest first (every daemon's tasks), optionally only some statuses."""
        statuses = status_filter(status)
        sql, args = f"SELECT {_COLS} FROM a4ps_tasks", []
        if statuses:
            sql, args = sql + " WHERE status = ANY(%s)", [statuses]
        with self._tx() as db:
            return [_row(r) for r in db.execute(sql + " ORDER BY seq DESC LIMIT %s",
                                                (*args, int(limit)))]

    def pending_count(self, origin: str | None = None) -> int:
        """Queued tasks this daemon could run (user tasks and its own pinned ones)."""
        sql = ("SELECT COUNT(*) FROM a4ps_tasks WHERE status = 'queued' "
               "AND (pinned IS NULL OR pinned = %s)")
        args: list[Any] = [self.worker_name]
        if origin is not None:
            sql, args = sql + " AND origin = %s", args + [origin]
        with self._tx() as db:
            return int(db.execute(sql, args).fetchone()[0])

    def recover(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> builtins.list[Task]:
        """Call at daemon start: requeue the tasks of workers that are gone.

        Unlike the SQLite queue, running tasks of *live* daemons are left alone. Those
        of gone ones (their lock is free): a task a graceful stop marked
        (:meth:`interrupt`) goes back to ``queued`` as it was; one a crash left goes
        back with ``attempts + 1`` and fails after ``max_attempts`` of them; one whose
        cancel was requested ends ``cancelled``. The same sweep runs while
        :meth:`claim` waits.
        """
        self.max_attempts = max_attempts
        return self._sweep(max_attempts)

    def _sweep(self, max_attempts: int) -> builtins.list[Task]:
        self._last_sweep = time.monotonic()
        touched: list[Task] = []
        now = time.time()
        with self._tx() as db:
            owners = [r[0] for r in db.execute(
                "SELECT DISTINCT owner FROM a4ps_tasks WHERE status = 'running' "
                "AND owner <> %s", (self.worker_id,))]
            # a worker whose lock we can take has no session: it is dead. The
            # transaction-level lock keeps a second sweeper off until we commit.
            dead = [o for o in owners if db.execute(
                "SELECT pg_try_advisory_xact_lock(%s, %s::integer)", (_LOCK_NS, o)
            ).fetchone()[0]]
            if not dead:
                return []
            rows = db.execute(
                f"SELECT {_COLS} FROM a4ps_tasks WHERE status = 'running' "
                f"AND owner = ANY(%s) ORDER BY seq FOR UPDATE", (dead,)).fetchall()
            for t in map(_row, rows):
                r = recovery_for(t, max_attempts)
                db.execute(_RECOVER_SQL, (r.status, now if r.status != "queued" else None,
                                          r.status, r.attempts, int(r.clean), r.error, t.id))
                touched.append(self._get(db, t.id))
        if touched:
            log.info("requeued %d task(s) of stopped daemon(s): %s", len(touched),
                     [t.id for t in touched])
            self._wake_waiters()
        return touched

    def close(self) -> None:
        """Close the connections (which frees this worker's lock); claim() returns None."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            for conn in (self._db, self._live):
                try:
                    if conn is not None and not conn.closed:
                        conn.close()
                except Exception:
                    log.exception("closing a task queue connection failed")
