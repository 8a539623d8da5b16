"""`a4ps ui`: find (or start) the daemon, then run the Kivy client.

Kept free of Kivy imports at module level: Kivy reads its environment (argv parsing,
KIVY_HOME) when first imported, so that is set here before :mod:`a4ps.ui.app` loads,
and the window's settings (:mod:`a4ps.ui.window`) go in before the window opens.
Closing the window leaves the daemon running, unless this launcher started it and
``stop_daemon_on_exit`` is set.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any

from a4ps.client import DaemonClient, DaemonUnavailable

log = logging.getLogger(__name__)


def daemon_alive(settings: Any, timeout: float = 2.0) -> bool:
    try:
        with DaemonClient.from_settings(settings, timeout=timeout) as client:
            return client.ping(timeout=timeout)
    except DaemonUnavailable:
        return False


def daemon_starting(settings: Any) -> bool:
    """True when the daemon lock names a live process (a daemon is starting up, e.g.
    run.sh launched one a moment ago): wait for it rather than start a second.

    Reads the pid the daemon writes into its lock file; it never takes the lock itself,
    so it cannot make a starting daemon fail.
    """
    try:
        # the pid is the lock file's first line (details follow as JSON: a4ps.lock)
        pid = int(((settings.data_dir / "daemon.lock").read_text().splitlines() or ["0"])[0]
                  .strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_daemon(settings: Any, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if daemon_alive(settings, timeout=1.0):
            return True
        time.sleep(0.3)
    return False


def start_daemon(settings: Any, config_path: str | None = None,
                 wait_s: float = 120.0) -> subprocess.Popen[bytes]:
    """Start `python -m a4ps daemon` in its own session; wait until it answers a ping."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, A4PS_DATA_DIR=str(settings.data_dir))
    if config_path:
        env["A4PS_CONFIG"] = str(config_path)
    logf = open(settings.data_dir / "daemon.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "a4ps", "daemon"], env=env,
                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    logf.close()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {proc.returncode} while starting;"
                               f" see {settings.data_dir / 'daemon.log'}")
        if daemon_alive(settings, timeout=1.0):
            return proc
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"the daemon did not answer within {wait_s:g}s; "
                       f"see {settings.data_dir / 'daemon.log'}")


def stop_daemon(proc: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    """SIGTERM lets the daemon finish its task and save the image; SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def run_ui(settings: Any, *, stop_daemon_on_exit: bool = False, start: bool = True,
           config_path: str | None = None) -> int:
    """Run the client until its window closes; returns an exit code."""
    os.environ.setdefault("KIVY_NO_ARGS", "1")
    started: subprocess.Popen[bytes] | None = None
    if start and not daemon_alive(settings) and daemon_starting(settings):
        print("a4ps ui: a daemon is starting; waiting for it", file=sys.__stderr__)
        wait_for_daemon(settings, 120.0)
    if start and not daemon_alive(settings):
        print(f"a4ps ui: no daemon answers at {settings.bus.command_addr}; starting one "
              f"(log: {settings.data_dir / 'daemon.log'})", file=sys.__stderr__)
        try:
            started = start_daemon(settings, config_path)
        except RuntimeError as e:
            print(f"a4ps ui: {e}", file=sys.__stderr__)
            return 1
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") \
            and not os.environ.get("SDL_VIDEODRIVER"):
        print("a4ps ui: no display (DISPLAY is empty); run under X, `xvfb-run a4ps ui`, "
              "or use `a4ps daemon` alone", file=sys.__stderr__)
        if started is not None and stop_daemon_on_exit:
            stop_daemon(started)
        return 2
    from . import window
    # before Kivy opens its window: the last size and position, no multitouch
    # emulation, Esc does not quit
    window.configure(window.load(window.path_for(settings.data_dir)))
    from .app import MorphicApp
    try:
        MorphicApp(settings).run()
    finally:
        if started is not None:
            if stop_daemon_on_exit:
                print("a4ps ui: stopping the daemon it started", file=sys.__stderr__)
                stop_daemon(started)
            else:
                print(f"a4ps ui: the daemon keeps running (pid {started.pid}); "
                      f"stop it with `kill {started.pid}`", file=sys.__stderr__)
    return 0
