"""The time-travel errors, apart from the TimeMachine, so the daemon can map them to
wire error codes without importing the snapshot machinery (tests/test_import_cost.py)."""
from __future__ import annotations


class SnapshotError(ValueError):
    """A time-travel request that cannot be done as asked; the message says why."""


class SnapshotNotFound(SnapshotError):
    """No snapshot has the id or name asked for."""


class SnapshotConflict(SnapshotError):
    """The request clashes with a snapshot that exists (a taken name, a busy restore)."""
