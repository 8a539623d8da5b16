"""Run untrusted Python inside gVisor, and nowhere else.

Two backends share one interface (:class:`Sandbox`):

* ``runsc`` (default): ``runsc run`` on an OCI bundle we write per run. The sandbox
  sees an allowlisted root (``/usr``, ``/lib*``, ``/bin`` and the interpreter's own
  prefix, all read-only), a tmpfs ``/tmp``, and one read-write bind mount: a fresh
  working directory holding the script and its input files. The user's home, the
  project, ``data/``, ``/etc`` and every credential are simply absent. The network is
  ``none`` (always paired with ``--rootless``, which otherwise uses host networking),
  the environment is a short fixed list, the process runs as ``nobody`` with no
  capabilities. Memory comes from ``linux.resources`` (gVisor enforces it); the number
  of processes from RLIMIT_NPROC inside the sandbox (gVisor enforces it, and a pids
  cgroup backstops the host side); CPU time from ``prlimit --cpu`` on the runsc
  process (RLIMIT_CPU set inside gVisor is not enforced; set outside, gVisor delivers
  SIGXCPU to the guest), plus a wall-clock kill; output is capped while it streams.
* ``docker``: the same limits through the Docker SDK with ``runtime="runsc"``, for
  users who run Docker with gVisor (image: ``sandbox/Dockerfile``).

When no backend works, :attr:`Sandbox.available` is false, :attr:`Sandbox.reason`
says why and what to do, and :meth:`Sandbox.run` raises :class:`SandboxUnavailable`:
generated code never runs on the host.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from a4ps.config import SandboxSettings, Settings

log = logging.getLogger(__name__)

WORKDIR = "/work"               # the working directory inside the sandbox
MAIN = "main.py"                # the script's file name in the working directory
_USAGE_MARK = "\x1eA4PS_USAGE "
_SIGXCPU = 24

# Started inside the sandbox: run main.py as __main__, then report CPU time and peak
# RSS on stderr (stripped from the result). The script itself may not use exec; this
# runner is ours.
RUNNER = f"""\
import atexit, os, resource, sys
def _usage():
    try:
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        sys.stderr.flush()
        os.write(2, ("\\n{_USAGE_MARK}%f %d\\n" % (s.ru_utime + s.ru_stime + c.ru_utime
                     + c.ru_stime, max(s.ru_maxrss, c.ru_maxrss))).encode())
    except Exception:
        pass
atexit.register(_usage)
sys.path.insert(0, {WORKDIR!r})
sys.argv = [{MAIN!r}]
with open({MAIN!r}, encoding="utf-8") as _f:
    _code = compile(_f.read(), {MAIN!r}, "exec")
del _f
exec(_code, {{"__name__": "__main__", "__file__": {WORKDIR + '/' + MAIN!r}, "__builtins__": __builtins__}})
"""

_GUEST_ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "LC_ALL=C.UTF-8",
              f"HOME={WORKDIR}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONIOENCODING=utf-8"]


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code in it); the message says what to check."""


class SandboxUnavailable(SandboxError):
    """No sandbox backend works here; nothing was run."""


