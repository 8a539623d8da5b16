"""Ledger: the motivator's limits, kept on disk so a restart does not reset them.

The goals-per-hour rate, the daily budget of self-generated work, which tasks were
already reflected on, which goal texts were recently queued, and the pause all lived
in memory: a daemon restart (or a crash loop) gave the system a fresh budget and
silently un-paused it. Here they are rows in a small SQLite file
(``<data_dir>/motivator.sqlite``; WAL, every write committed before it returns).

Times are whatever clock the motivator uses (``time.time`` in production, a fake one
in tests), so the ledger never mixes clocks.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spends (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,          -- goal | reflection | goal_text
    at REAL NOT NULL,
    ref TEXT                     -- reflected task id, or a goal text's key
);
CREATE INDEX IF NOT EXISTS spends_kind_at ON spends (kind, at);
CREATE TABLE IF NOT EXISTS flags (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class Ledger:
    """Durable spends and flags. ``path=None`` keeps them in memory (unit tests)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        target = ":memory:"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target = str(self.path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(target, timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise RuntimeError(f"motivator ledger {target} cannot be opened ({e}); move it "
                               f"aside and restart (the rate limits then start afresh)") from e

    def record(self, kind: str, at: float, ref: str | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO spends (kind, at, ref) VALUES (?, ?, ?)",
                             (kind, float(at), ref))

    def times(self, kind: str, since: float) -> list[float]:
        """When ``kind`` was spent at or after ``since``, oldest first."""
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT at FROM spends WHERE kind = ? AND at >= ? ORDER BY at", (kind, since))]

    def refs(self, kind: str, since: float | None = None) -> set[str]:
        sql = "SELECT ref FROM spends WHERE kind = ? AND ref IS NOT NULL"
        args: list[str | float] = [kind]
        if since is not None:
            sql += " AND at >= ?"
            args.append(since)
        with self._lock:
            return {r[0] for r in self._db.execute(sql, args)}

    def prune(self, kind: str, before: float) -> None:
        with self._lock:
            self._db.execute("DELETE FROM spends WHERE kind = ? AND at < ?", (kind, before))

    def get_flag(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM flags WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_flag(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT INTO flags (key, value) VALUES (?, ?) ON CONFLICT(key) "
                             "DO UPDATE SET value = excluded.value", (key, json.dumps(value)))

    def close(self) -> None:
        with self._lock:
            self._db.close()
