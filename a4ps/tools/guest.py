"""The sandbox's first process (PID 1 inside gVisor): a supervisor and the workload.

The host passes this file's *text* to the guest interpreter (``python -I -c SOURCE
CONFIG``); the host never runs it, and it imports nothing from the package. Inside:

1. The supervisor (guest uid 0, capabilities SETUID/SETGID/KILL only) copies the input
   files from the read-only ``/in`` into the size-limited tmpfs ``/work``.
2. It forks the workload child, which drops to uid/gid 65534 with no capabilities,
   sets RLIMIT_CPU / RLIMIT_NPROC / RLIMIT_CORE on itself, and runs either ``main.py``
   (mode ``script``) or the tool's calls (mode ``calls``: import ``tool``, call the
   function once per argument set, run the writer's test functions), sending each
   output as one JSON line over a pipe to the supervisor.
3. Only after the fork does the supervisor read the per-run nonce from ``/in/.nonce``
   (mode 0400: readable by guest root, not by the child). The child never held it:
   not in its memory (forked before it was read), not readable as a file, and
   ``/proc/1/mem`` and ``/proc/1/fd/*`` are closed to another uid.
4. When the child ends, the supervisor kills every other process (``kill(-1)``),
   reaps them, measures (``wait4`` rusage of the child: CPU time and peak RSS; the
   work directory's use), collects requested files without following links, and
   writes ONE report line ``MARK NONCE JSON`` on stderr. The host accepts only a
   line carrying its nonce, so nothing the workload prints can pass for a report.

Exit status: the child's status (128 + signal when it was killed).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import stat
import sys
import threading
import time
from typing import Any

MARK = "\x1eA4PS_REPORT "
NONCE_FILE = ".nonce"
IN_DIR = "/in"
WORK_DIR = "/work"


def _write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


# -- the workload child (runs as nobody) ----------------------------------------------

def _drop_privileges(cfg: dict[str, Any]) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    uid = int(cfg["uid"])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)          # from guest root to nobody: every capability is gone
    cpu = int(cfg["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nproc = int(cfg["nproc"])
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.chdir(WORK_DIR)
    os.umask(0o022)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _finish(status: int) -> None:
    """Python's own shutdown for the workload: threads, atexit, flushed streams."""
    try:
        getattr(threading, "_shutdown")()    # wait for the workload's non-daemon threads
    except Exception:
        pass
    try:
        import atexit
        atexit._run_exitfuncs()
    except Exception:
        pass
    _flush()
    os._exit(status)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run_script(cfg: dict[str, Any]) -> int:
    import traceback
    import types
    main = cfg.get("main", "main.py")
    with open(main, encoding="utf-8") as f:
        code = compile(f.read(), main, "exec")
    module = types.ModuleType("__main__")
    module.__file__ = os.path.join(WORK_DIR, main)
    sys.modules["__main__"] = module
    sys.argv = [main]
    sys.path.insert(0, WORK_DIR)
    try:
        exec(code, module.__dict__)
    except SystemExit as e:
        return _exit_status(e.code)
    except BaseException as e:
        # drop this frame: the traceback starts in the script
        traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        return 1
    return 0


