"""The gVisor sandbox, for real: runsc runs every script here (CI installs `runsc`).

Each containment test runs hostile code and checks both the result (which limit, a
clear message) and that the host is unchanged.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from a4ps.config import load_settings
from a4ps.tools import sandbox as sandbox_module
from a4ps.tools.sandbox import (DockerSandbox, Limits, RunscSandbox, SandboxUnavailable,
                                make_sandbox, probe_cache_clear)

# memory: the fork bomb's 16 interpreters (copy-on-write pages they touch) plus the guest
# supervisor must fit, so the process limit, not the memory limit, is what stops it
LIMITS = {"wall_time_s": 20.0, "cpu_time_s": 2, "memory_mb": 192, "max_pids": 16,
          "max_output_bytes": 4096, "disk_mb": 32}


@pytest.fixture(scope="module")
def sandbox_settings(tmp_path_factory):
    return load_settings(data_dir=tmp_path_factory.mktemp("data"), sandbox=LIMITS)


@pytest.fixture(scope="module")
def sandbox(sandbox_settings):
    sb = make_sandbox(sandbox_settings)
    assert isinstance(sb, RunscSandbox)
    assert sb.available, f"runsc sandbox unavailable: {sb.reason}"
    yield sb
    sb.close()


def _sandbox_processes(sandbox: RunscSandbox) -> list[psutil.Process]:
    """runsc processes of *this* sandbox: every runsc process it starts (run, gofer,
    sandbox, kill, delete) carries ``--root <base>/state``, so another test session's
    containers on the same machine are not counted as our leftovers."""
    base = str(sandbox._ensure_base())
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "runsc" in (p.info.get("name") or "") and base in cmd:
            out.append(p)
    return out


def run(sandbox, code: str, **kw):
    return sandbox.run(textwrap.dedent(code), **kw)


def test_runs_code_and_reports_output_exit_and_usage(sandbox):
    res = run(sandbox, """
        import sys
        print(open("input.txt").read().upper())
        print("to stderr", file=sys.stderr)
        open("out.txt", "w").write("written inside")
        sys.exit(3)
        """, files={"input.txt": "hello"}, collect=["out.txt"])
    assert res.stdout == "HELLO\n"
    assert res.stderr.strip() == "to stderr"          # the usage report is stripped
    assert res.exit_code == 3 and not res.timed_out and res.limit_hit is None
    assert res.files == {"out.txt": "written inside"}
    assert res.cpu_s is not None and 0 <= res.cpu_s < 2
    assert res.max_rss_kb and res.max_rss_kb > 1000
    assert res.backend == "runsc" and 0 < res.wall_s < 15


def test_traceback_names_the_script(sandbox):
    res = run(sandbox, "def f():\n    raise ValueError('boom')\nf()\n")
    assert res.exit_code == 1 and res.limit_hit is None
    assert 'File "main.py", line 2, in f' in res.stderr and "ValueError: boom" in res.stderr


def test_an_infinite_loop_under_a_30s_wall_limit_stops_at_its_cpu_limit_measured(sandbox):
    """Issue 14.3: the CPU limit is enforced in the guest and the CPU time is measured."""
    t0 = time.monotonic()
    res = run(sandbox, "while True:\n    pass\n", timeout=30)
    elapsed = time.monotonic() - t0
    assert res.limit_hit == "cpu_time" and not res.timed_out, res.summary()
    assert res.signal == 24 and res.exit_code == 128 + 24          # SIGXCPU, in the guest
    assert LIMITS["cpu_time_s"] <= res.cpu_s < LIMITS["cpu_time_s"] + 1.5, res.summary()
    assert res.sandbox_cpu_s is not None and res.sandbox_cpu_s > 0.5   # the host's cgroup
    assert elapsed < 15, f"stopped after {elapsed:.1f}s: the CPU limit did not bite"
    assert not _sandbox_processes(sandbox)


def test_cpu_time_is_measured_not_the_limit(sandbox):
    res = run(sandbox, """
        import time
        t = time.process_time()
        while time.process_time() - t < 0.4:
            pass
        """)
    assert res.ok and res.limit_hit is None, res.summary()
    assert 0.3 <= res.cpu_s < LIMITS["cpu_time_s"], res.summary()
    assert res.cpu_s != float(LIMITS["cpu_time_s"])


def test_a_self_sigkill_is_not_reported_as_memory(sandbox):
    """Issue 14.3: only OOM evidence makes ``memory``."""
    res = run(sandbox, "import os, signal\nprint('bye', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert res.limit_hit is None, res.summary()
    assert res.signal == 9 and res.exit_code == 137 and res.reported
    assert res.stdout == "bye\n"


def test_a_2gib_write_stops_at_the_disk_quota(sandbox, tmp_path):
    """Issue 14.2: the work directory is a size-limited tmpfs; the host's disk is untouched."""
    free_before = shutil.disk_usage(tempfile.gettempdir()).free
    t0 = time.monotonic()
    res = run(sandbox, """
        chunk = b"x" * (1 << 20)
        with open("big.bin", "wb") as f:
            for i in range(2048):
                f.write(chunk)
        print("wrote 2 GiB")
        """)
    assert res.limit_hit == "disk", res.summary() + res.stderr[-300:]
    assert "No space left on device" in res.stderr and "wrote 2 GiB" not in res.stdout
    assert res.exit_code == 1 and not res.timed_out
    quota = LIMITS["disk_mb"] << 20
    assert quota * 0.9 <= res.disk_used_bytes <= quota, res.disk_used_bytes
    assert time.monotonic() - t0 < LIMITS["wall_time_s"]
    assert free_before - shutil.disk_usage(tempfile.gettempdir()).free < 100 << 20


