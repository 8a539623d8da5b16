"""The controller: owns the UI's logic; the widgets only show what it sets.

It reads daemon events with one bounded, non-blocking poll per Clock tick (never one
``schedule_once`` per message, which backs up under bursts), applies each event to
the models (:class:`~a4ps.ui.activity.ActivityModel`, one
:class:`~a4ps.ui.tasklog.TaskRecord` per task) on the main thread, and stages what the
widgets should show (the latest value per widget wins). All staged regions are applied
in one frame at most ``refresh_hz`` times a second (see refresh.py); between those
frames, morph changes are applied and their pictures composed, oldest first, within
a per-frame time budget, so a burst of events never makes one long frame. A change
about to miss ``staleness_s`` (event published -> on screen) brings the refresh
forward, and the refresh composes the pictures that cannot wait (see refresh.py).

Commands go through a :class:`CommandRunner` whose replies are drained in the same
tick. On connect, after a daemon restart or after a gap in the event stream it asks
``system.snapshot`` once and rebuilds from it; a task that is running then is rebuilt
with ``task.steps`` (its steps so far and the turn being spoken). Apart from that and
``proto.get`` after a ``proto.changed`` event, nothing asks the daemon in a loop.
While the daemon is unreachable it retries ``system.snapshot`` every ``retry_s``.

Tests drive it without sockets: :meth:`handle_event` takes an event directly and
:meth:`apply_snapshot` takes snapshot data.
"""
from __future__ import annotations

import functools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from kivy.metrics import dp

from . import layout as L
from .activity import ActivityModel, GraphShape
from .approval import ApprovalDialog, proposal_key
from .gcpace import GcPacer
from .inspector import Inspector
from .morphs import Morph, PrototypeMorph, ProtoMorph, ToolMorph
from .panels import ConfirmDialog
from .refresh import DisplayRefresh
from .tasklog import TaskRecord, record_from_task
from .timetravel import SnapshotBrowser

if TYPE_CHECKING:
    from ..client import EventSubscriber
    from .bus_client import CommandRunner, Reply

log = logging.getLogger(__name__)

_UNSET = object()
MORPH_BUDGET_S = 0.008   # morph pictures composed per frame; the rest wait a frame
LOG_BUDGET_S = 0.004     # log rows rendered ahead per frame (the refresh renders the rest)
DISSONANCE_PERSONAS = ("BRICK", "ROBIN")
LOG_LINES = 1000
TASK_EVENTS = ("task.queued", "task.step", "task.token", "task.done", "task.failed",
               "task.cancelled")