def _run_calls(cfg: dict[str, Any], out_fd: int) -> int:
    import traceback
    dumps = json.dumps            # bound before the tool is imported
    cap = int(cfg["value_cap"])

    def jsonable(obj: object) -> object:
        if isinstance(obj, (set, frozenset)):
            return list(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON data")

    def error(e: BaseException) -> dict[str, Any]:
        # from the frame below this harness: the traceback starts in the tool or test
        tb = traceback.format_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return {"ok": False, "error": text[:1000], "traceback": "".join(tb[-8:])[-3000:]}

    def send(record: dict[str, Any]) -> None:
        _write_all(out_fd, (dumps(record) + "\n").encode("utf-8", "replace"))

    def value(v: object) -> dict[str, Any]:
        try:
            text = dumps({"ok": True, "value": v}, default=jsonable)
        except (TypeError, ValueError, RecursionError) as e:
            return {"ok": False, "error": f"the tool returned a value JSON cannot hold: "
                                          f"{type(v).__name__}: {e}"[:1000]}
        if len(text) > cap:
            return {"ok": False, "error": f"the tool's output is too large ({len(text)} bytes; "
                                          f"limit {cap})"}
        decoded: dict[str, Any] = json.loads(text)   # what the host will read back
        return decoded

    with open(os.path.join(IN_DIR, "calls.json"), encoding="utf-8") as f:
        calls = json.load(f)
    sys.argv = ["tool.py"]
    sys.path.insert(0, WORK_DIR)
    name = cfg["name"]
    try:
        import tool
        fn = getattr(tool, name)
    except BaseException as e:
        send({"kind": "import", **error(e)})
        return 1
    for i, call in enumerate(calls):
        try:
            record = value(fn(*call.get("a", []), **call.get("k", {})))
        except BaseException as e:
            record = error(e)
        send({"kind": "call", "i": i, **record})
    if cfg.get("tests"):
        try:
            import test_tool
        except BaseException as e:
            send({"kind": "test", "name": "import test_tool", **error(e)})
            return 1
        for tname in cfg["tests"]:
            try:
                getattr(test_tool, tname)()
                record = {"ok": True}
            except BaseException as e:
                record = error(e)
            send({"kind": "test", "name": tname, **record})
    return 0


def _child(cfg: dict[str, Any], out_fd: int) -> None:
    status = 70
    try:
        _drop_privileges(cfg)
        if cfg["mode"] == "calls":
            status = _run_calls(cfg, out_fd)
        else:
            os.close(out_fd)          # a script has no outputs channel
            status = _run_script(cfg)
    except SystemExit as e:
        status = _exit_status(e.code)
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 70
    _finish(status)


# -- the supervisor (guest root) -------------------------------------------------------

def _copy_inputs() -> None:
    for dirpath, dirnames, filenames in os.walk(IN_DIR):
        rel = os.path.relpath(dirpath, IN_DIR)
        target = WORK_DIR if rel == "." else os.path.join(WORK_DIR, rel)
        os.makedirs(target, mode=0o777, exist_ok=True)
        os.chmod(target, 0o777)
        for name in filenames:
            if rel == "." and name in (NONCE_FILE, "calls.json"):
                continue
            dst = os.path.join(target, name)
            with open(os.path.join(dirpath, name), "rb") as src, open(dst, "wb") as out:
                out.write(src.read())
            os.chmod(dst, 0o666)


class _Reader(threading.Thread):
    """Reads the child's output records, keeping at most ``cap`` bytes."""

    def __init__(self, fd: int, cap: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.cap = fd, cap
        self.buf = bytearray()
        self.truncated = False

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            room = self.cap - len(self.buf)
            if room > 0:
                self.buf += chunk[:room]
            if len(chunk) > room:
                self.truncated = True


def _kill_everyone_else() -> None:
    for _ in range(20):
        try:
            os.kill(-1, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            while True:
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
        except ChildProcessError:
            return
        time.sleep(0.01)


def _collect(names: list[str], cap: int) -> dict[str, str]:
    out: dict[str, str] = {}
    budget = cap * 2
    for name in names:
        path = os.path.join(WORK_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            data = os.read(fd, min(cap, max(0, budget)))
            budget -= len(data)
            out[name] = data.decode("utf-8", "replace")
        except OSError:
            continue
        finally:
            os.close(fd)
    return out


def _disk() -> tuple[int | None, bool | None]:
    try:
        st = os.statvfs(WORK_DIR)
    except OSError:
        return None, None
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return used, st.f_bavail == 0


def _records(reader: _Reader) -> tuple[list[dict[str, Any]], int]:
    records, garbled = [], 0
    for line in bytes(reader.buf).split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            garbled += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            garbled += 1
    return records, garbled


def main() -> None:
    cfg = json.loads(sys.argv[1])
    _copy_inputs()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _child(cfg, w)
        finally:
            os._exit(70)
    os.close(w)
    try:      # only now: the child was forked before the nonce was in memory
        with open(os.path.join(IN_DIR, NONCE_FILE), encoding="ascii") as f:
            nonce = f.read().strip()
    except OSError:
        nonce = ""
    reader = _Reader(r, int(cfg["report_cap"]))
    reader.start()
    _, status, usage = os.wait4(pid, 0)
    _kill_everyone_else()
    reader.join(timeout=2)
    if os.WIFSIGNALED(status):
        sig, code = os.WTERMSIG(status), 128 + os.WTERMSIG(status)
    else:
        sig, code = None, os.WEXITSTATUS(status)
    used, full = _disk()
    records, garbled = _records(reader)
    report = {"exit": code, "signal": sig,
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 4),
              "max_rss_kb": usage.ru_maxrss, "disk_used_bytes": used, "disk_full": full,
              "files": _collect(cfg.get("collect") or [], int(cfg["value_cap"])),
              "records": records, "garbled": garbled, "truncated": reader.truncated}
    _flush()
    _write_all(2, ("\n" + MARK + nonce + " " + json.dumps(report) + "\n").encode())
    os._exit(code)


if __name__ == "__main__":
    main()