class SandboxResult(BaseModel):
    """What a run produced. ``limit_hit`` names the limit that ended it, if any."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    timed_out: bool = False
    limit_hit: str | None = None     # wall_time | cpu_time | memory | pids | output
    wall_s: float = 0.0
    cpu_s: float | None = None
    max_rss_kb: int | None = None
    backend: str = ""
    files: dict[str, str] = {}       # working-directory files asked for with ``collect``

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit_hit is None

    def summary(self) -> str:
        cpu = "?" if self.cpu_s is None else f"{self.cpu_s:.2f}s"
        return (f"exit {self.exit_code}, timed out: {'yes' if self.timed_out else 'no'}, "
                f"limit hit: {self.limit_hit or 'none'}, wall {self.wall_s:.2f}s, cpu {cpu}"
                f" ({self.backend})")


@dataclass(frozen=True)
class Limits:
    wall_time_s: float
    cpu_time_s: int
    memory_mb: int
    max_pids: int
    max_output_bytes: int

    @classmethod
    def from_settings(cls, s: SandboxSettings) -> Limits:
        return cls(s.wall_time_s, s.cpu_time_s, s.memory_mb, s.max_pids, s.max_output_bytes)


# -- shared helpers ------------------------------------------------------------------

def _check_files(code: str, files: dict[str, str] | None) -> dict[str, str]:
    if not isinstance(code, str):
        raise ValueError("sandbox code must be a string")
    out = {MAIN: code}
    for name, text in (files or {}).items():
        p = Path(name)
        if p.is_absolute() or ".." in p.parts or not p.parts or name == MAIN:
            raise ValueError(f"sandbox file name {name!r} must be relative, inside the "
                             f"working directory, and not {MAIN!r}")
        out[str(p)] = text if isinstance(text, str) else str(text)
    return out


def _write_workdir(work: Path, files: dict[str, str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    # the guest runs as nobody: let it write in its own (private) working directory
    for dirpath, dirnames, filenames in os.walk(work):
        os.chmod(dirpath, 0o777)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666)


def _collect(work: Path, names: list[str] | None, cap: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names or []:
        path = work / name
        try:
            if path.is_symlink() or not path.is_file():
                continue
            with open(path, "rb") as f:
                out[name] = f.read(cap).decode("utf-8", "replace")
        except OSError:
            continue
    return out


def _split_usage(stderr: str) -> tuple[str, float | None, int | None]:
    idx = stderr.rfind(_USAGE_MARK)
    if idx < 0:
        return stderr, None, None
    line_end = stderr.find("\n", idx)
    line = stderr[idx + len(_USAGE_MARK): line_end if line_end >= 0 else None]
    cleaned = stderr[:idx].removesuffix("\n") + (stderr[line_end + 1:] if line_end >= 0 else "")
    cleaned = cleaned.replace(_USAGE_MARK, "")  # forks may leave more marks
    try:
        cpu, rss = line.split()
        return cleaned, float(cpu), int(rss)
    except ValueError:
        return cleaned, None, None


def _classify(exit_code: int | None, timed_out: bool, output_hit: bool, stderr: str,
              cpu_s: float | None, limits: Limits) -> str | None:
    if output_hit:
        return "output"
    if timed_out:
        return "wall_time"
    if exit_code == 128 + _SIGXCPU or exit_code == -_SIGXCPU:
        return "cpu_time"
    if exit_code in (137, -9):
        if cpu_s is not None and cpu_s >= limits.cpu_time_s:
            return "cpu_time"
        return "memory"      # gVisor's OOM killer ends the sandbox with SIGKILL
    if exit_code not in (0, None):
        tail = stderr[-2000:]
        if "MemoryError" in tail:
            return "memory"
        if re.search(r"(BlockingIOError|OSError): \[Errno 11\]", tail):
            return "pids"
    return None


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


# -- the interface -------------------------------------------------------------------

class Sandbox(ABC):
    """A place to run untrusted Python. Subclasses implement :meth:`_run`."""

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

    def run(self, code: str, *, files: dict[str, str] | None = None,
            timeout: float | None = None, collect: list[str] | None = None) -> SandboxResult:
        """Run ``code`` as main.py in a fresh working directory holding ``files``.

        ``timeout`` (seconds) replaces the wall-time limit for this run; ``collect``
        names working-directory files to return in ``result.files``.
        """
        if not self.available:
            raise SandboxUnavailable(f"sandbox unavailable: {self.reason}")
        all_files = _check_files(code, files)
        wall = float(timeout) if timeout is not None else self.limits.wall_time_s
        if wall <= 0:
            raise ValueError("sandbox timeout must be positive")
        return self._run(all_files, wall, collect)

    @abstractmethod
    def _run(self, files: dict[str, str], wall: float, collect: list[str] | None) -> SandboxResult:
        """Run ``files`` (main.py first) inside the backend's sandbox."""

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

    def _run(self, files: dict[str, str], wall: float, collect: list[str] | None) -> SandboxResult:
        raise SandboxUnavailable(f"sandbox unavailable: {self.reason}")


# -- runsc direct ----------------------------------------------------------------------

_SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin")


