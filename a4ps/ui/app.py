"""The Kivy app: the window's parts (morph canvas, task box, transcript, status bar,
log) laid out in morphic.kv, and the App that wires them to a controller.

``MorphicApp(settings)`` talks to the daemon named by the settings. Tests pass their
own ``runner`` and ``subscriber_factory`` (or none, and feed events straight into
``app.controller``) and drive the app without ``app.run()``: see tests/ui_harness.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kivy.app import App
from kivy.clock import Clock
from kivy.lang import Builder
from kivy.properties import (BooleanProperty, ListProperty, NumericProperty,
                             ObjectProperty, StringProperty)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.recycleview import RecycleView

from .controller import MorphicController

KV_FILE = Path(__file__).with_name("morphic.kv")


_kv_loaded = False


def load_kv() -> None:
    """Load morphic.kv once per process (widgets need its rules before they're built)."""
    global _kv_loaded
    if not _kv_loaded:
        Builder.load_file(str(KV_FILE))
        _kv_loaded = True


class StatusBar(BoxLayout):
    """Connection, resident model, queue length, progress of long work."""

    connected = BooleanProperty(False)
    connection = StringProperty("starting…")
    model = StringProperty("none")
    queue = NumericProperty(0)
    progress = NumericProperty(0)    # 0..1, or -1 for "busy, no known fraction"
    progress_text = StringProperty("")
    goals_paused = BooleanProperty(False)   # the motivator's self-generated work


class LogPanel(RecycleView):
    """The last lines of ``log`` events (a RecycleView: only visible lines are widgets)."""

    lines = ListProperty([])

    def on_lines(self, _inst, lines):
        # scroll_y == 0 (the newest line) stays at the bottom as lines arrive; a user
        # who scrolled up to read stays where they are
        self.data = [{"text": line["text"]} for line in lines]


class MorphicRoot(BoxLayout):
    """The window's content; ``controller`` is set by the App."""

    controller = ObjectProperty(None, allownone=True)

    def submit(self) -> None:
        box = self.ids.task_input
        if self.controller is not None and box.text.strip():
            self.controller.submit_task(box.text)
            box.text = ""


class MorphicApp(App):
    """The Morphic client. Build with settings, or with explicit parts for tests."""

    title = "A4PS — BAT OS"

    def __init__(self, settings: Any = None, *, runner: Any = None,
                 subscriber_factory: Callable[[], Any] | None = None,
                 poll_hz: float | None = None, max_events_per_tick: int | None = None,
                 connect: bool = True, on_exit: Callable[[], None] | None = None,
                 **kw: Any) -> None:
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
        self.controller: MorphicController | None = None
        self._tick_ev = None

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
        self.controller = MorphicController(root, self._runner, self._sub_factory,
                                            max_events_per_tick=self.max_events_per_tick)
        root.controller = self.controller
        root.ids.transcript.controller = self.controller
        cognition = getattr(self.settings, "cognition", None)
        if cognition is not None:
            root.ids.transcript.ids.plot.threshold = cognition.dissonance_threshold
        return root

    def on_start(self):
        self.controller.start()
        self._tick_ev = Clock.schedule_interval(self.controller.tick, 1.0 / self.poll_hz)

    def on_stop(self):
        if self._tick_ev is not None:
            self._tick_ev.cancel()
            self._tick_ev = None
        if self.controller is not None:
            self.controller.stop()
        if self._on_exit is not None:
            self._on_exit()


def make_runner(settings: Any):
    """A CommandRunner on a DaemonClient for ``settings`` (re-made after failures)."""
    from ..client import DaemonClient
    from .bus_client import CommandRunner
    return CommandRunner(lambda: DaemonClient.from_settings(settings),
                         timeout=settings.bus.request_timeout_s)


def subscriber_factory_for(settings: Any) -> Callable[[], Any]:
    def make():
        from ..client import EventSubscriber
        return EventSubscriber.from_settings(settings)
    return make
