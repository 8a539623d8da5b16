"""Run untrusted Python inside gVisor, and nowhere else.

Two backends share one interface (:class:`Sandbox`): ``run`` (a script; what happened)
and ``call`` (a tool's function on a list of argument sets; its outputs, as data).

* ``runsc`` (default): ``runsc run`` on an OCI bundle we write per run. The guest sees
  an allowlisted root (``/usr``, ``/lib*``, ``/bin`` and the interpreter's prefix, all
  read-only), the run's input files read-only at ``/in``, a size-limited tmpfs
  ``/work`` (``sandbox.disk_mb``: a full disk is ENOSPC, reported as ``disk``) and a
  small tmpfs ``/tmp``. Nothing the guest writes reaches the host's disk. The network
  is ``none`` (always with ``--rootless``, which otherwise uses host networking), the
  environment is a short fixed list.
* ``docker``: the same bundle shape through the Docker SDK with ``runtime="runsc"``,
  for users who run Docker with gVisor (image: ``sandbox/Dockerfile``).

Inside, :mod:`a4ps.tools.guest` is PID 1: a supervisor (guest root, capabilities
SETUID/SETGID/KILL only) forks the workload, which drops to uid 65534 with no
capabilities and RLIMIT_CPU / RLIMIT_NPROC on itself (gVisor enforces both: SIGXCPU at
the CPU limit, EAGAIN from fork). The supervisor measures the workload (``wait4``: CPU
time and peak RSS, measured, never the limit), kills what is left, and writes one
report that carries a per-run nonce the workload cannot read. The host accepts only
that report: a tool cannot forge its outputs' framing, its exit status or its usage.

Memory: runsc runs the sandbox in a memory cgroup the daemon creates per run (cgroup
v1, as root), so its OOM-kill count and CPU usage can be read after runsc exits:
``memory`` is reported only on OOM evidence (or a MemoryError), never for a workload
that sent itself SIGKILL. Without such a cgroup (not root, cgroup v2) runsc manages
the cgroup itself and a whole-sandbox kill is reported without a cause. The cgroup's
CPU usage (gVisor's own overhead included) is ``sandbox_cpu_s``, and a backstop ends
a run whose total exceeds ``2 * cpu_time_s + 1`` (each process has its own RLIMIT_CPU,
so forked burners would otherwise add up). Output is capped while it streams.

Availability is probed once per process and per runsc binary (:func:`probe_cache_clear`
forgets). When no backend works, :attr:`Sandbox.available` is false,
:attr:`Sandbox.reason` says why and what to do, and every run raises
:class:`SandboxUnavailable`: generated code never runs on the host.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel

from a4ps.tools.guest import MARK

if TYPE_CHECKING:
    from a4ps.config import SandboxSettings, Settings

log = logging.getLogger(__name__)

WORKDIR = "/work"               # the guest's working directory (tmpfs, size-limited)
INDIR = "/in"                   # the run's input files, read-only
MAIN = "main.py"                # the script's file name in the working directory
TOOL_FILE = "tool.py"
TESTS_FILE = "test_tool.py"
TMP_MB = 16                     # the guest's /tmp
GUEST_UID = 65534               # the workload runs as nobody
_SIGXCPU = int(signal.SIGXCPU)
_SIGKILL = int(signal.SIGKILL)
_RESERVED = {".nonce", "calls.json"}

_GUEST_ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "LC_ALL=C.UTF-8",
              f"HOME={WORKDIR}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONIOENCODING=utf-8"]
_GUEST_CAPS = ["CAP_SETUID", "CAP_SETGID", "CAP_KILL"]   # the supervisor's, dropped by the workload


def guest_source() -> str:
    """The text of :mod:`a4ps.tools.guest`, which runs inside the sandbox."""
    return (Path(__file__).resolve().parent / "guest.py").read_text(encoding="utf-8")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code in it); the message says what to check."""


class SandboxUnavailable(SandboxError):
    """No sandbox backend works here; nothing was run."""