@pytest.mark.slow
def test_forked_cpu_burners_are_bounded_in_total(sandbox):
    """Each process has its own RLIMIT_CPU (8 burners could use 8 x 2 s); the whole
    sandbox's CPU is capped too (2 * cpu_time_s + 1 s, from the host's cgroup)."""
    res = run(sandbox, """
        import os, signal
        for _ in range(8):
            if os.fork() == 0:
                while True:
                    pass
        xcpu = 0
        for _ in range(8):
            _, status = os.wait()
            xcpu += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU
        print("every burner stopped by its own limit:", xcpu == 8)
        """, timeout=60)
    cap = sandbox.limits.cpu_total_cap_s
    assert not res.timed_out and res.sandbox_cpu_s is not None, res.summary()
    assert res.sandbox_cpu_s <= cap + 1.5, res.summary()     # the cap, plus one poll's worth
    # either the backstop ended the run, or (under heavy host contention, where gVisor's
    # CPU clock runs ahead of the host's) each burner hit its own limit first
    assert res.limit_hit == "cpu_time" or "stopped by its own limit: True" in res.stdout, \
        res.summary() + res.stdout
    assert not _sandbox_processes(sandbox)


FORGER = r"""
import os, signal, sys
for path in ["/in/.nonce", "/proc/1/mem", "/proc/1/fd/2", "/proc/1/fd/3"]:
    try:
        open(path, "rb").read(64)
        print("READ", path)
    except OSError as e:
        print("denied", path, e.errno)
try:
    os.kill(1, signal.SIGKILL)
    print("KILLED the supervisor")
except OSError as e:
    print("cannot signal the supervisor", e.errno)
fake = '{"exit": 0, "signal": null, "cpu_s": 0.0, "records": []}'
sys.stderr.write("\n\x1eA4PS_REPORT 0000 " + fake + "\n")
sys.stderr.write("\x1eA4PS_REPORT " + fake + "\n")
sys.exit(3)
"""


def test_the_workload_cannot_read_the_nonce_nor_forge_the_report(sandbox):
    res = sandbox.run(FORGER)
    assert "READ" not in res.stdout and "KILLED" not in res.stdout, res.stdout
    assert res.stdout.count("denied") == 4 and "cannot signal the supervisor" in res.stdout
    assert res.reported and res.exit_code == 3            # the real report, not the fakes
    assert res.stderr.count("A4PS_REPORT") == 2           # the fakes stay plain output