class MorphicController:
    """Event handling and user actions for a :class:`~a4ps.ui.app.MorphicRoot`."""

    def __init__(self, root: Any, runner: CommandRunner | None,
                 subscriber_factory: Callable[[], Any] | None = None, *,
                 max_events_per_tick: int = 500, retry_s: float = 2.0,
                 refresh_hz: float = 10.0, staleness_s: float = 0.5,
                 collector: GcPacer | None = None) -> None:
        self.root = root
        self.collector = collector        # full GCs after refreshes (see gcpace.py)
        self.runner = runner
        self._sub_factory = subscriber_factory
        self.subscriber: EventSubscriber | None = None
        self.max_events_per_tick = max_events_per_tick
        self.retry_s = retry_s
        self.shape = GraphShape()
        self.activity = ActivityModel(self.shape)
        self.tasks: dict[str, TaskRecord] = {}
        self.tools: dict[str, dict] = {}
        self.parents: dict[str, str | None] = {}       # proto -> its parent's name
        self.proposals: dict[str, dict] = {}           # pending, in arrival order
        self.dialog: ApprovalDialog | None = None
        self.inspectors: dict[str, Inspector] = {}
        self._last_inspector: Inspector | None = None
        self.snapshots_panel: SnapshotBrowser | None = None
        self.selected: Morph | None = None
        self.log_lines: deque[dict] = deque(maxlen=LOG_LINES)
        self._log_new: list[dict] = []        # lines not yet in the log panel
        # display changes from events are staged per region and applied together
        # (see refresh.py): at most refresh_hz times a second; morph pictures are
        # composed a few per frame in between ("morphs" is prepared for "canvas");
        # no change waits longer than staleness_s from its event to the screen
        self.refresh_s = 1.0 / refresh_hz
        self.display = DisplayRefresh(
            ("canvas", "transcript", "strip", "bar", "shelf", "log"),
            interval=self.refresh_s, prepared={"morphs": "canvas"}, budget_s=staleness_s)
        self._transcript_tasks: set[str] = set()
        self._refresh_t0 = 0.0        # perf_counter when the last refresh was applied
        self._event_ts: float | None = None
        self._fetching: set[str] = set()          # proto.get in flight
        self._refetch: set[str] = set()           # changed again while in flight
        self._snapshot_in_flight = False
        self._last_retry = 0.0
        self.connected = False
        self.events_seen = 0
        self.pictures = 0                         # morph pictures composed (benchmark)
        self.covered = 0                          # morph changes nothing showed
        self.ticks = 0
        self._queue_len: int | None = None
        self.codex_version = 0
        self.boot_id: str | None = None           # the daemon run the view was built from

    # -- widgets -------------------------------------------------------------------
    # (looked up once: every event reaches some of them, and ids lookups add up)
    @functools.cached_property
    def canvas(self):
        return self.root.ids.canvas

    @functools.cached_property
    def transcript(self):
        return self.root.ids.transcript

    @functools.cached_property
    def status_bar(self):
        return self.root.ids.status_bar

    @functools.cached_property
    def desk(self):
        return self.root.ids.desk

    @functools.cached_property
    def shelf(self):
        return self.root.ids.shelf

    @functools.cached_property
    def strip(self):
        return self.root.ids.graph_strip

    @property
    def bar(self) -> _Staged:
        """The status bar through the display refresh (writes are staged)."""
        return _Staged(self, self.root.ids.status_bar)

    @property
    def inspector(self) -> Inspector | None:
        """The inspector touched last (None when none is open)."""
        insp = self._last_inspector
        if insp is not None and not insp.closed:
            return insp
        return next(reversed(list(self.inspectors.values())), None) if self.inspectors \
            else None

    def morph(self, name: str) -> Morph | None:
        """A morph by proto name: on the canvas, or a prototype on the shelf."""
        return self.canvas.get(name) or self.shelf.get(name)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Open the event stream and ask for the first snapshot."""
        self.canvas.controller = self
        if self._sub_factory is not None and self.subscriber is None:
            try:
                self.subscriber = self._sub_factory()
            except Exception as e:  # bad address: show it, keep the window usable
                self.add_log("error", f"cannot subscribe to daemon events: {e}")
        self._set_connected(False, "connecting…")
        self.resync()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.close()
        sub, self.subscriber = self.subscriber, None
        if sub is not None and hasattr(sub, "close"):
            sub.close()

    def tick(self, dt: float = 0.0) -> int:
        """One Clock tick: a bounded poll of events, command replies, a few morph
        pictures, a display refresh."""
        self.ticks += 1
        drawn = bool(self._refresh_t0)
        if drawn and self.collector is not None:
            self.collector.release()            # the refresh frame is over
        if drawn:
            # the last refresh's frame (its drawing and buffer swap included) is on
            # screen by now: what it cost sets how often to refresh
            self.display.drawn(time.perf_counter() - self._refresh_t0)
            self._refresh_t0 = 0.0
        n = 0
        sub = self.subscriber
        if sub is not None:
            try:
                events = sub.poll(self.max_events_per_tick, 0)
            except Exception as e:
                log.warning("event poll failed: %s", e)
                events = []
            for ev in events:
                self.handle_event(ev.topic, ev.payload, getattr(ev, "seq", 0),
                                  getattr(ev, "ts", None))
            n = len(events)
            if getattr(sub, "resync_needed", False) and events:
                self.resync()
            if self.connected and not getattr(sub, "alive", True):
                self._set_connected(False, "daemon silent: reconnecting…")
        if self.runner is not None:
            self.runner.drain()
            if not self.connected and not self._snapshot_in_flight \
                    and time.monotonic() - self._last_retry > self.retry_s:
                self.resync()
        if not self.refresh():                 # a refreshing frame is long enough
            if self.collector is not None and (drawn or self.display.settled):
                # a full GC never in a refresh: the frame after one (the next is
                # 0.1 s away), or when nothing waits to be shown
                self.collector.collect_due()
            self.prepare_morphs(MORPH_BUDGET_S)
            self.canvas.plan_ahead()             # the refresh then plans less
            if self._log_new:                    # and renders fewer log rows
                self.root.ids.log_panel.render_ahead(self._log_new, LOG_BUDGET_S)
        return n

    # -- the display refresh -------------------------------------------------------
    def _region(self, widget: Any) -> str:
        """Which separately re-rendered part of the window ``widget`` draws in."""
        if isinstance(widget, Morph):
            return "morphs" if self._on_canvas(widget) else "shelf"
        if widget == self.strip:
            return "strip"
        return "bar"

    @property
    def settled(self) -> bool:
        """True when every staged display change has been applied."""
        return self.display.settled

    def stage(self, widget: Any, **props: Any) -> None:
        """Set display properties on ``widget`` at its region's next refresh."""
        changed = {}
        for key, value in props.items():
            current = self.display.staged_value(widget, key, _UNSET)
            if current is _UNSET:
                current = getattr(widget, key)
            if current != value:
                changed[key] = value
        if changed:
            self.display.stage(self._region(widget), widget, changed,
                               self._event_ts or time.time())

    def staged(self, widget: Any, prop: str) -> Any:
        """The value ``prop`` will have after the next refresh."""
        value = self.display.staged_value(widget, prop, _UNSET)
        return getattr(widget, prop) if value is _UNSET else value

    def _mark(self, region: str, tid: str | None = None) -> None:
        if tid is not None:
            self._transcript_tasks.add(tid)
        self.display.mark(region, self._event_ts or time.time())

    def prepare_morphs(self, budget_s: float | None) -> int:
        """Apply staged morph changes, the oldest first, and compose the pictures
        that show, for at most ``budget_s`` (None: all); the rest wait for the next
        frame, still staged (the latest value wins meanwhile). A composed picture
        is on screen at the next refresh of the canvas. Returns pictures composed."""
        t0 = time.perf_counter()
        made = 0
        while True:
            item = self.display.take_one("morphs")
            if item is None:
                break
            made += self._compose(*item)
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
        return made

    def _compose(self, widget: Any, props: dict[str, Any], since: float) -> int:
        """Apply a morph's staged change and compose its picture if it shows (1), else
        count it covered (0); either way the canvas shows it at its next refresh."""
        widget.apply_props(props)
        render = getattr(widget, "render_now", None)
        if render is not None and render(repaint=False):
            self.pictures += 1
            self.display.mark("canvas", since)
            return 1
        self.covered += 1
        if self.canvas.damaged:        # moved or resized: repaint at the refresh
            self.display.mark("canvas", since)
        return 0

    def refresh(self) -> bool:
        """Apply every region that is due (see refresh.py) in this one frame."""
        due = self.display.due()
        if not due:
            return False
        if self.collector is not None:
            self.collector.hold()             # no GC in this frame (released next tick)
        if "canvas" in due:      # morph changes that cannot wait for the next refresh
            for item in self.display.take_overdue("morphs"):
                self._compose(*item)
        for region in due:
            self._apply(region)
        self.display.applied(due)
        self._refresh_t0 = time.perf_counter()
        return True

    def flush(self) -> None:
        """Apply everything staged now (tests, a screenshot, a new snapshot)."""
        self.prepare_morphs(None)
        due = [r for r in self.display.regions if self.display.pending(r)]
        for region in due:
            self._apply(region)
        if due:
            self.display.applied(due)

    flush_morphs = flush

    def _apply(self, region: str) -> None:
        if region == "canvas":
            self.canvas.repaint_now()
        elif region == "transcript":
            more = set()
            for tid in list(self._transcript_tasks):
                rec = self.tasks.get(tid)
                if rec is not None and self.transcript.sync(rec):
                    more.add(tid)                 # a burst: the rest next refresh
            self._transcript_tasks.clear()
            for tid in more:
                self._transcript_tasks.add(tid)
        elif region == "log":
            new, self._log_new = self._log_new[-LOG_LINES:], []
            self.root.ids.log_panel.add(new)
        for widget, props in self.display.take(region):
            for key, value in props.items():
                setattr(widget, key, value)
        if region == "transcript" and self._transcript_tasks:
            self._mark("transcript")          # (marked now: the rest is not stale)

    @property
    def refreshes(self) -> int:
        """Display refreshes so far (one region each; the benchmark reports them)."""
        return self.display.refreshes

    @property
    def max_staleness_s(self) -> float:
        """The longest an applied change waited since its event (the benchmark's)."""
        return self.display.max_staleness_s

    @max_staleness_s.setter
    def max_staleness_s(self, value: float) -> None:
        self.display.max_staleness_s = value

    def _set_connected(self, ok: bool, text: str | None = None) -> None:
        self.connected = ok
        bar = self.status_bar
        bar.connected = ok
        bar.connection = text or ("connected" if ok else "disconnected")
        self.root.ids.submit.disabled = not ok
        box = self.root.ids.task_input
        box.hint_text = "ask ALFRED… (Enter sends)" if ok else \
            "offline: reconnecting… you can type; Ask works again once connected"
        if ok:
            if self.root.ids.task_error.text.startswith("offline"):
                self.root.ids.task_error.text = ""
        else:
            self.stage(bar, model="? (offline)")

    # -- commands ------------------------------------------------------------------
    def call(self, cmd: str, args: dict | None = None,
             on_done: Callable[[Reply], None] | None = None) -> None:
        if self.runner is None:
            return

        def done(reply: Reply) -> None:
            if reply.unavailable:
                self._set_connected(False, "daemon not reachable: retrying…")
            if on_done is not None:
                on_done(reply)
        self.runner.call(cmd, args, done)

    def resync(self) -> None:
        """Ask for a full snapshot (connect, restart, missed events)."""
        if self.runner is None or self._snapshot_in_flight:
            return
        self._snapshot_in_flight = True
        self._last_retry = time.monotonic()
        self.call("system.snapshot", {}, self._on_snapshot)

    def _on_snapshot(self, reply: Reply) -> None:
        self._snapshot_in_flight = False
        if not reply.ok:
            if not reply.unavailable:
                self.add_log("error", f"system.snapshot failed: {reply.message}")
            return
        if self.subscriber is not None and hasattr(self.subscriber, "mark_synced"):
            self.subscriber.mark_synced()
        self._set_connected(True)
        self.apply_snapshot(reply.result or {})

    # -- snapshot --------------------------------------------------------------------
    def apply_snapshot(self, snap: dict[str, Any]) -> None:
        """Rebuild morphs, tools, proposals, tasks and status from ``system.snapshot``."""
        daemon = snap.get("daemon") if isinstance(snap.get("daemon"), dict) else {}
        if daemon.get("boot_id"):
            self.boot_id = str(daemon["boot_id"])
        if isinstance(snap.get("graph"), dict):
            self.shape = GraphShape(snap["graph"])
            self.activity.shape = self.shape
            self.strip.shape = self.shape
        protos = snap.get("protos") or {}
        if isinstance(protos, dict):
            protos = [dict(v, name=v.get("name", k)) for k, v in protos.items()]
        protos = [p for p in protos if isinstance(p, dict) and p.get("name")]
        if protos:
            self.parents = {str(p["name"]): p.get("parent") for p in protos}
        names = set()
        for data in protos:
            if not _is_tool_proto(data):
                names.add(data["name"])
                self.apply_proto(data)
        if protos:
            for name in list(self.canvas.morphs):
                if isinstance(self.canvas.morphs[name], ProtoMorph) and name not in names:
                    self.canvas.remove_morph(name)
            for name in list(self.shelf.morphs):
                if name not in names:
                    self.shelf.remove_morph(name)
        tools = snap.get("tools") or []
        if isinstance(tools, dict):
            tools = [dict(v, name=v.get("name", k)) if isinstance(v, dict) else {"name": k}
                     for k, v in tools.items()]
        for t in tools:
            if isinstance(t, dict) and t.get("name"):
                self.add_tool(t)
        codex = snap.get("codex") if isinstance(snap.get("codex"), dict) else {}
        if isinstance(codex.get("version"), int):
            self.codex_version = codex["version"]
        pending = snap.get("pending_amendments") or snap.get("proposals") \
            or snap.get("pending") or codex.get("pending") or []
        if isinstance(pending, dict):
            pending = list(pending.values())
        for p in pending:
            if isinstance(p, dict) and p.get("status", "pending") == "pending":
                self.add_proposal(p)
        tasks = snap.get("tasks") or []
        for t in tasks if isinstance(tasks, list) else []:
            if not isinstance(t, dict):
                continue
            rec = record_from_task(t)
            if not rec.task_id:
                continue
            old = self.tasks.get(rec.task_id)
            if old is None or (old.running and not rec.running):
                if old is not None and old.turns and not rec.turns:
                    rec.turns, rec.timeline = old.turns, old.timeline
                self.tasks[rec.task_id] = rec
            else:
                old.status = rec.status if rec.status != "queued" or old.status == "queued" \
                    else old.status
            if rec.status == "running":
                self._rebuild_task(rec.task_id)
        self._refresh_history()
        if not self.transcript.task_id:
            shown = self.running_task() or next(iter(sorted(
                self.tasks.values(), key=lambda r: r.created, reverse=True)), None)
            if shown is not None:
                self.show_task(shown.task_id)
        status = snap.get("status") if isinstance(snap.get("status"), dict) else snap
        self.apply_status(status)
        self.flush_morphs()
        if self.collector is not None:
            self.collector.settle_later()     # the morphs live on: out of full GCs

    def apply_status(self, status: dict[str, Any]) -> None:
        """Resident model and queue length from a status or heartbeat payload."""
        models = status.get("models") if isinstance(status.get("models"), dict) else {}
        if "resident" in models or "resident_model" in status:
            self.bar.model = str(status.get("resident_model", models.get("resident"))
                                 or "none")
        queue = status.get("queue") if isinstance(status.get("queue"), dict) else {}
        q = status.get("queue_length", queue.get("pending"))
        if isinstance(status.get("codex_version"), int):
            self.codex_version = status["codex_version"]
        if isinstance(q, int):
            self._queue_len = q
            self.bar.queue = q
        motivator = status.get("motivator")
        if isinstance(motivator, dict) and isinstance(motivator.get("paused"), bool):
            self.status_bar.goals_paused = motivator["paused"]

    def set_goals_paused(self, paused: bool) -> None:
        """Pause or resume self-generated goals (the daemon's motivator)."""
        def done(reply: Reply) -> None:
            if reply.ok and isinstance(reply.result, dict):
                self.status_bar.goals_paused = bool(reply.result.get("paused", paused))
                self.add_log("info", "self-generated goals " +
                             ("paused" if self.status_bar.goals_paused else "resumed"), "motivator")
            else:
                self.status_bar.goals_paused = not paused   # refused: show the real state
                self.add_log("error", f"pausing goals refused: {reply.message}", "motivator")
        self.status_bar.goals_paused = paused
        self.call("motivator.pause", {"paused": paused}, done)

    # -- protos --------------------------------------------------------------------
    def _is_prototype(self, data: dict) -> bool:
        """``persona``, ``tool``: no persona itself (no role, no model), and a root
        object or one that others delegate to."""
        name = data["name"]
        slots = dict(data.get("slots") or {})
        inherited = data.get("inherited") or {}
        if any(k in slots or k in inherited for k in ("role", "model_name")):
            return False
        return not data.get("parent") or any(p == name for p in self.parents.values())

    def apply_proto(self, data: dict) -> Morph:
        name = data["name"]
        self.parents[name] = data.get("parent")
        if self._is_prototype(data):
            morph = self._apply_prototype(data)
        else:
            morph = self._apply_persona(data)
        for insp in list(self.inspectors.values()):
            if insp.proto_name == name:
                insp.show_proto(data)
                insp.activity = self.activity.label(name) if isinstance(morph, ProtoMorph) \
                    else ""
        self._count_clones()
        return morph

    def _apply_prototype(self, data: dict) -> PrototypeMorph:
        name = data["name"]
        if isinstance(self.canvas.get(name), ProtoMorph):
            self.canvas.remove_morph(name)
        morph = self.shelf.get(name)
        if morph is None:
            morph = PrototypeMorph(name=name, controller=self)
            self.shelf.add_morph(morph)
        morph.apply_proto(data)
        return morph

    def _apply_persona(self, data: dict) -> ProtoMorph:
        name = data["name"]
        if self.shelf.get(name) is not None:
            self.shelf.remove_morph(name)
        morph = self.canvas.get(name)
        slots = data.get("slots") or {}
        spot = L.saved_spot(slots.get("morph_pos"))
        if not isinstance(morph, ProtoMorph):
            morph = ProtoMorph(name=name, controller=self,
                               show_dissonance=name in DISSONANCE_PERSONAS)
            morph.apply_proto(data)
            self._show_activity_now(morph)
            self.canvas.add_morph(morph, spot)
        else:
            morph.apply_proto(data)
            if not morph.dragging:
                self.canvas.set_spot(name, spot)
        return morph

    def _count_clones(self) -> None:
        for name, chip in self.shelf.morphs.items():
            chip.clones = sum(1 for p in self.parents.values() if p == name)

    def fetch_proto(self, name: str) -> None:
        if name in self._fetching:
            self._refetch.add(name)
            return
        self._fetching.add(name)

        def done(reply: Reply) -> None:
            self._fetching.discard(name)
            if reply.ok and isinstance(reply.result, dict):
                self.apply_proto(reply.result)
            elif reply.code == "not_found":
                self._forget_proto(name)
            if name in self._refetch:
                self._refetch.discard(name)
                self.fetch_proto(name)
        self.call("proto.get", {"name": name}, done)

    def _forget_proto(self, name: str) -> None:
        morph = self.morph(name)
        if morph is not None:
            self.display.drop(morph)
        if self.selected is morph:
            self.select_morph(None)
        self.canvas.remove_morph(name)
        self.shelf.remove_morph(name)
        self.parents.pop(name, None)
        self._count_clones()

    def _on_canvas(self, morph: Morph) -> bool:
        # (ids are weak proxies: compare by membership, not identity)
        return self.canvas.morphs.get(morph.name) is morph

    def morph_drag_started(self, morph: Morph) -> None:
        if self._on_canvas(morph):
            self.canvas.raise_morph(morph)

    def morph_moved(self, morph: Morph) -> None:
        """A drag ended: keep the spot (inside the canvas) and save it into the image."""
        if not self._on_canvas(morph):
            return
        left, top = self.canvas.spot_of(morph)
        one = self.canvas.unit
        left, top = L.clamp(left, top, morph.width / one, morph.height / one,
                            self.canvas.width / one, self.canvas.height / one)
        self.canvas.spots[morph.name] = (left, top)
        self.canvas.relayout()
        if self.selected is morph:
            self.root.ids.halo.follow()
        if isinstance(morph, ToolMorph):
            return  # a tool's proto is the forge's: its spot lasts for this session
        value = L.spot_value(left, top)

        def done(reply: Reply) -> None:
            if not reply.ok:
                self.add_log("error", f"could not save {morph.name}'s position: {reply.message}")
        self.call("proto.update", {"name": morph.name, "slots": {"morph_pos": value}}, done)

    def update_proto(self, name: str, slots: dict | None = None, methods: dict | None = None,
                     expected_version: int | None = None,
                     on_error: Callable[[str], None] | None = None,
                     on_ok: Callable[[], None] | None = None) -> None:
        """Send an inspector edit; ``on_error(message)`` runs if the daemon refuses it."""
        args: dict[str, Any] = {"name": name}
        if slots:
            args["slots"] = slots
        if methods:
            args["methods"] = methods
        if expected_version:
            args["expected_version"] = expected_version

        def done(reply: Reply) -> None:
            if reply.ok:
                if on_ok is not None:
                    on_ok()
                if isinstance(reply.result, dict) and reply.result.get("name") == name \
                        and "slots" in reply.result:
                    self.apply_proto(reply.result)
                else:
                    self.fetch_proto(name)
            else:
                msg = f"{reply.code}: {reply.message}" if reply.code else reply.message
                if on_error is not None:
                    on_error(msg)
                self.add_log("error", f"edit of {name} refused: {msg}")
                self.fetch_proto(name)
        self.call("proto.update", args, done)

    # -- selection and halo ----------------------------------------------------------
    def select_morph(self, morph: Morph | None) -> None:
        if self.selected is not None:
            self.selected.selected = False
            self.selected.unbind(pos=self.root.ids.halo.follow, size=self.root.ids.halo.follow)
        self.selected = morph
        halo = self.root.ids.halo
        halo.target = morph
        if morph is not None:
            morph.selected = True
            morph.bind(pos=halo.follow, size=halo.follow)

    def clone_morph(self, morph: Morph) -> None:
        """Halo "clone": a new proto delegating to this one, placed beside it."""
        base = morph.proto_name
        taken = set(self.parents) | set(self.canvas.morphs) | set(self.shelf.morphs)
        n = 2
        while f"{base}_{n}" in taken:
            n += 1
        new = f"{base}_{n}"
        slots: dict[str, Any] = {}
        if self._on_canvas(morph):
            left, top = self.canvas.spot_of(morph)
            slots["morph_pos"] = L.spot_value(left + 24, top + 24)

        def done(reply: Reply) -> None:
            if reply.ok:
                self.add_log("info", f"cloned {base} as {new}")
                if isinstance(reply.result, dict) and reply.result.get("name"):
                    self.apply_proto(reply.result)
            else:
                self.add_log("error", f"clone of {base} refused: {reply.code}: {reply.message}")
        self.call("proto.clone", {"name": base, "new_name": new, "slots": slots}, done)

    def delete_morph(self, morph: Morph) -> ConfirmDialog:
        """Halo "delete": asks, then removes the proto from the image."""
        name = morph.proto_name

        def answered(yes: bool) -> None:
            if not yes:
                return

            def done(reply: Reply) -> None:
                if reply.ok:
                    self.add_log("info", f"deleted {name}")
                    self._forget_proto(name)
                else:
                    self.add_log("error", f"{name} not deleted: {reply.code}: {reply.message}")
            self.call("proto.remove", {"name": name}, done)
        dlg = ConfirmDialog(title=f"Delete {name}?",
                            message=f"{name} leaves the living image. The snapshots still "
                                    "have it (time travel can bring it back).",
                            yes_text="Delete", no_text="Keep", danger=True,
                            on_answer=answered)
        self.desk.open(dlg)
        return dlg

    def escape(self) -> None:
        """Esc: close the top window; with none open, drop the selection."""
        if self.desk.close_top():
            return
        if self.selected is not None:
            self.select_morph(None)

    # -- inspector -----------------------------------------------------------------
    def open_inspector(self, name: str) -> Inspector:
        insp = self.inspectors.get(name)
        if insp is not None and not insp.closed:
            self.desk.raise_panel(insp)
            self._last_inspector = insp
            return insp
        insp = Inspector(controller=self, proto_name=name)
        self.inspectors[name] = insp
        self._last_inspector = insp
        self.desk.open(insp, self._beside(self.morph(name), insp, len(self.inspectors) - 1))
        insp.activity = self.activity.label(name) if isinstance(self.canvas.get(name),
                                                                  ProtoMorph) else ""
        self.fetch_proto(name)
        return insp

    def _beside(self, morph: Morph | None, panel: Any, n: int) -> tuple[float, float]:
        """Where a new window goes without hiding the morphs: in the canvas's free
        space below them when there is room, else right (or left) of the morph it is
        about; cascaded when several open."""
        win = self.root
        world = self.root.ids.world
        w, h = min(panel.width, win.width - dp(8)), min(panel.height, win.height - dp(8))
        step = dp(26) * (n % 5)
        morphs = [m for m in self.canvas.morphs.values() if m.get_root_window() is not None]
        lowest = min((m.to_window(m.x, m.y)[1] for m in morphs), default=world.top)
        free = lowest - world.y - dp(12) - step
        if free >= dp(300):
            panel.height = h = min(h, free)
            return (world.x + dp(12) + step, lowest - dp(8) - step - h)
        if morph is None or morph.get_root_window() is None:
            return (world.x + dp(16) + step, world.top - h - dp(8) - step)
        mx, my = morph.to_window(morph.x, morph.y)
        x = mx + morph.width + dp(12) + step
        if x + w > win.right:
            x = mx - w - dp(12) - step
        if x < win.x:
            x = win.right - w - dp(4) - step
        y = min(my + morph.height, win.top - dp(34)) - h - step
        return (max(win.x, x), max(win.y, y))

    def inspector_closed(self, insp: Inspector) -> None:
        if self.inspectors.get(insp.proto_name) is insp:
            del self.inspectors[insp.proto_name]
        if self._last_inspector is insp:
            self._last_inspector = None

    # -- tools ---------------------------------------------------------------------
    def add_tool(self, data: dict) -> ToolMorph:
        name = str(data["name"])
        key = f"tool:{name}"
        self.tools[name] = dict(data)
        morph = self.canvas.get(key)
        if not isinstance(morph, ToolMorph):
            morph = ToolMorph(name=key, tool_name=name, controller=self)
            morph.apply_tool(data)
            self.canvas.add_morph(morph)
        else:
            morph.apply_tool(data)
        return morph

    # -- tasks ---------------------------------------------------------------------
    def submit_task(self, text: str) -> None:
        """Send a task; the text leaves the box only once the daemon has it."""
        text = (text or "").strip()
        if not text:
            return
        err = self.root.ids.task_error
        if not self.connected:
            err.text = "offline: not sent. Your question stays in the box; press Ask " \
                       "again when the status bar says ONLINE."
            return
        self.root.ids.submit.disabled = True

        def done(reply: Reply) -> None:
            self.root.ids.submit.disabled = not self.connected
            if not reply.ok:
                why = "offline" if reply.unavailable else reply.code
                err.text = f"{why}: not sent ({reply.message}); your question stays in the box"
                self.add_log("error", f"task not submitted: {reply.message}")
                return
            err.text = ""
            box = self.root.ids.task_input
            if box.text.strip() == text:
                box.text = ""
            result = reply.result
            tid = str(result.get("id", result.get("task_id")) if isinstance(result, dict)
                      else result)
            rec = self._task(tid, refresh=False)
            rec.text = rec.text or text
            self.show_task(tid)
        self.call("task.submit", {"text": text}, done)

    def _task(self, tid: str, refresh: bool = True) -> TaskRecord:
        """The record of ``tid``, made on first sight (``refresh``: list it in the history
        now; callers that refresh the history themselves pass False)."""
        rec = self.tasks.get(tid)
        if rec is None:
            rec = self.tasks[tid] = TaskRecord(task_id=tid)
            if refresh:
                self._refresh_history()
        return rec

    def running_task(self) -> TaskRecord | None:
        running = [r for r in self.tasks.values() if r.status == "running"]
        return max(running, key=lambda r: r.created) if running else None

    def show_task(self, tid: str) -> None:
        rec = self._task(tid, refresh=False)
        self.transcript.show(rec)
        self._refresh_history()

    def reopen_task(self, tid: str) -> None:
        """Show an earlier task; fetch it when we never saw its steps."""
        rec = self.tasks.get(tid)
        if rec is not None:
            self.show_task(tid)
        if rec is None or (not rec.turns and rec.status in ("done", "failed")):
            def done(reply: Reply) -> None:
                if reply.ok and isinstance(reply.result, dict):
                    fresh = record_from_task(reply.result)
                    old = self.tasks.get(tid)
                    if old is not None and old.turns and not fresh.turns:
                        fresh.turns = old.turns
                    self.tasks[tid] = fresh
                    self.show_task(tid)
                    if fresh.status == "running":
                        self._rebuild_task(tid)
            self.call("task.get", {"id": _task_id_arg(tid)}, done)
        elif rec.status == "running" and not rec.turns:
            self._rebuild_task(tid)

    def _rebuild_task(self, tid: str) -> None:
        """A task that ran before this UI saw it: ask the daemon for its steps so far.
        Its live events wait until the reply is in, then only the newer ones apply."""
        rec = self._task(tid, refresh=False)
        if rec.rebuilding:
            return
        rec.rebuilding = True

        def done(reply: Reply) -> None:
            rec.rebuilding = False
            if reply.ok and isinstance(reply.result, dict):
                rec.rebuild(reply.result)
                if rec.running:
                    changed = self.activity.rebuild(tid, reply.result.get("steps") or [],
                                                    reply.result.get("partial"))
                    self._show_activity(changed | set(self.activity.doing))
            elif reply.code not in ("", "unknown_command"):
                self.add_log("warning", f"could not rebuild task {tid}: {reply.message}")
            held, rec.held = rec.held, []
            for topic, p, seq, ts in held:
                self.handle_event(topic, p, seq, ts)
            ended = reply.ok and isinstance(reply.result, dict) and \
                reply.result.get("status") in ("done", "failed", "cancelled")
            if ended and rec.running:
                self._fetch_final(tid)      # it ended before the reply: get its answer
            if self.transcript.task_id == tid:
                self.transcript.show(rec)
                self._mark("transcript", tid)
            self._refresh_history()
        self.call("task.steps", {"task_id": tid}, done)

    def _fetch_final(self, tid: str) -> None:
        """A task that ended while this UI missed the event: its answer from task.get."""
        def done(reply: Reply) -> None:
            rec = self.tasks.get(tid)
            if rec is None or not reply.ok or not isinstance(reply.result, dict):
                return
            final = record_from_task(reply.result)
            if not final.running:
                rec.status, rec.answer, rec.error = final.status, final.answer, final.error
                rec.partial = None
                self._show_activity(self.activity.on_end(tid))
                self._mark("transcript", tid)
                self._refresh_history()
        self.call("task.get", {"id": _task_id_arg(tid)}, done)

    def _refresh_history(self) -> None:
        self.transcript.history = [r.title() for r in sorted(
            self.tasks.values(), key=lambda r: r.created, reverse=True)]

    # -- approval ------------------------------------------------------------------
    def add_proposal(self, p: dict) -> None:
        key = proposal_key(p)
        if not key:
            return
        self.proposals[key] = dict(p)
        self.status_bar.pending_amendments = len(self.proposals)
        if self.dialog is None:
            self.open_next_proposal()

    def open_next_proposal(self) -> None:
        if self.dialog is not None:
            self.desk.raise_panel(self.dialog)
            return
        if not self.proposals:
            return
        p = next(iter(self.proposals.values()))
        self.dialog = ApprovalDialog(p, controller=self)
        self.desk.open(self.dialog)

    def approval_closed(self, dialog: ApprovalDialog) -> None:
        if self.dialog is dialog:
            self.dialog = None

    def decide(self, dialog: ApprovalDialog, approve: bool) -> None:
        """Send the human's decision, stamped with the codex version it was made on.

        The daemon refuses a decision on a stale codex version, so the current version
        is read first (``codex.get``), then ``codex.decide`` goes out.
        """
        def decided(reply: Reply) -> None:
            if reply.ok:
                if isinstance(reply.result, dict) and \
                        isinstance(reply.result.get("codex_version"), int):
                    self.codex_version = reply.result["codex_version"]
                self._close_proposal(dialog.proposal_id)
                self.add_log("info", f"amendment {dialog.proposal_id} "
                                     f"{'approved' if approve else 'rejected'}")
            else:
                dialog.refused(f"{reply.code}: {reply.message}")
                self.add_log("error", f"decision on {dialog.proposal_id} refused: "
                                      f"{reply.message}")

        def got_codex(reply: Reply) -> None:
            if not reply.ok:
                dialog.refused(f"{reply.code}: {reply.message}")
                return
            if isinstance(reply.result, dict) and isinstance(reply.result.get("version"), int):
                self.codex_version = reply.result["version"]
            self.call("codex.decide", {"proposal_id": dialog.proposal_id,
                                       "version": self.codex_version,
                                       "approve": approve}, decided)
        self.call("codex.get", {}, got_codex)

    def _close_proposal(self, key: str) -> None:
        self.proposals.pop(key, None)
        self.status_bar.pending_amendments = len(self.proposals)
        if self.dialog is not None and self.dialog.proposal_id == key:
            dialog, self.dialog = self.dialog, None
            dialog.close()
        if self.dialog is None:
            self.open_next_proposal()

    # -- time travel -----------------------------------------------------------------
    def open_snapshots(self) -> SnapshotBrowser:
        panel = self.snapshots_panel
        if panel is not None and not panel.closed:
            self.desk.raise_panel(panel)
            return panel
        panel = self.snapshots_panel = SnapshotBrowser(controller=self)
        self.desk.open(panel)
        self.list_snapshots(panel)
        return panel

    def snapshots_closed(self, panel: SnapshotBrowser) -> None:
        if self.snapshots_panel is panel:
            self.snapshots_panel = None

    def _time_travel_error(self, panel: SnapshotBrowser, reply: Reply, what: str) -> None:
        panel.busy = False
        if reply.code == "unknown_command":
            panel.status = "this daemon has no time travel yet (image.* commands are " \
                           "unknown): update the daemon"
        else:
            panel.status = f"{what} failed: {reply.code}: {reply.message}"
        self.add_log("error", panel.status, "time travel")

    def list_snapshots(self, panel: SnapshotBrowser) -> None:
        def done(reply: Reply) -> None:
            if not reply.ok:
                self._time_travel_error(panel, reply, "listing snapshots")
                return
            snaps = reply.result.get("snapshots") if isinstance(reply.result, dict) else None
            panel.snapshots = [s for s in snaps or [] if isinstance(s, dict)]
        self.call("image.snapshots", {}, done)

    def diff_snapshot(self, panel: SnapshotBrowser, snapshot_id: str) -> None:
        def done(reply: Reply) -> None:
            if not reply.ok:
                self._time_travel_error(panel, reply, "comparing")
                return
            panel.show_diff(snapshot_id, reply.result or {})
        self.call("image.diff", {"snapshot": snapshot_id, "against": None}, done)

    def confirm_restore(self, panel: SnapshotBrowser, snapshot_id: str,
                        title: str) -> ConfirmDialog:
        def answered(yes: bool) -> None:
            if yes:
                self.restore_snapshot(panel, snapshot_id)
        dlg = ConfirmDialog(
            title="Restore this snapshot?",
            message=f"The living image goes back to {title}. What it holds now is saved "
                    "first as a pre-restore snapshot, so you can come back.",
            yes_text="Restore", no_text="Cancel", danger=True, on_answer=answered)
        self.desk.open(dlg)
        return dlg

    def restore_snapshot(self, panel: SnapshotBrowser, snapshot_id: str) -> None:
        panel.busy = True
        panel.status = "restoring…"

        def done(reply: Reply) -> None:
            panel.busy = False
            if not reply.ok:
                self._time_travel_error(panel, reply, "restore")
                return
            result = reply.result if isinstance(reply.result, dict) else {}
            panel.status = f"restored {snapshot_id}; the state before is snapshot " \
                           f"{result.get('pre_restore')}"
            self.add_log("info", panel.status, "time travel")
            self.resync()
            self.list_snapshots(panel)
        self.call("image.restore", {"snapshot": snapshot_id}, done)

    def save_snapshot(self, panel: SnapshotBrowser, name: str) -> None:
        panel.busy = True

        def done(reply: Reply) -> None:
            panel.busy = False
            if not reply.ok:
                self._time_travel_error(panel, reply, "saving a snapshot")
                return
            sid = reply.result.get("id") if isinstance(reply.result, dict) else reply.result
            panel.status = f"saved snapshot {name!r} ({sid})"
            panel.ids.name_input.text = ""
            self.add_log("info", panel.status, "time travel")
            self.list_snapshots(panel)
        self.call("image.snapshot", {"name": name}, done)

    # -- log -----------------------------------------------------------------------
    def add_log(self, level: str, message: str, source: str = "ui") -> None:
        line = {"level": level, "source": source, "message": message}
        self.log_lines.append(line)
        self._log_new.append(line)
        self._mark("log")

    # -- events --------------------------------------------------------------------
    def handle_event(self, topic: str, payload: dict[str, Any], seq: int = 0,
                     ts: float | None = None) -> None:
        """Apply one daemon event (main thread only)."""
        self.events_seen += 1
        fn = self._HANDLERS.get(topic)
        if fn is None:
            return
        p = payload or {}
        if topic in TASK_EVENTS:
            tid = str(p.get("task_id", p.get("id", "")) or "")
            rec = self.tasks.get(tid)
            if rec is not None and rec.rebuilding:
                rec.held.append((topic, p, seq, ts))
                return
        self._event_ts = ts
        try:
            fn(self, p, seq, ts)
        except Exception:  # one odd event must not stop the stream
            log.exception("UI could not apply event %s", topic)
        finally:
            self._event_ts = None

    def _show_activity(self, personas: set[str]) -> None:
        """Stage what ``personas`` are doing onto their morphs, the graph strip and
        their inspectors (all read the one ActivityModel)."""
        for name in personas:
            m = self.canvas.get(name)
            if isinstance(m, ProtoMorph):
                self._stage_activity(m)
            insp = self.inspectors.get(name)
            if insp is not None:
                insp.activity = self.activity.label(name)
        speaker = self.activity.speaker
        self.stage(self.strip, current=self.activity.node,
                   hint=self.activity.label(speaker) if speaker else "idle")

    def _stage_activity(self, m: ProtoMorph) -> None:
        doing = self.activity.of(m.name)
        self.stage(m, status=doing.status, activity=doing.label(m.name),
                   active=doing.status != "idle",
                   streaming=doing.status == "speaking")

    def _show_activity_now(self, m: ProtoMorph) -> None:
        doing = self.activity.of(m.name)
        m.status, m.activity = doing.status, doing.label(m.name)
        m.active = doing.status != "idle"

    def _on_heartbeat(self, p: dict, _seq: int, _ts: float | None) -> None:
        if not self.connected and not self._snapshot_in_flight:
            self.resync()
        self.apply_status(p)

    def _on_proto_changed(self, p: dict, _seq: int, _ts: float | None) -> None:
        name = p.get("name")
        if not name or str(name).startswith("tool."):
            return   # tool protos are shown by tool.created / the snapshot's tool list
        if p.get("change") == "removed":
            self._forget_proto(name)
            return
        morph = self.morph(name)
        version = p.get("version")
        if morph is not None and isinstance(version, int) \
                and version <= getattr(morph, "version", 0):
            return  # we already show this version
        self.fetch_proto(name)

    def _on_task_queued(self, p: dict, seq: int, ts: float | None) -> None:
        tid = str(p.get("task_id", p.get("id", "")))
        if not tid:
            return
        rec = self._task(tid, refresh=False)
        rec.text = rec.text or str(p.get("text") or "")
        if rec.status not in ("running", "done", "failed", "cancelled"):
            rec.status = "queued"
        rec.mark_start(ts or time.time())
        rec._mark(seq)
        self._bump_queue(+1, p)
        shown = self.tasks.get(self.transcript.task_id)
        if shown is None or not shown.running:
            self.show_task(tid)   # refreshes the history
        else:
            self._refresh_history()

    def _on_task_step(self, p: dict, seq: int, ts: float | None) -> None:
        tid = str(p.get("task_id", ""))
        rec = self._task(tid)
        was_queued = rec.status == "queued"
        turn = rec.apply_step(p, ts, seq)
        if was_queued and rec.status == "running":
            self._bump_queue(-1, {})
            self._refresh_history()
        if self.transcript.task_id == tid:
            self._mark("transcript", tid)
            node = str(p.get("node") or "")
            if node and node not in self.strip.visited:
                self.stage(self.strip, visited=self.strip.visited + [node])
        if turn is not None and turn.dissonance is not None:
            for other in DISSONANCE_PERSONAS:
                m = self.canvas.get(other)
                if isinstance(m, ProtoMorph):
                    self.stage(m, dissonance=turn.dissonance)
        persona = p.get("persona") or ""
        m = self.canvas.get(persona)
        if isinstance(m, ProtoMorph) and turn is not None and turn.text \
                and p.get("node") != "alfred_route":
            self.stage(m, utterance=turn.text, streaming=False)
        self._show_activity(self.activity.on_step(p))

    def _on_task_token(self, p: dict, seq: int, ts: float | None) -> None:
        tid = str(p.get("task_id", ""))
        if not tid:
            return
        rec = self._task(tid)
        was_queued = rec.status == "queued"
        if not rec.apply_token(p, ts, seq):
            return
        if was_queued:
            self._bump_queue(-1, {})
            self._refresh_history()
        self._mark("transcript", tid)
        changed = self.activity.on_token(p)
        m = self.canvas.get(str(p.get("persona") or ""))
        if isinstance(m, ProtoMorph) and rec.partial is not None:
            # the morph shows the end of what is being said (it cuts the text to fit)
            self.stage(m, utterance=rec.partial.text[-600:], streaming=True)
        if changed:
            self._show_activity(changed)

    def _on_task_end(self, p: dict, seq: int, status: str) -> None:
        tid = str(p.get("task_id", p.get("id", "")))
        rec = self._task(tid, refresh=False)
        if rec.status == "queued":
            self._bump_queue(-1, {})
        rec.end(status, p, seq)
        if status == "done":
            alfred = self.canvas.get("ALFRED")
            if isinstance(alfred, ProtoMorph) and rec.answer:
                self.stage(alfred, utterance=rec.answer, streaming=False)
        else:
            self.add_log("warning" if status == "cancelled" else "error",
                         f"task {tid} {status}: {rec.error}", "tasks")
        for name in DISSONANCE_PERSONAS + ("ALFRED",):
            m = self.canvas.get(name)
            if isinstance(m, ProtoMorph) and self.staged(m, "streaming"):
                self.stage(m, streaming=False)
        self._show_activity(self.activity.on_end(tid))
        self._mark("transcript", tid)
        self._refresh_history()

    def _bump_queue(self, delta: int, p: dict) -> None:
        q = p.get("queue_length")
        if isinstance(q, int):
            self._queue_len = q
        elif self._queue_len is not None:
            self._queue_len = max(0, self._queue_len + delta)
        else:
            self._queue_len = max(0, delta)
        self.bar.queue = self._queue_len

    def _on_model_loading(self, p: dict, _seq: int, _ts: float | None) -> None:
        model = p.get("model") or p.get("model_name") or "?"
        frac = p.get("progress")
        stage = p.get("stage")
        self.bar.progress_text = f"loading {model}" + (f": {stage}" if stage else "…")
        self.bar.progress = float(frac) if isinstance(frac, (int, float)) and frac > 0 \
            else -1
        self._show_activity(self.activity.on_model_loading(str(model)))

    def _on_model_loaded(self, p: dict, _seq: int, _ts: float | None) -> None:
        model = p.get("model") or p.get("model_name") or "?"
        self.bar.model = str(model)
        secs = p.get("seconds") or p.get("load_s")
        self.bar.progress_text = f"loaded {model}" + (
            f" in {secs:.1f}s" if isinstance(secs, (int, float)) else "")
        self.bar.progress = 0
        self._show_activity(self.activity.on_model_loaded())

    def _on_model_unloaded(self, p: dict, _seq: int, _ts: float | None) -> None:
        model = p.get("model") or p.get("model_name")
        if not model or self.staged(self.status_bar, "model") == model:
            self.bar.model = "none"

    def _on_finetune(self, p: dict, _seq: int, _ts: float | None) -> None:
        step, loss = p.get("step"), p.get("loss")
        total = p.get("max_steps") or p.get("total_steps")
        persona = p.get("persona", "")
        text = f"fine-tuning {persona} step {step}"
        if p.get("stage") and p["stage"] != "training":
            text = f"fine-tuning {persona}: {p['stage']}"
        if isinstance(total, int) and total:
            text += f"/{total}"
            if isinstance(step, (int, float)):
                self.bar.progress = min(1.0, step / total)
        if isinstance(loss, (int, float)):
            text += f" loss {loss:.4f}"
        self.bar.progress_text = text
        self._show_activity(self.activity.on_finetune(persona, True))

    def _finetune_over(self, persona: str) -> None:
        self._show_activity(self.activity.on_finetune(persona, False))

    def _on_model_tuned(self, p: dict, _seq: int, _ts: float | None) -> None:
        persona = p.get("persona", "")
        self.bar.progress_text = f"fine-tune of {persona} finished"
        self.bar.progress = 0
        self._finetune_over(persona)

    def _on_model_swapped(self, p: dict, _seq: int, _ts: float | None) -> None:
        persona = p.get("persona", "")
        what = "rolled back" if p.get("rollback") else "swapped"
        text = f"{persona} {what}: {p.get('old')} -> {p.get('new')}"
        self.bar.progress_text = text
        self.add_log("info", text, "finetune")
        self._finetune_over(persona)

    def _on_dissonance_high(self, p: dict, _seq: int, _ts: float | None) -> None:
        d = p.get("dissonance")
        self.add_log("warning", f"high dissonance {d:.2f} on task {p.get('task_id')}"
                     if isinstance(d, (int, float)) else "high dissonance", "cognition")

    def _on_goal_generated(self, p: dict, _seq: int, _ts: float | None) -> None:
        self.add_log("info", f"new goal ({p.get('trigger') or 'idle'}): {p.get('goal')}",
                     "motivator")

    def _on_tool_forging(self, p: dict, _seq: int, _ts: float | None) -> None:
        name = _tool_name(p) or "?"
        attempt, most = p.get("attempt"), p.get("max_attempts")
        text = f"forging {name}"
        if attempt is not None:
            text += f" (attempt {attempt}" + (f"/{most}" if most else "") + ")"
        if p.get("stage"):
            text += f": {p['stage']}"
        self.bar.progress_text = text

    def _on_tool_created(self, p: dict, _seq: int, _ts: float | None) -> None:
        """The forge's payload: {tool: name, version, description, passed, total, ...}."""
        data = dict(p["tool"]) if isinstance(p.get("tool"), dict) else dict(p)
        name = _tool_name(p)
        if name:
            data["name"] = name
            self.add_tool(data)
            self.bar.progress_text = f"tool {name} created"

    def _on_tool_rejected(self, p: dict, _seq: int, _ts: float | None) -> None:
        name = _tool_name(p) or "?"
        self.bar.progress_text = f"tool {name} rejected"
        self.add_log("warning", f"tool {name} rejected: {p.get('reason') or p.get('error') or ''}",
                     "forge")

    def _on_codex_proposed(self, p: dict, _seq: int, _ts: float | None) -> None:
        data = p.get("proposal") if isinstance(p.get("proposal"), dict) else p
        if isinstance(data.get("base_version"), int):
            self.codex_version = max(self.codex_version, data["base_version"])
        self.add_proposal(data)

    def _on_codex_decided(self, p: dict, _seq: int, _ts: float | None) -> None:
        if isinstance(p.get("codex_version"), int):
            self.codex_version = p["codex_version"]
        key = proposal_key(p)
        if key:
            self._close_proposal(key)

    def _on_image_restored(self, p: dict, _seq: int, _ts: float | None) -> None:
        self.add_log("info", f"image restored from snapshot {p.get('snapshot')} (the state "
                             f"before is {p.get('pre_restore')})", "time travel")
        self.resync()

    def _on_log(self, p: dict, _seq: int, _ts: float | None) -> None:
        self.add_log(str(p.get("level") or "info"), str(p.get("message") or p.get("msg") or ""),
                     str(p.get("source") or p.get("logger") or "daemon"))

    _HANDLERS: dict[str, Callable[..., None]] = {
        "heartbeat": _on_heartbeat,
        "proto.changed": _on_proto_changed,
        "task.queued": _on_task_queued,
        "task.step": _on_task_step,
        "task.token": _on_task_token,
        "task.done": lambda self, p, seq, ts: self._on_task_end(p, seq, "done"),
        "task.failed": lambda self, p, seq, ts: self._on_task_end(p, seq, "failed"),
        "task.cancelled": lambda self, p, seq, ts: self._on_task_end(p, seq, "cancelled"),
        "model.loading": _on_model_loading,
        "model.loaded": _on_model_loaded,
        "model.unloaded": _on_model_unloaded,
        "finetune.progress": _on_finetune,
        "model.tuned": _on_model_tuned,
        "model.swapped": _on_model_swapped,
        "dissonance.high": _on_dissonance_high,
        "goal.generated": _on_goal_generated,
        "tool.forging": _on_tool_forging,
        "tool.created": _on_tool_created,
        "tool.rejected": _on_tool_rejected,
        "codex.proposed": _on_codex_proposed,
        "codex.decided": _on_codex_decided,
        "image.restored": _on_image_restored,
        "log": _on_log,
    }


class _Staged:
    """Attribute access to a widget whose writes wait for the next display refresh."""

    def __init__(self, controller: MorphicController, widget: Any) -> None:
        object.__setattr__(self, "_c", controller)
        object.__setattr__(self, "_w", widget)

    def __getattr__(self, key: str) -> Any:
        return self._c.staged(self._w, key)

    def __setattr__(self, key: str, value: Any) -> None:
        self._c.stage(self._w, **{key: value})


def _tool_name(p: dict) -> str:
    tool = p.get("tool")
    if isinstance(tool, dict):
        tool = tool.get("name")
    return str(p.get("name") or tool or "")


def _is_tool_proto(data: dict) -> bool:
    """Forged tools are protos too (tool.NAME, tool.NAME.vN); they get ToolMorphs."""
    return str(data.get("name", "")).startswith("tool.")


def _task_id_arg(tid: str) -> int | str:
    return int(tid) if tid.isdigit() else tid

