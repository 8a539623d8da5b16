"""Drive the Kivy UI headless, without ``app.run()``.

Kivy has one window per process, so the harness opens it once and runs one app at a
time in it: ``start(app)`` builds the app and adds its root to the window, ``pump()``
runs the embedded event loop (``EventLoop.idle()``: clock, input, drawing), and
``stop(app)`` clears the window for the next one. Touches are real
``UnitTestTouch`` events; a right click goes through the window's mouse provider.

Import this module before anything imports Kivy: it sets the environment Kivy reads
at import time (no argv parsing, a temp KIVY_HOME, no audio). The window uses SDL's
offscreen driver (Mesa llvmpipe through EGL) even under Xvfb: an X window cannot be
larger than the virtual screen (1280x800 in CI), and the layout tests need 1920x1080.
``A4PS_UI_DRIVER=x11`` shows it on the X display instead. The window is opened at the
largest size a test uses (an offscreen surface cannot grow) and then set to 1280x800.

Nothing here configures the app's own behaviour (multitouch emulation, Esc): the app
does that itself, so the tests see what a user gets.
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
os.environ["SDL_VIDEODRIVER"] = os.environ.get("A4PS_UI_DRIVER") or "offscreen"

WIDTH, HEIGHT = 1280, 800
# the largest window a test asks for (an X window cannot outgrow the screen)
MAX_SIZE = (1920, 1080) if os.environ["SDL_VIDEODRIVER"] == "offscreen" else (WIDTH, HEIGHT)

from kivy.config import Config  # noqa: E402  (after the environment above, before any window)

Config.set("graphics", "width", str(MAX_SIZE[0]))
Config.set("graphics", "height", str(MAX_SIZE[1]))

import daemon_process  # noqa: E402  (the one daemon-subprocess helper)
from ports import free_addr, free_port

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
        self.set_size(WIDTH, HEIGHT)

    def set_size(self, width: int, height: int) -> None:
        """Resize the window (as a user dragging its corner would) and lay it out."""
        if width > MAX_SIZE[0] or height > MAX_SIZE[1]:
            raise ValueError(f"the test window opens at {MAX_SIZE}; use the offscreen "
                             "driver (unset A4PS_UI_DRIVER) for bigger windows")
        self.window.size = (width, height)
        self.pump(3)

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
        self.pump(1)
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
        self.pump(1)    # a widget opened just now gets laid out first
        x, y = widget.to_window(*widget.center)
        w, h = self.window.size
        assert 0 <= x < w and 0 <= y < h, (
            f"{type(widget).__name__} is outside the window at ({x:.0f}, {y:.0f}): a click "
            "there would touch something else; scroll it into view first")
        touch = UnitTestTouch(x, y)
        touch.touch_down()
        self.pump(1)
        touch.touch_up()
        self.pump(2)

    def right_click(self, widget: Any) -> None:
        """A right click through the window's mouse provider (y from the top)."""
        self.pump(1)
        x, y = widget.to_window(*widget.center)
        w, h = self.window.system_size
        self.window.dispatch("on_mouse_down", x, h - y, "right", {})
        self.pump(2)
        self.window.dispatch("on_mouse_up", x, h - y, "right", {})
        self.pump(2)

    def key(self, keycode: int, text: str | None = None, modifiers: list | None = None) -> None:
        """A key press and release as SDL2 delivers it (27 = Escape): on_key_down,
        then on_keyboard unless a handler took the key."""
        mods = modifiers or []
        if not self.window.dispatch("on_key_down", keycode, 0, text, mods):
            self.window.dispatch("on_keyboard", keycode, 0, text, mods)
        self.pump(1)
        self.window.dispatch("on_key_up", keycode, 0)
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

def DaemonProcess(data_dir: Path, **env: str) -> daemon_process.DaemonProcess:
    """`python -m a4ps daemon` on a temp data dir and free ports (the shared helper,
    tests/daemon_process.py) with the scripted chat backend, the configured embedder and
    the background services on, as a user's daemon; ``restart()`` keeps dir and ports."""
    return daemon_process.DaemonProcess(data_dir, services=True, embeddings=None, env=env)