def test_collected_files_are_never_followed_through_links(sandbox):
    res = run(sandbox, """
        import os
        os.symlink("/in/.nonce", "leak.txt")
        os.symlink("/proc/1/environ", "env.txt")
        os.mkfifo("pipe.txt")
        open("real.txt", "w").write("fine")
        """, collect=["leak.txt", "env.txt", "pipe.txt", "real.txt", "missing.txt"])
    assert res.ok, res.summary() + res.stderr
    assert res.files == {"real.txt": "fine"}


def test_probe_runs_once_per_process_and_runsc_binary(sandbox_settings, monkeypatch):
    """Issue 14.7."""
    starts = []
    real = subprocess.Popen

    def counting(cmd, *a, **kw):
        if isinstance(cmd, list) and "run" in cmd:
            starts.append(cmd)
        return real(cmd, *a, **kw)

    probe_cache_clear()
    monkeypatch.setattr(sandbox_module.subprocess, "Popen", counting)
    first, second = make_sandbox(sandbox_settings), make_sandbox(sandbox_settings)
    try:
        assert first.available and second.available
        assert len(starts) == 1                           # one probe for both
        second.run("print(1)")
        assert len(starts) == 2                           # and then only the run
    finally:
        first.close()
        second.close()


def test_cli_sandbox_run_costs_one_container_start(tmp_path, capsys, data_dir, monkeypatch):
    """Issue 14.7: `a4ps sandbox run` does not boot a probe container first."""
    from a4ps.cli import main
    starts = []
    real = subprocess.Popen

    def counting(cmd, *a, **kw):
        if isinstance(cmd, list) and "run" in cmd:
            starts.append(cmd)
        return real(cmd, *a, **kw)

    probe_cache_clear()
    monkeypatch.setattr(sandbox_module.subprocess, "Popen", counting)
    script = tmp_path / "one.py"
    script.write_text("print(1)\n")
    assert main(["--data-dir", str(data_dir), "sandbox", "run", str(script)]) == 0
    assert "1" in capsys.readouterr().out
    assert len(starts) == 1, starts


def test_sleeper_is_killed_at_the_wall_clock_limit(sandbox):
    t0 = time.monotonic()
    res = run(sandbox, "import time\nprint('started', flush=True)\ntime.sleep(60)\n", timeout=1.5)
    elapsed = time.monotonic() - t0
    assert res.timed_out and res.limit_hit == "wall_time"
    assert res.stdout == "started\n"
    assert 1.5 <= elapsed < 8, elapsed
    assert not _sandbox_processes(sandbox), "the killed sandbox left processes behind"


def test_memory_hog_is_stopped_by_the_memory_limit(sandbox):
    host = psutil.Process()
    rss_before = host.memory_info().rss
    res = run(sandbox, """
        chunks = []
        while True:
            chunks.append(bytearray(8 * 1024 * 1024))
        """)
    assert res.limit_hit == "memory", res.summary()
    assert res.exit_code != 0 and not res.timed_out
    # the host process is fine: it did not take the hog's memory (measured as growth: in a
    # whole-suite run this process already holds other tests' models, well over 2 GB)
    grown = host.memory_info().rss - rss_before
    assert grown < LIMITS["memory_mb"] * 1024 ** 2 // 2, f"the host grew {grown >> 20} MB"


def test_fork_bomb_is_stopped_by_the_process_limit(sandbox):
    t0 = time.monotonic()
    res = run(sandbox, """
        import os
        while True:
            os.fork()
        """)
    assert res.limit_hit == "pids", res.summary() + res.stderr[-500:]
    assert "Resource temporarily unavailable" in res.stderr
    assert time.monotonic() - t0 < LIMITS["wall_time_s"]
    assert not _sandbox_processes(sandbox)