class SandboxResult(BaseModel):
    """What a run produced. ``limit_hit`` names the limit that ended it, if any."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: int | None = None        # the signal that ended the workload, if one did
    timed_out: bool = False
    limit_hit: str | None = None     # wall_time | cpu_time | memory | disk | pids | output
    wall_s: float = 0.0
    cpu_s: float | None = None       # the workload's CPU time, measured in the guest
    sandbox_cpu_s: float | None = None  # the whole sandbox's (gVisor included), host cgroup
    max_rss_kb: int | None = None
    disk_used_bytes: int | None = None  # the work directory's use at the end
    reported: bool = False           # the guest supervisor's report arrived
    backend: str = ""
    files: dict[str, str] = {}       # working-directory files asked for with ``collect``

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit_hit is None and self.reported

    def summary(self) -> str:
        cpu = "?" if self.cpu_s is None else f"{self.cpu_s:.2f}s"
        sig = f" (signal {self.signal})" if self.signal else ""
        return (f"exit {self.exit_code}{sig}, timed out: {'yes' if self.timed_out else 'no'}, "
                f"limit hit: {self.limit_hit or 'none'}, wall {self.wall_s:.2f}s, cpu {cpu}"
                f" ({self.backend})")


class CallOutput(BaseModel):
    """One output of a tool: its JSON value, or the exception it raised."""

    ok: bool
    value: Any = None
    error: str | None = None
    traceback: str = ""


class CallResult(SandboxResult):
    """The outputs of :meth:`Sandbox.call`: ``outputs[i]`` is None when the workload
    ended before producing output ``i``. ``problems`` lists anything wrong with the
    channel itself (a tool writing its own records shows up here)."""

    outputs: list[CallOutput | None] = []
    tests: dict[str, CallOutput] = {}
    import_error: CallOutput | None = None
    problems: list[str] = []


@dataclass(frozen=True)
class Limits:
    wall_time_s: float
    cpu_time_s: int
    memory_mb: int
    max_pids: int
    max_output_bytes: int
    disk_mb: int = 64

    @classmethod
    def from_settings(cls, s: SandboxSettings) -> Limits:
        return cls(s.wall_time_s, s.cpu_time_s, s.memory_mb, s.max_pids, s.max_output_bytes,
                   s.disk_mb)

    @property
    def cpu_total_cap_s(self) -> float:
        """The whole sandbox's CPU backstop (see the module docstring)."""
        return 2.0 * self.cpu_time_s + 1.0

    @property
    def report_cap(self) -> int:
        return 4 * self.max_output_bytes


@dataclass
class _Job:
    """What the guest's workload does: run main.py, or call a tool."""

    mode: str = "script"                 # script | calls
    collect: list[str] = field(default_factory=list)
    name: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)

    def config(self, lim: Limits) -> dict[str, Any]:
        return {"mode": self.mode, "uid": GUEST_UID, "cpu_s": lim.cpu_time_s,
                "nproc": lim.max_pids, "value_cap": lim.max_output_bytes,
                "report_cap": lim.report_cap, "collect": list(self.collect),
                "name": self.name, "tests": list(self.tests), "main": MAIN}


# -- shared helpers ------------------------------------------------------------------

