"""Open the task queue ``settings.tasks.queue`` names (SQLite file or PostgreSQL URL).

Its own module so :mod:`a4ps.tasks` (the seam + SQLite queue) and
:mod:`a4ps.tasks_postgres` (which builds on the seam's types) do not import each other;
psycopg stays lazy inside ``PostgresTaskQueue``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .tasks import SqliteTaskQueue, TaskQueue
from .tasks_postgres import PostgresTaskQueue, default_worker_name

if TYPE_CHECKING:
    from .config import Settings
    from .events import Bus

log = logging.getLogger(__name__)


def open_task_queue(settings: Settings, bus: Bus | None = None) -> TaskQueue:
    """The queue ``settings.tasks.queue`` names: ``"sqlite"`` or a PostgreSQL URL."""
    url = settings.tasks.queue
    if url.startswith(("postgres://", "postgresql://")):
        if settings.cognition.checkpointer == "sqlite":
            log.warning("tasks.queue is shared but cognition.checkpointer is this "
                        "daemon's SQLite file: a task requeued from a crashed daemon "
                        "starts over on another instead of resuming; set "
                        "cognition.checkpointer to the PostgreSQL URL too")
        return PostgresTaskQueue(url, bus=bus, worker_name=settings.tasks.worker_name
                                 or default_worker_name(settings.data_dir))
    return SqliteTaskQueue(settings.tasks_path, bus=bus)