def test_network_is_unreachable(sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        res = run(sandbox, f"""
            import socket
            for host, port in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
                try:
                    socket.create_connection((host, port), timeout=2).close()
                    print("CONNECTED", host)
                except OSError as e:
                    print("blocked", host, type(e).__name__)
            try:
                socket.getaddrinfo("example.com", 80)
                print("RESOLVED")
            except OSError as e:
                print("no dns", type(e).__name__)
            """)
        with pytest.raises(socket.timeout):
            listener.accept()         # nothing reached the host's loopback
    finally:
        listener.close()
    assert "CONNECTED" not in res.stdout and "RESOLVED" not in res.stdout
    assert res.stdout.count("blocked") == 3 and "no dns" in res.stdout
    assert res.exit_code == 0


def test_writes_outside_the_working_directory_fail_and_leave_the_host_unchanged(sandbox, tmp_path):
    host_tmp = Path("/tmp") / f"a4ps-escape-{uuid.uuid4().hex}"
    host_file = tmp_path / "escape.txt"
    targets = ["/usr/escape.txt", "/etc/escape.txt", "/escape.txt", os.path.expanduser("~/escape.txt"),
               str(host_file), str(Path(sys.executable).parent / "escape.txt")]
    res = run(sandbox, f"""
        for path in {targets!r}:
            try:
                with open(path, "w") as f:
                    f.write("x")
                print("WROTE", path)
            except OSError as e:
                print("denied", path, type(e).__name__)
        with open({str(host_tmp)!r}, "w") as f:   # the sandbox's own tmpfs
            f.write("x")
        with open("inside.txt", "w") as f:
            f.write("ok")
        print("tmpfs ok")
        """)
    assert res.exit_code == 0, res.stderr
    assert "WROTE" not in res.stdout
    assert res.stdout.count("denied") == len(targets)
    assert "tmpfs ok" in res.stdout
    for path in targets:
        assert not os.path.exists(path), path
    assert not host_tmp.exists(), "the sandbox's /tmp leaked onto the host"


def test_environment_secrets_and_host_files_are_hidden(sandbox, monkeypatch, settings):
    secret = "s3cret-" + uuid.uuid4().hex
    monkeypatch.setenv("A4PS_TEST_SECRET", secret)
    res = run(sandbox, f"""
        import os
        print(sorted(os.environ))
        print(os.environ.get("A4PS_TEST_SECRET"))
        for p in ["/proc/self/environ", "/proc/1/environ"]:
            print(open(p, "rb").read())
        for d in ["/root", "/home", {str(settings.data_dir)!r}, {str(Path.cwd())!r}, "/etc"]:
            try:
                print(d, os.listdir(d))
            except OSError as e:
                print("hidden", d, type(e).__name__)
        """)
    assert res.exit_code == 0, res.stderr
    assert secret not in res.stdout and secret not in res.stderr
    assert "A4PS_TEST_SECRET" not in res.stdout
    assert "hidden " + str(settings.data_dir) in res.stdout
    assert "hidden " + str(Path.cwd()) in res.stdout      # the project
    assert "hidden /etc" in res.stdout                     # passwd, ssh keys, ...
    assert "/root [" not in res.stdout or "/root ['.pyenv']" in res.stdout  # only the interpreter


def test_deleting_visible_files_fails_and_leaves_them(sandbox):
    sentinel_dir = Path("/usr/local/share")
    sentinel = sentinel_dir / f"a4ps-sentinel-{uuid.uuid4().hex}.txt"
    made = os.access(sentinel_dir, os.W_OK)
    if made:
        sentinel.write_text("keep me")
    try:
        res = run(sandbox, f"""
            import os, shutil, sys
            targets = [sys.executable, {str(sentinel)!r}]
            for path in targets:
                try:
                    os.remove(path)
                    print("DELETED", path)
                except OSError as e:
                    print("kept", path, type(e).__name__)
            try:
                shutil.rmtree(os.path.dirname(os.__file__) + "/json")
                print("DELETED json package")
            except OSError as e:
                print("kept json package", type(e).__name__)
            os.remove("input.txt")    # its own working copy: allowed
            print("own copy removed")
            """, files={"input.txt": "data"})
        assert "DELETED" not in res.stdout, res.stdout
        assert "own copy removed" in res.stdout
        if made:
            assert sentinel.read_text() == "keep me"
        import json
        assert Path(json.__file__).exists()
        for line in res.stdout.splitlines():
            if line.startswith("kept /usr/bin") or line.startswith("kept " + sys.base_prefix):
                assert os.path.exists(line.split()[1])
    finally:
        if made:
            sentinel.unlink(missing_ok=True)


def test_output_is_capped(sandbox):
    res = run(sandbox, "import sys\nfor _ in range(1000):\n    sys.stdout.write('y' * 1000)\n")
    assert res.limit_hit == "output"
    assert len(res.stdout) == LIMITS["max_output_bytes"]


def test_bad_file_names_are_refused(sandbox):
    for name in ["../escape.py", "/etc/x", "main.py"]:
        with pytest.raises(ValueError):
            sandbox.run("print(1)", files={name: "x"})


def test_without_runsc_on_path_the_sandbox_is_unavailable_and_runs_nothing(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    sb = make_sandbox(settings)
    assert not sb.available
    assert "runsc not found on PATH" in sb.reason and "install" in sb.reason
    marker = tmp_path / "ran"
    with pytest.raises(SandboxUnavailable, match="runsc not found"):
        sb.run(f"open({str(marker)!r}, 'w').write('x')")
    assert not marker.exists()


def test_cli_sandbox_run_prints_the_result(tmp_path, capsys, data_dir):
    from a4ps.cli import main
    script = tmp_path / "hello.py"
    script.write_text("print('hello from gvisor')\nraise SystemExit(4)\n")
    rc = main(["--data-dir", str(data_dir), "sandbox", "run", str(script), "--timeout", "20"])
    out = capsys.readouterr().out
    assert rc == 4
    assert "hello from gvisor" in out and "exit status: 4" in out and "limit hit: none" in out

    script.write_text("import time\ntime.sleep(30)\n")
    rc = main(["--data-dir", str(data_dir), "sandbox", "run", str(script), "--timeout", "1"])
    out = capsys.readouterr().out
    assert rc != 0 and "timed out: yes" in out and "limit hit: wall_time" in out


def test_docker_backend_runs_code_where_an_engine_answers(sandbox_settings):
    sb = DockerSandbox(Limits.from_settings(sandbox_settings.sandbox),
                       image=sandbox_settings.sandbox.docker_image)
    if not sb.available:
        # the one allowed skip: no engine here; anything else is a real failure
        assert "no Docker engine answers" in sb.reason, sb.reason
        pytest.skip(f"docker backend: {sb.reason}")
    res = sb.run("import socket\nprint('hi')\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                 "    print('CONNECTED')\nexcept OSError:\n    print('blocked')\n")
    assert res.stdout.split() == ["hi", "blocked"] and res.exit_code == 0


def test_leftovers_of_a_killed_daemon_are_swept(sandbox_settings, tmp_path):
    """A daemon killed mid-run leaves its sandbox directory behind; the next one sweeps it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "a4ps-sandbox-stale"
    (stale / "rootfs").mkdir(parents=True)
    (stale / "owner.pid").write_text(str(dead.pid))
    alive = tmp_path / "a4ps-sandbox-alive"
    alive.mkdir()
    (alive / "owner.pid").write_text(str(os.getpid()))
    unknown = tmp_path / "a4ps-sandbox-unknown"
    unknown.mkdir()
    sb = RunscSandbox(Limits.from_settings(sandbox_settings.sandbox), base_dir=tmp_path, probe=False)
    try:
        assert sb.run("print(2)").stdout == "2\n"
        assert not stale.exists() and alive.exists() and unknown.exists()
    finally:
        sb.close()