# -- a real daemon in this process (threads), for tests that reach into its parts ------

class InProcessDaemon:
    """A real :class:`a4ps.daemon.Daemon` on a real System (temp data dir, free ports,
    real ZeroMQ), run in this process so a test can reach its bus and register
    handlers. The chat model is the scripted stand-in (``latency_s`` spread over the
    words it streams), embeddings the hash stand-in; the motivator is off so no
    self-set goal runs between a test's tasks."""

    def __init__(self, data_dir: Path, *, latency_s: float = 0.0) -> None:
        self.data_dir = Path(data_dir)
        self.latency_s = latency_s
        self.addrs = (free_addr(), free_addr())
        self.system: Any = None
        self.daemon: Any = None

    def settings(self):
        from a4ps.config import load_settings
        return load_settings(data_dir=self.data_dir,
                             bus={"command_addr": self.addrs[0], "event_addr": self.addrs[1],
                                  "heartbeat_interval_s": 0.5},
                             motivator={"enabled": False}, philosopher={"enabled": False},
                             curator={"enabled": False})

    def start(self) -> InProcessDaemon:
        from a4ps.daemon import Daemon
        from a4ps.models.embeddings import HashEmbedder
        from a4ps.models.scripted import ScriptedBackend, demo_decision, demo_reply
        from a4ps.system import System
        backend = ScriptedBackend(demo_reply, decide=demo_decision, latency_s=self.latency_s)
        self.system = System(self.settings(), chat_backend=backend, embedder=HashEmbedder())
        self.daemon = Daemon(self.system, shutdown_grace_s=2.0).start()
        # the graph compiles lazily (langgraph's imports, the checkpointer): seconds of
        # GIL-bound work that a separate daemon process does beside the UI, but that here
        # would freeze the UI's frames (and the bus thread's replies) during the first task
        self.system.graph.graph
        self.system.graph_shape()
        self.boot_id = self.daemon.boot_id
        return self

    def stop(self) -> None:
        daemon, self.daemon = self.daemon, None
        if daemon is not None:
            daemon.stop()

    def client(self, timeout: float = 10.0):
        from a4ps.client import DaemonClient
        return DaemonClient.from_settings(self.settings(), timeout=timeout)


def install_token_stream_standin(system: Any) -> list[dict]:
    """Every ``task.token`` the System publishes, collected in a list (returned).

    STAND-IN for the cognition part's streaming (CONTRACTS: ``task.token``) while its
    graph does not stream yet: then every persona turn is generated with ``on_token``
    and each piece published as ``task.token`` {task_id, node, persona, round, text,
    seq}. Once the graph streams by itself (``a4ps.cognition.streaming`` exists) this
    only collects. Install before the first task (the graph compiles then)."""
    import threading
    published: list[dict] = []
    system.bus.subscribe("task.token", lambda event: published.append(dict(event.payload)))
    try:
        import a4ps.cognition.streaming  # noqa: F401  (the real thing is there)
        return published
    except ImportError:
        pass
    graph = system.graph
    ctx = threading.local()
    seqs: dict[str, int] = {}

    def wrap_node(node: str, fn: Callable) -> Callable:
        def run(state):
            ctx.node, ctx.task = node, str(state.get("task_id"))
            ctx.round = len(state.get("rounds") or []) + 1 if node in ("brick", "robin") else None
            return fn(state)
        return run

    for node in ("alfred_route", "brick", "robin", "alfred_synthesize"):
        attr = "_" + node
        setattr(graph, attr, wrap_node(node, getattr(graph, attr)))

    def invoke(proto, messages, max_tokens):
        kw = {"max_tokens": max_tokens} if max_tokens else {}

        def on_token(piece: str) -> None:
            tid = getattr(ctx, "task", "")
            seqs[tid] = seqs.get(tid, 0) + 1
            system.bus.publish("task.token", {
                "task_id": tid, "node": ctx.node, "persona": proto.name, "round": ctx.round,
                "text": piece, "seq": seqs[tid]})
        return system.models.chat(proto.model_name, messages,
                                  temperature=proto.get("temperature"), on_token=on_token, **kw)
    graph._invoke = invoke
    return published