class RunscSandbox(Sandbox):
    """``runsc run`` on a per-run OCI bundle (see the module docstring)."""

    backend = "runsc"

    def __init__(self, limits: Limits, *, runsc: str = "runsc", python: str | None = None,
                 base_dir: str | Path | None = None, probe: bool = True) -> None:
        super().__init__(limits)
        self._runsc = shutil.which(runsc) if os.sep not in runsc else (runsc if os.access(runsc, os.X_OK) else None)
        self._prlimit = shutil.which("prlimit")
        self._python, py_reason = _real_interpreter(python)
        self._lock = threading.Lock()
        self._base_lock = threading.Lock()
        self._probed: str | None = None if probe else ""
        self._base: Path | None = None
        self._base_arg = Path(base_dir) if base_dir else None
        if self._runsc is None:
            self._reason = (f"{runsc} not found on PATH: install the `runsc` package "
                            f"(apt-get install runsc) or set sandbox.runsc_path")
        elif py_reason:
            self._reason = py_reason

    # lazily: a probe run proves runsc actually starts here (ptrace allowed, etc.)
    @property
    def reason(self) -> str:
        if self._reason:
            return self._reason
        if self._probed is None:
            with self._lock:
                if self._probed is None:
                    self._probed = self._probe()
        return self._probed or ""

    def _probe(self) -> str:
        try:
            res = self._run({MAIN: "print('ok')"}, 30.0, None)
        except Exception as e:  # the probe reports, never raises
            return f"runsc does not start here: {e}"
        if res.exit_code != 0 or res.stdout.strip() != "ok":
            return (f"runsc does not start here (exit {res.exit_code}): "
                    f"{(res.stderr or res.stdout).strip()[-300:]}")
        return ""

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
            base = Path(tempfile.mkdtemp(prefix="a4ps-sandbox-", dir=self._base_arg))
        else:
            base = Path(tempfile.mkdtemp(prefix="a4ps-sandbox-"))
        rootfs = base / "rootfs"
        for d in ("proc", "dev", "tmp", WORKDIR.lstrip("/")):
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

    def _spec(self, rootfs: Path, work: Path) -> dict[str, Any]:
        lim = self.limits
        def bind(src: str, dst: str, rw: bool = False) -> dict[str, Any]:
            return {"destination": dst, "type": "bind", "source": src,
                    "options": ["rbind", "rw" if rw else "ro", "nosuid", "nodev"]}
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "noexec", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=16m"]},
        ]
        mounts += [bind(src, src) for src, real in self._binds() if real]
        mounts.append(bind(str(work), WORKDIR, rw=True))
        return {
            "ociVersion": "1.0.0",
            "process": {
                "user": {"uid": 65534, "gid": 65534},
                "args": [self._python, "-I", "-c", RUNNER],
                "env": list(_GUEST_ENV),
                "cwd": WORKDIR,
                "noNewPrivileges": True,
                "capabilities": {k: [] for k in
                                 ("bounding", "effective", "inheritable", "permitted", "ambient")},
                "rlimits": [
                    {"type": "RLIMIT_NOFILE", "hard": 256, "soft": 256},
                    {"type": "RLIMIT_NPROC", "hard": lim.max_pids, "soft": lim.max_pids},
                    {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                ],
            },
            "root": {"path": str(rootfs), "readonly": True},
            "hostname": "sandbox",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                "resources": {
                    "memory": {"limit": lim.memory_mb * 1024 * 1024},
                    # host side: the sentry and gofer (Go runtimes) and one ptrace stub
                    # per guest process count here; the guest's own limit is RLIMIT_NPROC
                    "pids": {"limit": 128 + 8 * lim.max_pids},
                },
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            },
        }

    def _runsc_cmd(self, state: Path, *args: str) -> list[str]:
        return [self._runsc, "--root", str(state), "--rootless", "--network=none", *args]

    def _run(self, files: dict[str, str], wall: float, collect: list[str] | None) -> SandboxResult:
        lim = self.limits
        base = self._ensure_base()
        cid = "a4ps-" + uuid.uuid4().hex[:12]
        run_dir = base / "runs" / cid
        work = run_dir / "work"
        bundle = run_dir / "bundle"
        bundle.mkdir(parents=True)
        _write_workdir(work, files)
        (bundle / "config.json").write_text(json.dumps(self._spec(base / "rootfs", work)))
        state = base / "state"
        cmd = self._runsc_cmd(state, "run", "--bundle", str(bundle), cid)
        if self._prlimit:
            cmd = [self._prlimit, f"--cpu={lim.cpu_time_s}:{lim.cpu_time_s + 1}", "--"] + cmd
            preexec = None
        else:
            import resource

            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_time_s, lim.cpu_time_s + 1))
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True,
                                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                    cwd=str(run_dir), preexec_fn=preexec)
        except OSError as e:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise SandboxError(f"could not start runsc ({self._runsc}): {e}") from e
        over = threading.Event()
        out = _Capture(proc.stdout, lim.max_output_bytes, over)
        err = _Capture(proc.stderr, lim.max_output_bytes, over)
        timed_out = False
        deadline = t0 + wall
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                try:
                    proc.wait(timeout=min(left, 0.05))
                    break
                except subprocess.TimeoutExpired:
                    if over.is_set():
                        break
        finally:   # a timeout, an output overflow or an exception: kill what still runs
            if proc.returncode is None:
                self._kill(proc, state, cid)
            out.join()
            err.join()
            wall_s = time.monotonic() - t0
            got = _collect(work, collect, lim.max_output_bytes)
            shutil.rmtree(run_dir, ignore_errors=True)
        code = proc.returncode
        stderr, cpu_s, rss = _split_usage(err.text())
        if code == 128 and stderr.lstrip().startswith(("running container", "creating container")):
            raise SandboxError(f"runsc failed to start the sandbox: {stderr.strip()[-500:]}")
        limit = _classify(code, timed_out, over.is_set(), stderr, cpu_s, lim)
        if limit == "cpu_time" and cpu_s is None:
            cpu_s = float(lim.cpu_time_s)
        return SandboxResult(stdout=out.text(), stderr=stderr, exit_code=code,
                             timed_out=timed_out, limit_hit=limit, wall_s=round(wall_s, 4),
                             cpu_s=cpu_s, max_rss_kb=rss, backend=self.backend, files=got)

    def _kill(self, proc: subprocess.Popen, state: Path, cid: str) -> None:
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

    def __init__(self, pipe, cap: int, over: threading.Event) -> None:
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
    """Docker with the ``runsc`` runtime, through the Docker SDK."""

    backend = "docker"

    def __init__(self, limits: Limits, *, image: str = "a4ps-sandbox:latest",
                 runtime: str = "runsc", client: Any = None) -> None:
        super().__init__(limits)
        self.image = image
        self.runtime = runtime
        self._client = client
        self._lock = threading.Lock()
        self._checked: str | None = None

    # lazily, like RunscSandbox's probe: building a System must not wait on dockerd
    @property
    def reason(self) -> str:
        if self._checked is None:
            with self._lock:
                if self._checked is None:
                    self._checked = self._check()
        return self._checked

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

    def _run(self, files: dict[str, str], wall: float, collect: list[str] | None) -> SandboxResult:
        lim = self.limits
        import docker
        run_dir = Path(tempfile.mkdtemp(prefix="a4ps-docker-"))
        work = run_dir / "work"
        _write_workdir(work, files)
        t0 = time.monotonic()
        container = None
        timed_out = False
        try:
            container = self._client.containers.create(
                self.image, command=["python3", "-I", "-c", RUNNER], runtime=self.runtime,
                network_disabled=True, network_mode="none", read_only=True,
                mem_limit=f"{lim.memory_mb}m", memswap_limit=f"{lim.memory_mb}m",
                pids_limit=lim.max_pids, nano_cpus=1_000_000_000,
                ulimits=[docker.types.Ulimit(name="cpu", soft=lim.cpu_time_s, hard=lim.cpu_time_s + 1),
                         docker.types.Ulimit(name="nproc", soft=lim.max_pids, hard=lim.max_pids)],
                tmpfs={"/tmp": "size=16m"}, volumes={str(work): {"bind": WORKDIR, "mode": "rw"}},
                working_dir=WORKDIR, user="65534:65534", environment=list(_GUEST_ENV),
                cap_drop=["ALL"], security_opt=["no-new-privileges"], detach=True)
            container.start()
            try:
                status = container.wait(timeout=wall)
                code = int(status.get("StatusCode", -1))
            except Exception:
                timed_out = True
                container.kill()
                code = 137
            stdout = container.logs(stdout=True, stderr=False)[: lim.max_output_bytes + 1]
            stderr_b = container.logs(stdout=False, stderr=True)[: lim.max_output_bytes + 1]
        except docker.errors.DockerException as e:
            raise SandboxError(f"docker sandbox failed: {e}") from e
        finally:
            if container is not None:
                try:
                    container.remove(force=True)
                except Exception:
                    pass
            wall_s = time.monotonic() - t0
            got = _collect(work, collect, lim.max_output_bytes)
            shutil.rmtree(run_dir, ignore_errors=True)
        over = len(stdout) > lim.max_output_bytes or len(stderr_b) > lim.max_output_bytes
        stderr, cpu_s, rss = _split_usage(stderr_b[: lim.max_output_bytes].decode("utf-8", "replace"))
        return SandboxResult(stdout=stdout[: lim.max_output_bytes].decode("utf-8", "replace"),
                             stderr=stderr, exit_code=code, timed_out=timed_out,
                             limit_hit=_classify(code, timed_out, over, stderr, cpu_s, lim),
                             wall_s=round(wall_s, 4), cpu_s=cpu_s, max_rss_kb=rss,
                             backend=self.backend, files=got)

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
