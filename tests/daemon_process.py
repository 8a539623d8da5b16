"""The one test helper that runs ``python -m a4ps daemon`` as a real subprocess.

Used by the daemon, recovery and UI tests (before, each had its own, with different
environments and grace periods). Settings come from ``A4PS_*`` variables, so the
test and the daemon read the same ones. Defaults: the scripted chat stand-in, the
hash embedding stand-in, the background services off (no self-set goal runs between
a test's steps), heartbeats every 0.5 s; pass ``services=True``,
``embeddings=None`` (the configured embedder) or ``env`` to change them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Sequence
from unittest import mock

from a4ps.client import DaemonClient, DaemonUnavailable
from a4ps.config import PROJECT_ROOT, Settings, load_settings
from a4ps.ui.launch import stop_daemon
from ports import free_addr


class DaemonProcess:
    """A daemon subprocess on ``data_dir`` and two addresses (free ones by default).

    ``start()`` spawns it and waits until it answers ``system.ping``; ``spawn()`` only
    spawns it. ``stop()`` is graceful (SIGTERM, then SIGKILL after ``grace``),
    ``kill()`` is SIGKILL; ``restart()`` keeps the data dir and addresses.
    """

    def __init__(self, data_dir: Path | str, command_addr: str | None = None,
                 event_addr: str | None = None, *, grace: float = 20.0,
                 services: bool = False, embeddings: str | None = "hash",
                 env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], Any] | None = None,
                 args: Sequence[str] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.args = list(args)         # more `a4ps daemon` flags (e.g. --from-snapshot)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.grace = grace
        self.preexec_fn = preexec_fn
        self.env = {**os.environ, "A4PS_DATA_DIR": str(self.data_dir),
                    "A4PS_BUS__COMMAND_ADDR": command_addr or free_addr(),
                    "A4PS_BUS__EVENT_ADDR": event_addr or free_addr(),
                    "A4PS_BUS__HEARTBEAT_INTERVAL_S": "0.5",
                    "A4PS_MODELS__BACKEND": "scripted",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if embeddings:
            self.env["A4PS_MODELS__EMBEDDING_BACKEND"] = embeddings
        if not services:
            for part in ("CURATOR", "MOTIVATOR", "PHILOSOPHER"):
                self.env[f"A4PS_{part}__ENABLED"] = "false"
        self.env.update(env or {})
        keys = {k: v for k, v in self.env.items() if k.startswith("A4PS_")}
        with mock.patch.dict(os.environ, keys):
            self.settings: Settings = load_settings()     # as the daemon sees them
        self.log_path = self.data_dir.parent / f"daemon-{time.time_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.boot_id: str | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def spawn(self) -> DaemonProcess:
        self.log = open(self.log_path, "ab")     # closed by stop()/kill(); the child has its own
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "a4ps", "daemon", "--grace", str(self.grace), *self.args],
            cwd=PROJECT_ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn)
        return self

    def wait_ready(self, timeout: float = 120.0) -> DaemonProcess:
        assert self.proc is not None, "spawn() the daemon first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            if self.settings.token_path.exists():
                try:
                    with self.client(timeout=1.0) as c:
                        self.boot_id = c.request("system.ping", timeout=1.0)["boot_id"]
                    return self
                except DaemonUnavailable:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.output()}")

    def start(self, timeout: float = 120.0) -> DaemonProcess:
        self.spawn()
        try:
            return self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float | None = None) -> int | None:
        """Its exit status (None if it was not running)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_daemon(proc, grace_s=self.grace * 3 if timeout is None else timeout)
        if self.log is not None:
            self.log.close()
        return None if proc is None else proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.log is not None:
            self.log.close()

    def restart(self, timeout: float = 120.0) -> DaemonProcess:
        self.stop()
        return self.start(timeout)

    # -- talking to it -----------------------------------------------------------------
    def client(self, timeout: float = 30.0) -> DaemonClient:
        return DaemonClient.from_settings(self.settings, timeout=timeout)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.output()[-n:]