def _check_names(files: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, text in files.items():
        p = Path(name)
        if p.is_absolute() or ".." in p.parts or not p.parts or name in _RESERVED:
            raise ValueError(f"sandbox file name {name!r} must be relative, inside the "
                             f"working directory, and not one of {sorted(_RESERVED)}")
        out[str(p)] = text if isinstance(text, str) else str(text)
    return out


def _check_files(code: str, files: dict[str, str] | None) -> dict[str, str]:
    if not isinstance(code, str):
        raise ValueError("sandbox code must be a string")
    if MAIN in (files or {}):
        raise ValueError(f"sandbox file name {MAIN!r} is the script itself")
    return {MAIN: code, **_check_names(files or {})}


def _write_inputs(in_dir: Path, files: dict[str, str], nonce: str,
                  calls: list[dict[str, Any]]) -> None:
    """The run's read-only inputs; the nonce file is readable by guest root only."""
    in_dir.mkdir(parents=True)
    for name, text in files.items():
        path = in_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (in_dir / "calls.json").write_text(json.dumps(calls), encoding="utf-8")
    nonce_file = in_dir / ".nonce"
    nonce_file.write_text(nonce, encoding="ascii")
    for dirpath, _, filenames in os.walk(in_dir):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    os.chmod(nonce_file, 0o400)


def _take_report(stderr: str, nonce: str) -> tuple[str, dict[str, Any] | None]:
    """(stderr without the report, the report) — only a line with ``nonce`` counts."""
    key = f"{MARK}{nonce} "
    idx = stderr.rfind(key)
    if idx < 0:
        return stderr, None
    end = stderr.find("\n", idx)
    line = stderr[idx + len(key): end if end >= 0 else None]
    start = idx - 1 if idx > 0 and stderr[idx - 1] == "\n" else idx
    cleaned = stderr[:start] + (stderr[end + 1:] if end >= 0 else "")
    try:
        report = json.loads(line)
    except ValueError:
        return cleaned, None
    return cleaned, report if isinstance(report, dict) else None


_ENOSPC = re.compile(r"\[Errno 28\]|No space left on device")
_EAGAIN = re.compile(r"(BlockingIOError|OSError): \[Errno 11\]")


def _classify(*, exit_code: int | None, sig: int | None, timed_out: bool, output_hit: bool,
              cpu_backstop: bool, oom: bool, disk_full: bool, stderr: str,
              cpu_s: float | None, limits: Limits) -> str | None:
    if output_hit:
        return "output"
    if cpu_backstop:
        return "cpu_time"
    if timed_out:
        return "wall_time"
    if oom:
        return "memory"          # OOM evidence from the sandbox's cgroup
    if sig == _SIGXCPU:
        return "cpu_time"
    if sig == _SIGKILL and cpu_s is not None and cpu_s >= limits.cpu_time_s:
        return "cpu_time"        # the hard RLIMIT_CPU after an ignored SIGXCPU
    if exit_code not in (0, None):
        tail = stderr[-2000:]
        if "MemoryError" in tail:
            return "memory"
        if disk_full or _ENOSPC.search(tail):
            return "disk"
        if _EAGAIN.search(tail):
            return "pids"
    return None


def _call_result(res: SandboxResult, report: dict[str, Any] | None, n_calls: int,
                 tests: list[str]) -> CallResult:
    """Sort the guest's records into outputs; flag anything odd about the channel."""
    out = CallResult(**res.model_dump(), outputs=[None] * n_calls)
    if report is None:
        out.problems.append("no report from the sandbox's supervisor"
                            + (f" ({res.limit_hit})" if res.limit_hit else ""))
        return out
    if report.get("garbled"):
        out.problems.append(f"{report['garbled']} unreadable record(s) on the output channel")
    if report.get("truncated"):
        out.problems.append("the outputs exceeded the report limit and were cut")
    seen: set[tuple[str, Any]] = set()
    for rec in report.get("records") or []:
        kind = rec.get("kind")
        key = (kind, rec.get("i") if kind == "call" else rec.get("name"))
        try:
            value = CallOutput(ok=bool(rec.get("ok")), value=rec.get("value"),
                               error=None if rec.get("ok") else str(rec.get("error") or "failed"),
                               traceback=str(rec.get("traceback") or ""))
        except Exception:
            out.problems.append(f"an unreadable {kind} record")
            continue
        if key in seen:
            out.problems.append(f"more than one output for {kind} {key[1]!r}: "
                                f"something besides the harness wrote to its channel")
            if kind == "call" and isinstance(key[1], int) and 0 <= key[1] < n_calls:
                out.outputs[key[1]] = CallOutput(ok=False, error="more than one output reported")
            continue
        seen.add(key)
        if kind == "call" and isinstance(rec.get("i"), int) and 0 <= rec["i"] < n_calls:
            out.outputs[rec["i"]] = value
        elif kind == "test" and (rec.get("name") in tests or rec.get("name") == "import test_tool"):
            out.tests[str(rec["name"])] = value
        elif kind == "import":
            out.import_error = value
        else:
            out.problems.append(f"an unexpected record: {str(rec)[:120]}")
    return out


def _call_item(call: Any) -> dict[str, Any]:
    if isinstance(call, dict):
        return {"a": [], "k": dict(call)}
    if isinstance(call, tuple) and len(call) == 2:
        args, kwargs = call
        return {"a": list(args), "k": dict(kwargs)}
    raise ValueError("a tool call is a mapping of keyword arguments or (positional, keywords)")


def _python_candidates(settings_python: str | None) -> list[str]:
    if settings_python:
        return [settings_python]
    cands = ["/usr/bin/python3"]
    base = getattr(sys, "_base_executable", None) or sys.executable
    cands.append(base)
    return cands


def _real_interpreter(settings_python: str | None) -> tuple[str | None, str]:
    """The interpreter's real path (a pyenv shim re-execs through bash: slow, and
    needs the home directory the sandbox hides)."""
    tried = []
    for cand in _python_candidates(settings_python):
        path = shutil.which(cand) if os.sep not in cand else cand
        if path:
            real = os.path.realpath(path)
            if os.path.isfile(real) and os.access(real, os.X_OK) and "shims" not in real:
                return real, ""
        tried.append(cand)
    return None, f"no Python interpreter for the sandbox (tried {tried}): set sandbox.python"


# -- availability, probed once per process and runsc binary ----------------------------

_probe_lock = threading.RLock()     # re-entered by a probe's own run
_probes: dict[tuple[Any, ...], str] = {}


def _binary_key(path: str, python: str | None) -> tuple[Any, ...]:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        return (real, st.st_mtime_ns, st.st_size, python)
    except OSError:
        return (real, None, None, python)


def probe_cache_clear() -> None:
    """Forget every probe result (after installing or replacing runsc)."""
    with _probe_lock:
        _probes.clear()


# -- the interface -------------------------------------------------------------------

@runtime_checkable
class SandboxRunner(Protocol):
    """The sandbox seam the registry, the forge and the CLI use (:class:`Sandbox` and
    its runsc/docker backends implement it)."""

    @property
    def available(self) -> bool: ...

    @property
    def reason(self) -> str: ...

    def run(self, code: str, *, files: dict[str, str] | None = None,
            timeout: float | None = None, collect: list[str] | None = None) -> SandboxResult: ...

    def call(self, source: str, name: str, calls: list[Any], *,
             tests: str = "", test_names: list[str] | None = None,
             timeout: float | None = None) -> CallResult: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class Sandbox(ABC):
    """A place to run untrusted Python. Subclasses implement :meth:`_execute`."""

    backend = "none"

    def __init__(self, limits: Limits, reason: str = "") -> None:
        self.limits = limits
        self._reason = reason

    @property
    def available(self) -> bool:
        return not self.reason

    @property
    def reason(self) -> str:
        return self._reason

    def _ready(self) -> None:
        """Raise SandboxUnavailable when a run cannot start (without probing)."""
        if self._reason:
            raise SandboxUnavailable(f"sandbox unavailable: {self._reason}")

    def _wall(self, timeout: float | None) -> float:
        wall = float(timeout) if timeout is not None else self.limits.wall_time_s
        if wall <= 0:
            raise ValueError("sandbox timeout must be positive")
        return wall

    def run(self, code: str, *, files: dict[str, str] | None = None,
            timeout: float | None = None, collect: list[str] | None = None) -> SandboxResult:
        """Run ``code`` as main.py in a fresh working directory holding ``files``.

        ``timeout`` (seconds) replaces the wall-time limit for this run; ``collect``
        names working-directory files to return in ``result.files``.
        """
        all_files = _check_files(code, files)
        wall = self._wall(timeout)
        self._ready()
        res, _ = self._execute(all_files, wall, _Job(collect=list(collect or [])))
        return res

    def call(self, source: str, name: str, calls: list[Any], *,
             tests: str = "", test_names: list[str] | None = None,
             timeout: float | None = None) -> CallResult:
        """Call ``name`` from ``source`` once per argument set in ``calls``, in one run.

        Each call is a mapping of keyword arguments or a ``(positional, keywords)``
        pair. Returns the tool's outputs (JSON values or exceptions), never a verdict:
        the caller compares them with what it expected, outside the sandbox. ``tests``
        is a test module whose ``test_names`` functions are run after the calls.
        """
        if not isinstance(source, str):
            raise ValueError("tool source must be a string")
        if not name.isidentifier():
            raise ValueError(f"tool name {name!r} is not a Python identifier")
        calls = [_call_item(c) for c in calls]
        try:
            json.dumps(calls)
        except (TypeError, ValueError) as e:
            raise ValueError(f"tool arguments must be JSON data: {e}") from None
        names = list(test_names or [])
        files = {TOOL_FILE: source}
        if tests.strip() and names:
            files[TESTS_FILE] = tests
        wall = self._wall(timeout)
        self._ready()
        res, report = self._execute(files, wall, _Job(mode="calls", name=name, calls=calls,
                                                      tests=names if TESTS_FILE in files else []))
        return _call_result(res, report, len(calls), names)

    @abstractmethod
    def _execute(self, files: dict[str, str], wall: float,
                 job: _Job) -> tuple[SandboxResult, dict[str, Any] | None]:
        """Run ``job`` on ``files`` inside the backend's sandbox; (result, guest report)."""

    def close(self) -> None:
        """Release backend resources (temporary directories, clients)."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "available": self.available, "reason": self.reason,
                "limits": self.limits.__dict__}


class UnavailableSandbox(Sandbox):
    """Stands in when no backend can be built; every run raises."""

    def __init__(self, limits: Limits, reason: str, backend: str = "none") -> None:
        super().__init__(limits, reason or "no sandbox backend")
        self.backend = backend

    def _execute(self, files: dict[str, str], wall: float,
                 job: _Job) -> tuple[SandboxResult, dict[str, Any] | None]:
        raise SandboxUnavailable(f"sandbox unavailable: {self.reason}")


def _finish(*, stdout: str, stderr_raw: str, nonce: str, code: int | None, timed_out: bool,
            output_hit: bool, cpu_backstop: bool, oom: bool, wall_s: float,
            sandbox_cpu_s: float | None, limits: Limits,
            backend: str) -> tuple[SandboxResult, dict[str, Any] | None]:
    """Turn what came out of a run into a SandboxResult (both backends)."""
    stderr, report = _take_report(stderr_raw, nonce)
    if len(stderr) > limits.max_output_bytes:
        stderr, output_hit = stderr[: limits.max_output_bytes], True
    rep = report or {}
    sig = rep.get("signal") if report else None
    cpu_s = rep.get("cpu_s") if report else None
    exit_code = rep.get("exit") if report else code
    limit = _classify(exit_code=exit_code, sig=sig, timed_out=timed_out, output_hit=output_hit,
                      cpu_backstop=cpu_backstop, oom=oom, disk_full=bool(rep.get("disk_full")),
                      stderr=stderr, cpu_s=cpu_s, limits=limits)
    if report is None and not (timed_out or output_hit or cpu_backstop):
        stderr += (f"\n[sandbox] the sandbox ended (exit {code}) without its supervisor's "
                   f"report{': out of memory' if oom else ''}\n")
    files = rep.get("files")
    if not isinstance(files, dict):
        files = {}
    res = SandboxResult(stdout=stdout, stderr=stderr, exit_code=exit_code, signal=sig,
                        timed_out=timed_out, limit_hit=limit, wall_s=round(wall_s, 4),
                        cpu_s=cpu_s, sandbox_cpu_s=sandbox_cpu_s,
                        max_rss_kb=rep.get("max_rss_kb"), disk_used_bytes=rep.get("disk_used_bytes"),
                        reported=report is not None, backend=backend,
                        files={str(k): str(v) for k, v in files.items()})
    return res, report


# -- the per-run host cgroup -----------------------------------------------------------

def _cgroup_v1_mounts() -> dict[str, str]:
    """controller -> mount point of the cgroup v1 hierarchy holding it."""
    mounts: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return mounts
    for line in lines:
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3 or rparts[0] != "cgroup":
            continue
        for opt in rparts[2].split(","):
            if opt in ("memory", "cpuacct"):
                mounts.setdefault(opt, parts[4])
    return mounts


class _HostCgroup:
    """A memory + cpuacct cgroup (v1) the daemon creates for one run.

    runsc uses a pre-existing cgroup as given and leaves it in place when it exits (it
    removes only what it created), so the memory limit is set here and the OOM-kill
    count and CPU usage can be read after the sandbox is gone; then it is removed.
    """

    def __init__(self, path: str, dirs: dict[str, Path]) -> None:
        self.path = path            # the OCI cgroupsPath
        self.dirs = dirs

    @classmethod
    def create(cls, name: str, memory_bytes: int) -> _HostCgroup | None:
        if os.geteuid() != 0:
            return None
        mounts = _cgroup_v1_mounts()
        if "memory" not in mounts or "cpuacct" not in mounts:
            return None
        dirs: dict[str, Path] = {}
        try:
            for ctl in ("memory", "cpuacct"):
                d = Path(mounts[ctl]) / name
                if d not in dirs.values():
                    d.mkdir()
                dirs[ctl] = d
            (dirs["memory"] / "memory.limit_in_bytes").write_text(str(memory_bytes))
            memsw = dirs["memory"] / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(memory_bytes))
        except OSError as e:
            log.debug("no per-run cgroup (%s): runsc manages its own", e)
            cls(f"/{name}", dirs).remove()
            return None
        return cls(f"/{name}", dirs)

    def cpu_seconds(self) -> float | None:
        try:
            return int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError, KeyError):
            return None

    def oom_kills(self) -> int:
        try:
            text = (self.dirs["memory"] / "memory.oom_control").read_text()
        except (OSError, KeyError):
            return 0
        m = re.search(r"^oom_kill (\d+)", text, re.M)
        return int(m.group(1)) if m else 0

    @staticmethod
    def sweep(older_than_s: float = 600.0) -> int:
        """Remove empty per-run cgroups a killed daemon left behind; returns the count."""
        if os.geteuid() != 0:
            return 0
        removed = 0
        now = time.time()
        for mount in set(_cgroup_v1_mounts().values()):
            for d in Path(mount).glob("a4ps-*"):
                try:
                    if now - d.stat().st_ctime < older_than_s or (d / "cgroup.procs").read_text().strip():
                        continue
                    d.rmdir()
                    removed += 1
                except OSError:
                    continue
        return removed

    def remove(self) -> None:
        for d in set(self.dirs.values()):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:         # busy for a moment while the last task exits
                    time.sleep(0.02)


def _sweep_bases(parent: Path) -> int:
    """Remove sandbox directories whose owning process is gone (a killed daemon)."""
    removed = 0
    for d in parent.glob("a4ps-sandbox-*"):
        try:
            pid = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue                # not ours to judge (no owner recorded)
        try:
            os.kill(pid, 0)
            continue                # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


# -- runsc direct ----------------------------------------------------------------------

_SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin")


class RunscSandbox(Sandbox):
    """``runsc run`` on a per-run OCI bundle (see the module docstring)."""

    backend = "runsc"

    def __init__(self, limits: Limits, *, runsc: str = "runsc", python: str | None = None,
                 base_dir: str | Path | None = None, probe: bool = True) -> None:
        super().__init__(limits)
        self._runsc = shutil.which(runsc) if os.sep not in runsc else (runsc if os.access(runsc, os.X_OK) else None)
        self._python, py_reason = _real_interpreter(python)
        self._base_lock = threading.Lock()
        self._probe = probe
        self._base: Path | None = None
        self._base_arg = Path(base_dir) if base_dir else None
        self._guest = guest_source()
        if self._runsc is None:
            self._reason = (f"{runsc} not found on PATH: install the `runsc` package "
                            f"(apt-get install runsc) or set sandbox.runsc_path")
        elif py_reason:
            self._reason = py_reason

    def _key(self) -> tuple[Any, ...]:
        return _binary_key(self._runsc or "", self._python)

    # lazily, once per process and binary: a probe run proves runsc starts here
    @property
    def reason(self) -> str:
        if self._reason or not self._probe:
            return self._reason
        key = self._key()
        with _probe_lock:
            if key not in _probes:
                _probes[key] = self._probe_run()
            return _probes[key]

    def _ready(self) -> None:
        super()._ready()
        if self._probe:
            with _probe_lock:
                known = _probes.get(self._key())
            if known:
                raise SandboxUnavailable(f"sandbox unavailable: {known}")

    def _probe_run(self) -> str:
        try:
            res, _ = self._execute({MAIN: "print('ok')"}, 30.0, _Job())
        except Exception as e:  # the probe reports, never raises
            return f"runsc does not start here: {e}"
        if res.exit_code != 0 or res.stdout.strip() != "ok" or not res.reported:
            return (f"runsc does not start here (exit {res.exit_code}): "
                    f"{(res.stderr or res.stdout).strip()[-300:]}")
        return ""

    def _record_success(self) -> None:
        """A run that reported proves runsc starts here: no separate probe is needed.
        (A failed run proves nothing lasting: only the probe marks a binary broken.)"""
        if self._probe:
            with _probe_lock:
                _probes.setdefault(self._key(), "")

    @property
    def python(self) -> str | None:
        return self._python

    def _ensure_base(self) -> Path:
        with self._base_lock:
            if self._base is None:
                self._base = self._make_base()
                # removed on close(), on garbage collection, or at interpreter exit
                self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._base), True)
            return self._base

    def _make_base(self) -> Path:
        if self._base_arg is not None:
            self._base_arg.mkdir(parents=True, exist_ok=True)
        parent = self._base_arg or Path(tempfile.gettempdir())
        _sweep_bases(parent)
        _HostCgroup.sweep()
        base = Path(tempfile.mkdtemp(prefix="a4ps-sandbox-", dir=parent))
        (base / "owner.pid").write_text(str(os.getpid()))
        rootfs = base / "rootfs"
        for d in ("proc", "dev", "tmp", WORKDIR.lstrip("/"), INDIR.lstrip("/")):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        for src, _ in self._binds():
            dst = rootfs / src.lstrip("/")
            if os.path.islink(src):
                if not os.path.lexists(dst):
                    os.symlink(os.readlink(src), dst)
            else:
                dst.mkdir(parents=True, exist_ok=True)
        (base / "state").mkdir()
        (base / "runs").mkdir()
        os.chmod(rootfs, 0o755)
        return base

    def _binds(self) -> list[tuple[str, bool]]:
        """(host path, is a real directory to bind) for the read-only system view."""
        out = [(d, not os.path.islink(d)) for d in _SYSTEM_DIRS if os.path.lexists(d)]
        prefix = os.path.dirname(os.path.dirname(self._python or "/usr/bin/python3"))
        covered = any(prefix == d or prefix.startswith(d + "/")
                      for d in _SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d))
        if not covered and prefix not in ("/", ""):
            out.append((prefix, True))
        return out

    def _spec(self, rootfs: Path, in_dir: Path, job: _Job,
              cgroup: _HostCgroup | None = None) -> dict[str, Any]:
        lim = self.limits
        def bind(src: str, dst: str) -> dict[str, Any]:
            return {"destination": dst, "type": "bind", "source": src,
                    "options": ["rbind", "ro", "nosuid", "nodev"]}
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "noexec", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", f"size={TMP_MB}m"]},
        ]
        mounts += [bind(src, src) for src, real in self._binds() if real]
        mounts.append(bind(str(in_dir), INDIR))
        mounts.append({"destination": WORKDIR, "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=0777", f"size={lim.disk_mb}m"]})
        linux: dict[str, Any] = {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "resources": {
                "memory": {"limit": lim.memory_mb * 1024 * 1024},
                # host side: the sentry and gofer (Go runtimes) and one ptrace stub
                # per guest process count here; the guest's own limit is RLIMIT_NPROC
                "pids": {"limit": 128 + 8 * lim.max_pids},
            },
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
        }
        if cgroup is not None:
            linux["cgroupsPath"] = cgroup.path
        return {
            "ociVersion": "1.0.0",
            "process": {
                # the supervisor: guest root with three capabilities; the workload it
                # forks drops to GUEST_UID with none (a4ps/tools/guest.py)
                "user": {"uid": 0, "gid": 0},
                "args": [self._python, "-I", "-c", self._guest, json.dumps(job.config(lim))],
                "env": list(_GUEST_ENV),
                "cwd": WORKDIR,
                "noNewPrivileges": True,
                "capabilities": {"bounding": _GUEST_CAPS, "effective": _GUEST_CAPS,
                                 "permitted": _GUEST_CAPS, "inheritable": [], "ambient": []},
                "rlimits": [
                    {"type": "RLIMIT_NOFILE", "hard": 256, "soft": 256},
                    {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                ],
            },
            "root": {"path": str(rootfs), "readonly": True},
            "hostname": "sandbox",
            "mounts": mounts,
            "linux": linux,
        }

    def _runsc_cmd(self, state: Path, *args: str) -> list[str]:
        assert self._runsc is not None, "runsc was found (checked by reason)"
        return [self._runsc, "--root", str(state), "--rootless", "--network=none", *args]

    def _execute(self, files: dict[str, str], wall: float,
                 job: _Job) -> tuple[SandboxResult, dict[str, Any] | None]:
        lim = self.limits
        base = self._ensure_base()
        cid = "a4ps-" + uuid.uuid4().hex[:12]
        run_dir = base / "runs" / cid
        bundle = run_dir / "bundle"
        bundle.mkdir(parents=True)
        nonce = secrets.token_hex(16)
        _write_inputs(run_dir / "in", files, nonce, job.calls)
        cgroup = _HostCgroup.create(cid, lim.memory_mb * 1024 * 1024)
        (bundle / "config.json").write_text(
            json.dumps(self._spec(base / "rootfs", run_dir / "in", job, cgroup)))
        state = base / "state"
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(self._runsc_cmd(state, "run", "--bundle", str(bundle), cid),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True,
                                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                    cwd=str(run_dir))
        except OSError as e:
            if cgroup is not None:
                cgroup.remove()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise SandboxError(f"could not start runsc ({self._runsc}): {e}") from e
        over = threading.Event()
        out = _Capture(proc.stdout, lim.max_output_bytes, over)
        err = _Capture(proc.stderr, lim.max_output_bytes + 4 * lim.report_cap + 65536, over)
        timed_out = cpu_backstop = False
        deadline = t0 + wall
        next_cpu_check = t0 + 0.2
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    break
                try:
                    proc.wait(timeout=min(deadline - now, 0.05))
                    break
                except subprocess.TimeoutExpired:
                    if over.is_set():
                        break
                if cgroup is not None and time.monotonic() >= next_cpu_check:
                    next_cpu_check = time.monotonic() + 0.1
                    used = cgroup.cpu_seconds()
                    if used is not None and used > lim.cpu_total_cap_s:
                        cpu_backstop = True
                        break
        finally:   # a limit, an output overflow or an exception: kill what still runs
            if proc.returncode is None:
                self._kill(proc, state, cid)
            out.join()
            err.join()
            wall_s = time.monotonic() - t0
            sandbox_cpu = oom = None
            if cgroup is not None:
                sandbox_cpu, oom = cgroup.cpu_seconds(), cgroup.oom_kills() > 0
                cgroup.remove()
            shutil.rmtree(run_dir, ignore_errors=True)
        code = proc.returncode
        raw_err = err.text()
        if code == 128 and raw_err.lstrip().startswith(("running container", "creating container")):
            raise SandboxError(f"runsc failed to start the sandbox: {raw_err.strip()[-500:]}")
        res, report = _finish(stdout=out.text(), stderr_raw=raw_err, nonce=nonce, code=code,
                              timed_out=timed_out, output_hit=over.is_set() and not timed_out,
                              cpu_backstop=cpu_backstop, oom=bool(oom), wall_s=wall_s,
                              sandbox_cpu_s=None if sandbox_cpu is None else round(sandbox_cpu, 4),
                              limits=lim, backend=self.backend)
        if report is not None:
            self._record_success()
        return res, report

    def _kill(self, proc: subprocess.Popen[bytes], state: Path, cid: str) -> None:
        """Kill the container (runsc then cleans up), then the whole process group."""
        try:
            subprocess.run(self._runsc_cmd(state, "kill", "--all", cid, "KILL"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        try:
            subprocess.run(self._runsc_cmd(state, "delete", "--force", cid),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def close(self) -> None:
        with self._base_lock:
            if self._base is not None:
                self._cleanup()
                self._base = None


class _Capture:
    """Reads a pipe in a thread, keeping at most ``cap`` bytes; sets ``over`` beyond."""

    def __init__(self, pipe: IO[bytes] | None, cap: int, over: threading.Event) -> None:
        assert pipe is not None, "Popen was given stdout/stderr=PIPE"
        self._pipe, self._cap, self._over = pipe, cap, over
        self._buf = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                chunk = self._pipe.read1(65536) if hasattr(self._pipe, "read1") else self._pipe.read(65536)
                if not chunk:
                    break
                room = self._cap - len(self._buf)
                if room > 0:
                    self._buf += chunk[:room]
                if len(chunk) > room:
                    self._over.set()
        except (OSError, ValueError):
            pass
        finally:
            try:
                self._pipe.close()
            except OSError:
                pass

    def join(self) -> None:
        self._thread.join(timeout=5)

    def text(self) -> str:
        return bytes(self._buf).decode("utf-8", "replace")


# -- docker + runsc runtime ---------------------------------------------------------------

class DockerSandbox(Sandbox):
    """Docker with the ``runsc`` runtime, through the Docker SDK (same guest, same report;
    the OOM evidence is Docker's ``State.OOMKilled``)."""

    backend = "docker"

    def __init__(self, limits: Limits, *, image: str = "a4ps-sandbox:latest",
                 runtime: str = "runsc", client: Any = None) -> None:
        super().__init__(limits)
        self.image = image
        self.runtime = runtime
        self._client = client
        self._lock = threading.Lock()
        self._checked: str | None = None
        self._guest = guest_source()

    # lazily, like RunscSandbox's probe: building a System must not wait on dockerd
    @property
    def reason(self) -> str:
        if self._checked is None:
            with self._lock:
                if self._checked is None:
                    self._checked = self._check()
        return self._checked

    def _ready(self) -> None:
        if self.reason:
            raise SandboxUnavailable(f"sandbox unavailable: {self.reason}")

    def _check(self) -> str:
        try:
            import docker
        except ImportError:
            return "the docker SDK is not installed: pip install docker"
        try:
            if self._client is None:
                self._client = docker.from_env(timeout=5)
            self._client.ping()
        except Exception as e:
            return f"no Docker engine answers ({type(e).__name__}: {e}); start dockerd or use sandbox.backend = \"runsc\""
        try:
            runtimes = (self._client.info() or {}).get("Runtimes") or {}
        except Exception as e:
            return f"docker info failed: {e}"
        if self.runtime not in runtimes:
            return (f"Docker has no {self.runtime!r} runtime: run `sudo runsc install` and "
                    f"restart dockerd")
        try:
            self._client.images.get(self.image)
        except Exception:
            return (f"Docker image {self.image!r} is missing: "
                    f"docker build -t {self.image} sandbox/")
        return ""

    def _execute(self, files: dict[str, str], wall: float,
                 job: _Job) -> tuple[SandboxResult, dict[str, Any] | None]:
        lim = self.limits
        import docker
        run_dir = Path(tempfile.mkdtemp(prefix="a4ps-docker-"))
        nonce = secrets.token_hex(16)
        _write_inputs(run_dir / "in", files, nonce, job.calls)
        t0 = time.monotonic()
        container = None
        timed_out = oom = False
        stdout = stderr_b = b""
        code: int | None = None
        try:
            container = self._client.containers.create(
                self.image, command=["python3", "-I", "-c", self._guest, json.dumps(job.config(lim))],
                runtime=self.runtime, network_disabled=True, network_mode="none", read_only=True,
                mem_limit=f"{lim.memory_mb}m", memswap_limit=f"{lim.memory_mb}m",
                pids_limit=128 + 8 * lim.max_pids, nano_cpus=1_000_000_000,
                ulimits=[docker.types.Ulimit(name="nofile", soft=256, hard=256)],
                tmpfs={"/tmp": f"size={TMP_MB}m", WORKDIR: f"size={lim.disk_mb}m,mode=0777"},
                volumes={str(run_dir / "in"): {"bind": INDIR, "mode": "ro"}},
                working_dir=WORKDIR, user="0:0", environment=list(_GUEST_ENV),
                cap_drop=["ALL"], cap_add=[c.removeprefix("CAP_") for c in _GUEST_CAPS],
                security_opt=["no-new-privileges"], detach=True)
            container.start()
            try:
                status = container.wait(timeout=wall)
                code = int(status.get("StatusCode", -1))
            except Exception:
                timed_out = True
                container.kill()
                code = 137
            container.reload()
            oom = bool((container.attrs.get("State") or {}).get("OOMKilled"))
            stdout = container.logs(stdout=True, stderr=False)[: lim.max_output_bytes + 1]
            stderr_b = container.logs(stdout=False, stderr=True)
        except docker.errors.DockerException as e:
            raise SandboxError(f"docker sandbox failed: {e}") from e
        finally:
            if container is not None:
                try:
                    container.remove(force=True)
                except Exception:
                    pass
            wall_s = time.monotonic() - t0
            shutil.rmtree(run_dir, ignore_errors=True)
        over = len(stdout) > lim.max_output_bytes
        return _finish(stdout=stdout[: lim.max_output_bytes].decode("utf-8", "replace"),
                       stderr_raw=stderr_b.decode("utf-8", "replace"), nonce=nonce, code=code,
                       timed_out=timed_out, output_hit=over, cpu_backstop=False, oom=oom,
                       wall_s=wall_s, sandbox_cpu_s=None, limits=lim, backend=self.backend)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass


def make_sandbox(settings: Settings) -> Sandbox:
    """The sandbox ``settings.sandbox.backend`` names; unavailable (never host) if it fails."""
    s = settings.sandbox
    limits = Limits.from_settings(s)
    try:
        if s.backend == "docker":
            return DockerSandbox(limits, image=s.docker_image)
        return RunscSandbox(limits, runsc=s.runsc_path, python=getattr(s, "python", None) or None)
    except Exception as e:  # a broken backend must not take the system down
        log.warning("sandbox backend %s failed to initialise", s.backend, exc_info=True)
        return UnavailableSandbox(limits, f"{s.backend} sandbox failed to initialise: {e}", s.backend)
