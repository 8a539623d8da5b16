"""Drive the Kivy UI headless, without ``app.run()``.

Kivy has one window per process, so the harness opens it once and runs one app at a
time in it: ``start(app)`` builds the app and adds its root to the window, ``pump()``
runs the embedded event loop (``EventLoop.idle()``: clock, input, drawing), and
``stop(app)`` clears the window for the next one. Touches are real
``UnitTestTouch`` events; a right click goes through the window's mouse provider.

Import this module before anything imports Kivy: it sets the environment Kivy reads
at import time (no argv parsing, a temp KIVY_HOME, no audio, the offscreen SDL video
driver when there is no X display).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("KIVY_NO_ARGS", "1")
os.environ.setdefault("KIVY_NO_CONSOLELOG", "1")
os.environ.setdefault("KIVY_LOG_MODE", "PYTHON")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
if "KIVY_HOME" not in os.environ:
    os.environ["KIVY_HOME"] = tempfile.mkdtemp(prefix="a4ps-kivy-home-")
if not os.environ.get("DISPLAY") and not os.environ.get("SDL_VIDEODRIVER"):
    os.environ["SDL_VIDEODRIVER"] = "offscreen"   # Mesa llvmpipe through EGL

WIDTH, HEIGHT = 1280, 800

from kivy.config import Config  # noqa: E402  (after the environment above, before any window)

Config.set("graphics", "width", str(WIDTH))
Config.set("graphics", "height", str(HEIGHT))
Config.set("input", "mouse", "mouse,disable_multitouch")
Config.set("kivy", "exit_on_escape", "0")

SCREENSHOT_DIR = Path(os.environ.get("A4PS_UI_SCREENSHOTS",
                                     Path(tempfile.gettempdir()) / "a4ps-ui-screenshots"))

_harness: UIHarness | None = None


def harness() -> UIHarness:
    """The process's one harness (opens the window on first use)."""
    global _harness
    if _harness is None:
        _harness = UIHarness()
    return _harness


class UIHarness:
    def __init__(self) -> None:
        from kivy.base import EventLoop, runTouchApp
        EventLoop.ensure_window()
        self.window = EventLoop.window
        runTouchApp(embedded=True)   # input providers + EventLoop.start(), no mainloop
        self.event_loop = EventLoop
        self.app: Any = None

    # -- app lifecycle -------------------------------------------------------------
    def start(self, app: Any) -> Any:
        from kivy.app import App
        if self.app is not None:
            self.stop()
        App._running_app = app
        app._run_prepare()
        self.app = app
        self.pump(3)
        return app

    def stop(self) -> None:
        from kivy.app import App
        app, self.app = self.app, None
        if app is None:
            return
        app.dispatch("on_stop")
        for child in list(self.window.children):
            self.window.remove_widget(child)
        App._running_app = None
        self.pump(1)

    # -- the loop ----------------------------------------------------------------
    def pump(self, frames: int = 1) -> None:
        for _ in range(frames):
            self.event_loop.idle()

    def pump_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.event_loop.idle()

    def wait_until(self, pred: Callable[[], Any], timeout: float = 10.0,
                   what: str = "condition") -> Any:
        end = time.monotonic() + timeout
        while True:
            self.event_loop.idle()
            value = pred()
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    # -- input -------------------------------------------------------------------
    def drag(self, widget: Any, dx: float, dy: float, steps: int = 5) -> None:
        """Press the middle of ``widget``, move by (dx, dy) in steps, release."""
        from kivy.tests.common import UnitTestTouch
        x, y = widget.to_window(*widget.center)
        touch = UnitTestTouch(x, y)
        touch.touch_down()
        self.pump(1)
        for i in range(1, steps + 1):
            touch.touch_move(x + dx * i / steps, y + dy * i / steps)
            self.pump(1)
        touch.touch_up()
        self.pump(2)

    def click(self, widget: Any) -> None:
        from kivy.tests.common import UnitTestTouch
        x, y = widget.to_window(*widget.center)
        touch = UnitTestTouch(x, y)
        touch.touch_down()
        self.pump(1)
        touch.touch_up()
        self.pump(2)

    def right_click(self, widget: Any) -> None:
        """A right click through the window's mouse provider (y from the top)."""
        x, y = widget.to_window(*widget.center)
        w, h = self.window.system_size
        self.window.dispatch("on_mouse_down", x, h - y, "right", {})
        self.pump(2)
        self.window.dispatch("on_mouse_up", x, h - y, "right", {})
        self.pump(2)

    def type_into(self, text_input: Any, text: str, validate: bool = True) -> None:
        text_input.focus = True
        text_input.text = text
        if validate:
            text_input.dispatch("on_text_validate")
        self.pump(2)

    def screenshot(self, name: str) -> Path:
        """Save the window as PNG and return the file's path."""
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        self.pump(3)
        base = SCREENSHOT_DIR / f"{name}.png"
        written = self.window.screenshot(str(base))   # Kivy appends a counter
        path = Path(written) if written else base
        final = SCREENSHOT_DIR / f"{name}.png"
        if path != final and path.exists():
            path.replace(final)
        return final


class FakeEvent:
    """An event as EventSubscriber.poll returns it (topic, seq, ts, payload)."""

    def __init__(self, topic: str, payload: dict, seq: int = 0) -> None:
        self.topic, self.payload, self.seq, self.ts = topic, payload, seq, time.time()


# -- a real daemon in a subprocess -------------------------------------------------------

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """`python -m a4ps daemon` on a temp data dir and free ports, with the scripted
    chat backend; ``restart()`` keeps the data dir and ports."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        import sys
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({
            "A4PS_DATA_DIR": str(self.data_dir),
            "A4PS_BUS__COMMAND_ADDR": f"tcp://127.0.0.1:{free_port()}",
            "A4PS_BUS__EVENT_ADDR": f"tcp://127.0.0.1:{free_port()}",
            "A4PS_BUS__HEARTBEAT_INTERVAL_S": "0.5",
            "A4PS_MODELS__BACKEND": "scripted",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        })
        self.env.update(env)
        self.python = sys.executable
        self.proc = None
        self.log_path = self.data_dir.parent / "daemon.log"

    def settings(self):
        """Settings as the daemon sees them (the same A4PS_* variables)."""
        from unittest import mock
        from a4ps.config import load_settings
        keys = {k: v for k, v in self.env.items() if k.startswith("A4PS_")}
        with mock.patch.dict(os.environ, keys):
            return load_settings()

    def client(self, timeout: float = 10.0):
        from a4ps.client import DaemonClient
        return DaemonClient.from_settings(self.settings(), timeout=timeout)

    def start(self, timeout: float = 120.0) -> DaemonProcess:
        import subprocess
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.python, "-m", "a4ps", "daemon"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}):\n{self.log_tail()}")
            if (self.data_dir / "daemon.token").exists():
                from a4ps.client import DaemonUnavailable
                try:
                    with self.client(timeout=1.0) as c:
                        self.boot_id = c.request("system.ping", timeout=1.0)["boot_id"]
                    return self
                except DaemonUnavailable:
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"daemon did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        from a4ps.ui.launch import stop_daemon
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_daemon(proc, grace_s=timeout)

    def restart(self) -> DaemonProcess:
        self.stop()
        return self.start()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""
