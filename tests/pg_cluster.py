"""A throwaway PostgreSQL cluster for tests and benchmarks: the real server, in a temp dir.

    with PostgresCluster() as pg:
        dsn = pg.create_database("t1")      # postgresql://a4ps@127.0.0.1:PORT/t1

Finds the server binaries in ``A4PS_TEST_PG_BIN``, the newest
``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql`` package) or ``PATH``. PostgreSQL
refuses to run as root, so as root the cluster directory is given to the ``postgres``
user (which Debian's package creates) and the server runs as that user through
``runuser``. It listens on 127.0.0.1 on a free port, trusts local connections, and is
stopped (fast) and deleted on exit. A small watcher process stops and deletes it too
if the process that started it dies without cleaning up (a killed test run).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ports import free_port

SUPERUSER = "a4ps"

# Runs detached: when the owner pid is gone, stop the cluster and delete its directory.
_WATCHER = r"""
import os, shutil, subprocess, sys, time
owner, root, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
while True:
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        break
    if not os.path.isdir(root):
        sys.exit(0)
    time.sleep(0.5)
subprocess.run(cmd, capture_output=True, timeout=60)
shutil.rmtree(root, ignore_errors=True)
"""


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here; the message says how to install them."""


def find_bin_dir() -> Path:
    env = os.environ.get("A4PS_TEST_PG_BIN")
    if env:
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, postgres) found: install them (Debian: "
        "`apt-get install postgresql`) or set A4PS_TEST_PG_BIN to their directory")


class PostgresCluster:
    """initdb + pg_ctl start in a temp dir; ``stop()`` removes everything."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.bin_dir = find_bin_dir()
        self.fsync = fsync          # off for tests (the server is never killed); on for benches
        self.root: Path | None = None
        self.port: int | None = None
        self._as_postgres = os.geteuid() == 0
        self._watcher: subprocess.Popen | None = None

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        return ["runuser", "-u", "postgres", "--", *cmd] if self._as_postgres else cmd

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run(self._cmd(*args), capture_output=True, text=True,
                             timeout=timeout, cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): "
                               f"{(out.stdout + out.stderr)[-2000:]}")
        return out

    @property
    def data(self) -> Path:
        assert self.root is not None, "start() first"
        return self.root / "data"

    def start(self) -> "PostgresCluster":
        self.root = Path(tempfile.mkdtemp(prefix="a4ps-pg-"))
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        try:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                      "-E", "UTF8", "--no-sync", "--no-instructions")
            self.port = free_port()
            opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                    f"-c unix_socket_directories={self.root} -c max_connections=100 "
                    f"-c fsync={'on' if self.fsync else 'off'} "
                    f"-c synchronous_commit={'on' if self.fsync else 'off'}")
            self._watcher = subprocess.Popen(
                [sys.executable, "-c", _WATCHER, str(os.getpid()), str(self.root),
                 *self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")],
                start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                      "-o", opts, "-w", "-t", "60", "start")
        except BaseException:
            self.stop()
            raise
        return self

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its DSN."""
        import psycopg
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if self.root is None:
            return
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop",
                          timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
        if self._watcher is not None:        # it sees the directory gone and exits
            try:
                self._watcher.wait(5)
            except subprocess.TimeoutExpired:
                self._watcher.kill()
                self._watcher.wait(5)
            self._watcher = None

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
