"""The Kivy app: the window's parts laid out in morphic.kv, wired to a controller.

Left: the live graph strip, the morph canvas (personas, clones, tools) and the shelf
of prototypes. Right: the task box, the transcript with its plots, the log. On top of
everything, the desk of floating windows (inspectors, dialogs, time travel). The app
also owns what belongs to the window: Esc closes the top window and never the app,
closing while a task runs asks first, multitouch emulation is off, and the window's
size and position are saved for next time (see :mod:`a4ps.ui.window`).

``MorphicApp(settings)`` talks to the daemon named by the settings. Tests pass their
own ``runner`` and ``subscriber_factory`` (or none, and feed events straight into
``app.controller``) and drive the app without ``app.run()``: see tests/ui_harness.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kivy.app import App
from kivy.base import EventLoop
from kivy.clock import Clock
from kivy.core.window import Window
from kivy.lang import Builder
from kivy.properties import (BooleanProperty, NumericProperty, ObjectProperty,
                             StringProperty)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.floatlayout import FloatLayout

from . import logview, plots, transcript  # noqa: F401  (widget classes morphic.kv names)
from . import window as W
from .controller import MorphicController
from .gcpace import GcPacer
from .panels import ConfirmDialog, TooltipManager
from ..client import DaemonClient, EventSubscriber
from .bus_client import CommandRunner

KV_FILE = Path(__file__).with_name("morphic.kv")
ESCAPE = 27
WINDOW_COLOR = (0.11, 0.12, 0.14, 1)   # the panels' background: no full-size rectangles

_kv_loaded = False


def load_kv() -> None:
    """Load morphic.kv once per process (widgets need its rules before they're built)."""
    global _kv_loaded
    if not _kv_loaded:
        Builder.load_file(str(KV_FILE))
        _kv_loaded = True


class StatusBar(BoxLayout):
    """Connection, resident model, queue length, progress of long work, snapshots, goals."""

    connected = BooleanProperty(False)
    connection = StringProperty("starting…")
    model = StringProperty("none")
    queue = NumericProperty(0)
    progress = NumericProperty(0)    # 0..1, or -1 for "busy, no known fraction"
    progress_text = StringProperty("")
    goals_paused = BooleanProperty(False)   # the motivator's self-generated work
    pending_amendments = NumericProperty(0)


class MorphicRoot(FloatLayout):
    """The window's content; ``controller`` is set by the App."""

    controller = ObjectProperty(None, allownone=True)

    def submit(self) -> None:
        box = self.ids.task_input
        if self.controller is not None and box.text.strip():
            self.controller.submit_task(box.text)


class MorphicApp(App):
    """The Morphic client. Build with settings, or with explicit parts for tests."""

    title = "A4PS — BAT OS"

    def __init__(self, settings: Any = None, *, runner: Any = None,
                 subscriber_factory: Callable[[], Any] | None = None,
                 poll_hz: float | None = None, max_events_per_tick: int | None = None,
                 connect: bool = True, on_exit: Callable[[], None] | None = None,
                 geometry_path: Path | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.settings = settings
        ui = getattr(settings, "ui", None)
        self.poll_hz = poll_hz or (ui.event_poll_hz if ui else 30.0)
        self.max_events_per_tick = max_events_per_tick or (
            ui.max_events_per_frame if ui else 500)
        self._runner = runner
        self._sub_factory = subscriber_factory
        self._connect = connect
        self._on_exit = on_exit
        self.geometry_path = geometry_path if geometry_path is not None else \
            W.path_for(getattr(settings, "data_dir", None))
        self.controller: MorphicController | None = None
        self.collector: GcPacer | None = None
        self.tooltips: TooltipManager | None = None
        self.quit_dialog: ConfirmDialog | None = None
        self._tick_ev = None
        self._save_ev = None
        self._quitting = False

    def load_kv(self, filename=None):
        # App would find morphic.kv by the class name and load it again on every start
        load_kv()
        return True

    def build(self):
        load_kv()
        if self._connect and self.settings is not None:
            if self._runner is None:
                self._runner = make_runner(self.settings)
            if self._sub_factory is None:
                self._sub_factory = subscriber_factory_for(self.settings)
        root = MorphicRoot()
        self.collector = GcPacer()
        self.controller = MorphicController(root, self._runner, self._sub_factory,
                                            max_events_per_tick=self.max_events_per_tick,
                                            collector=self.collector)
        root.controller = self.controller
        root.ids.transcript.controller = self.controller
        root.ids.halo.controller = self.controller
        cognition = getattr(self.settings, "cognition", None)
        if cognition is not None:
            root.ids.transcript.ids.plot.threshold = cognition.dissonance_threshold
        return root

    def on_start(self):
        disable_multitouch_emulation()
        Window.clearcolor = WINDOW_COLOR
        Window.bind(on_keyboard=self._on_keyboard, on_request_close=self._on_request_close,
                    size=self._geometry_changed, left=self._geometry_changed,
                    top=self._geometry_changed)
        self.tooltips = TooltipManager(self.root.ids.desk)
        self.controller.start()
        self.collector.start()      # full GCs only after refreshes (see gcpace.py)
        self._tick_ev = Clock.schedule_interval(self.controller.tick, 1.0 / self.poll_hz)

    def on_stop(self):
        Window.unbind(on_keyboard=self._on_keyboard, on_request_close=self._on_request_close,
                      size=self._geometry_changed, left=self._geometry_changed,
                      top=self._geometry_changed)
        if self._save_ev is not None:
            self._save_ev.cancel()
        self.save_geometry()
        if self.tooltips is not None:
            self.tooltips.close()
        if self._tick_ev is not None:
            self._tick_ev.cancel()
            self._tick_ev = None
        if self.controller is not None:
            self.controller.stop()
        if self.collector is not None:
            self.collector.stop()
        if self._on_exit is not None:
            self._on_exit()

    # -- the window ----------------------------------------------------------------
    def _on_keyboard(self, _win: Any, key: int, *_args: Any) -> bool:
        """Esc closes the top window (or clears the selection); it never quits."""
        if key == ESCAPE:
            if self.controller is not None:
                self.controller.escape()
            return True
        return False

    def _on_request_close(self, *_args: Any, **_kw: Any) -> bool:
        """Closing the window: ask first while a task runs. True keeps it open."""
        if self._quitting or self.controller is None:
            return False
        running = self.controller.running_task()
        if running is None:
            return False
        if self.quit_dialog is not None and not self.quit_dialog.closed:
            return True
        self.quit_dialog = ConfirmDialog(
            title="Quit the UI?",
            message=f"Task #{running.task_id} is still running. The daemon keeps running "
                    "it and you can reopen the UI to follow it (unless the UI was started "
                    "with --stop-daemon-on-exit, which stops the daemon too).",
            yes_text="Quit", no_text="Keep working", danger=True,
            on_answer=self._quit_answer)
        self.root.ids.desk.open(self.quit_dialog)
        return True

    def _quit_answer(self, yes: bool) -> None:
        if yes:
            self.quit_now()

    def quit_now(self) -> None:
        self._quitting = True
        self.stop()

    def _geometry_changed(self, *_: Any) -> None:
        if self._save_ev is not None:
            self._save_ev.cancel()
        self._save_ev = Clock.schedule_once(lambda _dt: self.save_geometry(), 1.0)

    def save_geometry(self) -> None:
        W.save(self.geometry_path, W.current(Window))


def disable_multitouch_emulation() -> None:
    """Right clicks must not leave red touch circles (Kivy's multitouch emulation),
    and the next right click at the same spot must not be swallowed by one."""
    for provider in getattr(EventLoop, "input_providers", []):
        if hasattr(provider, "disable_multitouch"):
            provider.disable_multitouch = True
            provider.multitouch_on_demand = False


def make_runner(settings: Any):
    """A CommandRunner on a DaemonClient for ``settings`` (re-made after failures)."""
    return CommandRunner(lambda: DaemonClient.from_settings(settings),
                         timeout=settings.bus.request_timeout_s)


def subscriber_factory_for(settings: Any) -> Callable[[], Any]:
    def make():
        return EventSubscriber.from_settings(settings)
    return make
