"""One writer per data directory: an exclusive ``flock`` on ``<data_dir>/daemon.lock``.

Whatever opens the living image for writing takes this lock first: the daemon, and
any command that works on the image in-process (``a4ps ask`` without a daemon,
``a4ps finetune`` offline, ``a4ps codex propose`` offline). The lock file says who
holds it (pid, what kind of process, the daemon's command address), so a refusal can
name the running daemon and where it listens.

The kernel drops the flock when the process dies (even by SIGKILL), so a stale lock
file from a dead process is simply taken over. ``flock`` locks belong to an open file
description: a second :class:`DataLock` on the same file in the same process is
refused too, so two Systems in one process cannot both write one image.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = "daemon.lock"


class DataLockHeld(RuntimeError):
    """Another process (or another part of this one) holds the data directory.

    ``holder`` is what the lock file says about it: ``pid``, ``kind`` ("daemon" or
    "in-process"), ``command_addr`` for a daemon, ``argv``."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def describe_holder(holder: dict[str, Any]) -> str:
    """'the a4ps daemon (pid 12, commands on tcp://127.0.0.1:5555)' or similar."""
    pid = holder.get("pid") or "unknown"
    if holder.get("kind") == "daemon":
        addr = holder.get("command_addr")
        return f"the a4ps daemon (pid {pid}" + (f", commands on {addr})" if addr else ")")
    what = holder.get("argv") or "another a4ps process"
    return f"{what} (pid {pid})"


class DataLock:
    """Exclusive lock on a data directory's ``daemon.lock``. See the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> DataLock:
        return cls(Path(data_dir) / LOCK_NAME)

    def acquire(self, kind: str = "in-process", **info: Any) -> DataLock:
        """Take the lock or raise :class:`DataLockHeld` naming the holder.

        ``kind``: "daemon" or "in-process"; ``info`` (e.g. ``command_addr``) is written
        into the lock file for the next one who finds it taken."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = self.holder_info()
            who = describe_holder(holder)
            pid = holder.get("pid")
            raise DataLockHeld(
                f"{who} is using {self.path.parent}: stop it first "
                f"(`kill {pid or '<pid>'}`) or use another data directory "
                "(--data-dir / A4PS_DATA_DIR)", holder) from None
        stale = self.holder()
        if stale and stale != os.getpid():
            log.info("taking over the stale lock of dead process pid %s", stale)
        record = {"pid": os.getpid(), "kind": kind, "since": time.time(),
                  "argv": " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]]), **info}
        os.ftruncate(fd, 0)
        # the pid alone on the first line (what older readers parse), then the details
        os.write(fd, f"{os.getpid()}\n{json.dumps(record)}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def holder_info(self) -> dict[str, Any]:
        """What the lock file says about its holder ({} when it says nothing)."""
        try:
            text = self.path.read_text()
        except OSError:
            return {}
        lines = text.splitlines()
        info: dict[str, Any] = {}
        if len(lines) > 1:
            try:
                info = json.loads(lines[1])
            except ValueError:
                info = {}
        if "pid" not in info and lines:
            try:
                info["pid"] = int(lines[0].strip() or 0) or None
            except ValueError:
                pass
        return info if isinstance(info, dict) else {}

    def holder(self) -> int | None:
        pid = self.holder_info().get("pid")
        return pid if isinstance(pid, int) and pid > 0 else None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
