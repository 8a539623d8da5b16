"""Where graph checkpoints live when they outgrow one machine: PostgreSQL.

``cognition.checkpointer = "postgres://user:pass@host/db"`` puts every task's
checkpoints in that database (LangGraph's ``PostgresSaver``), so a task started by one
daemon can resume on another after a crash, and several daemons keep their
checkpoints in one place. The default, ``"sqlite"``, keeps them in
``<data_dir>/checkpoints/graph.sqlite`` (see :class:`~a4ps.cognition.graph.CognitiveGraph`).

psycopg and the saver are imported only here, only when a Postgres URL is configured.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeGuard

from a4ps.config import redact_url as redact

if TYPE_CHECKING:
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

POSTGRES_SCHEMES = ("postgres://", "postgresql://")
_SETUP_LOCK = 0x0A4B6      # advisory-lock namespace for creating the checkpoint tables
_SETUP_WAIT_S = 120.0


class CheckpointStoreError(RuntimeError):
    """The checkpoint database cannot be used; the message says what to do."""


def is_postgres_url(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(POSTGRES_SCHEMES)


def postgres_saver(url: str, *, connect_timeout_s: float = 10.0
                   ) -> tuple[PostgresSaver, ConnectionPool[Connection[DictRow]]]:
    """(a set-up ``PostgresSaver``, the pool to close) on the database at ``url``.

    A small pool that checks each connection before use, so a database restart costs
    one reconnect instead of a dead daemon. Tables are created on first use.
    """
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool

    kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": 0,
                              "row_factory": dict_row,
                              "connect_timeout": max(1, int(connect_timeout_s))}

    def connect() -> psycopg.Connection[DictRow]:
        """One connection with the pool's own options (the same ``kwargs``)."""
        conn: psycopg.Connection[DictRow] = psycopg.connect(url, **kwargs)
        return conn

    try:    # one plain connection first: a refusal is immediate and says why
        connect().close()
    except psycopg.Error as e:
        raise CheckpointStoreError(
            f"cannot reach PostgreSQL for graph checkpoints at {redact(url)}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; "
            f"is the server running and the database created? (or set "
            f"cognition.checkpointer = \"sqlite\")") from e
    pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
        url, min_size=1, max_size=2, open=False, name="a4ps-checkpoints",
        check=ConnectionPool.check_connection, kwargs=kwargs)
    try:
        pool.open(wait=True, timeout=connect_timeout_s)
        saver = PostgresSaver(pool)
        # The saver's migrations are not safe to run twice at once (two daemons
        # starting together): one at a time, under a session advisory lock. Polled, not
        # waited for in SQL: a migration builds an index CONCURRENTLY, which waits for
        # every open transaction, so a waiter blocked inside SELECT would deadlock it.
        with connect() as guard:
            deadline = time.monotonic() + _SETUP_WAIT_S

            def locked() -> bool:
                row = guard.execute("SELECT pg_try_advisory_lock(%s, 1) AS got",
                                    (_SETUP_LOCK,)).fetchone()
                return bool(row and row["got"])

            while not locked():
                if time.monotonic() > deadline:
                    raise CheckpointStoreError(
                        f"another process has been creating the checkpoint tables for "
                        f"over {_SETUP_WAIT_S:g}s; check the database's activity")
                time.sleep(0.05)
            saver.setup()
    except Exception as e:
        pool.close()
        raise CheckpointStoreError(
            f"graph checkpoints at {redact(url)} cannot be used: {e}") from e
    return saver, pool
