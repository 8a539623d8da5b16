"""The controller: owns the UI's logic; the widgets only show what it sets.

It reads daemon events with one bounded, non-blocking poll per Clock tick (never one
``schedule_once`` per message, which backs up under bursts), applies each event to the
widgets on the main thread, and sends commands through a :class:`CommandRunner` whose
replies are drained in the same tick. On connect, after a daemon restart or after a
gap in the event stream it asks ``system.snapshot`` once and rebuilds from it; apart
from that and ``proto.get`` after a ``proto.changed`` event, nothing asks the daemon
in a loop. While the daemon is unreachable it retries ``system.snapshot`` every
``retry_s`` seconds.

Tests drive it without sockets: :meth:`handle_event` takes an event directly and
:meth:`apply_snapshot` takes snapshot data.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from .approval import ApprovalDialog, proposal_key
from .inspector import Inspector
from .morphs import ProtoMorph, ToolMorph
from .transcript import TaskRecord, record_from_task, turn_from_step

if TYPE_CHECKING:
    from .bus_client import CommandRunner, Reply

log = logging.getLogger(__name__)

DISSONANCE_PERSONAS = ("BRICK", "ROBIN")
LOG_LINES = 500
MAX_REFRESH_S = 1.5   # the display is never staler than this, however slow repainting is


class MorphicController:
    """Event handling and user actions for a :class:`~a4ps.ui.app.MorphicRoot`."""

    def __init__(self, root: Any, runner: CommandRunner | None,
                 subscriber_factory: Callable[[], Any] | None = None, *,
                 max_events_per_tick: int = 500, retry_s: float = 2.0,
                 refresh_hz: float = 10.0) -> None:
        self.root = root
        self.runner = runner
        self._sub_factory = subscriber_factory
        self.subscriber: Any = None
        self.max_events_per_tick = max_events_per_tick
        self.retry_s = retry_s
        self.tasks: dict[str, TaskRecord] = {}
        self.tools: dict[str, dict] = {}
        self.proposals: dict[str, dict] = {}      # pending, in arrival order
        self.dialog: ApprovalDialog | None = None
        self.inspector: Inspector | None = None
        self.log_lines: deque[dict] = deque(maxlen=LOG_LINES)
        self._log_dirty = False
        # display changes from events are staged and applied at most refresh_hz
        # times a second: each application re-renders the morph canvas once, however
        # many events arrived in between (the latest value wins)
        self._staged: dict[Any, dict[str, Any]] = {}
        self.refresh_s = 1.0 / refresh_hz
        self._last_flush = 0.0
        self._flushed_last_tick = False
        self.refreshes = 0        # display refreshes so far (the benchmark reports them)
        self._thinking: set = set()
        self.flush_cost_s = 0.0   # how long a frame that re-renders the canvas takes
        self._fetching: set[str] = set()          # proto.get in flight
        self._refetch: set[str] = set()           # changed again while in flight
        self._snapshot_in_flight = False
        self._last_retry = 0.0
        self.connected = False
        self.events_seen = 0
        self.ticks = 0
        self._queue_len: int | None = None
        self.codex_version = 0
        self.boot_id: str | None = None           # the daemon run the view was built from

    # -- widgets -------------------------------------------------------------------
    @property
    def canvas(self):
        return self.root.ids.canvas

    @property
    def transcript(self):
        return self.root.ids.transcript

    @property
    def status_bar(self):
        return self.root.ids.status_bar

    @property
    def bar(self) -> _Staged:
        """The status bar through the display refresh (writes are staged)."""
        return _Staged(self, self.root.ids.status_bar)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Open the event stream and ask for the first snapshot."""
        if self._sub_factory is not None and self.subscriber is None:
            try:
                self.subscriber = self._sub_factory()
            except Exception as e:  # bad address: show it, keep the window usable
                self.status_bar.connection = f"cannot subscribe: {e}"
        self._set_connected(False, "connecting…")
        self.resync()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.close()
        sub, self.subscriber = self.subscriber, None
        if sub is not None and hasattr(sub, "close"):
            sub.close()

    def tick(self, dt: float = 0.0) -> int:
        """One Clock tick: a bounded poll of events, then finished command replies."""
        self.ticks += 1
        n = 0
        sub = self.subscriber
        if sub is not None:
            try:
                events = sub.poll(self.max_events_per_tick, 0)
            except Exception as e:
                log.warning("event poll failed: %s", e)
                events = []
            for ev in events:
                self.handle_event(ev.topic, ev.payload)
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
        now = time.monotonic()
        if self._flushed_last_tick:
            # dt spans the frame that re-rendered the canvas: learn what that costs
            dt = float(dt or 0.0)   # rises at once, decays slowly
            self.flush_cost_s = dt if dt > self.flush_cost_s else \
                0.8 * self.flush_cost_s + 0.2 * dt
            self._flushed_last_tick = False
        # one display refresh (morphs, status bar, log) at most refresh_hz times a
        # second, and never more than a quarter of the time spent repainting: slow
        # software GL (llvmpipe) keeps a usable frame rate under event bursts
        interval = min(max(self.refresh_s, 4 * self.flush_cost_s), MAX_REFRESH_S)
        if (self._staged or self._log_dirty) and now - self._last_flush >= interval:
            self.flush_morphs()
            if self._log_dirty:
                self.root.ids.log_panel.lines = list(self.log_lines)
                self._log_dirty = False
            self._last_flush = now
            self._flushed_last_tick = True
            self.refreshes += 1
        return n

    @property
    def settled(self) -> bool:
        """True when every staged display change has been applied."""
        return not self._staged and not self._log_dirty

    def stage(self, morph: Any, **props: Any) -> None:
        """Set display properties on ``morph`` at the next morph refresh."""
        pending = self._staged.get(morph)
        for key, value in props.items():
            if pending is not None and key in pending:
                pending[key] = value
            elif getattr(morph, key) != value:
                self._staged.setdefault(morph, {})[key] = value
                pending = self._staged[morph]

    def staged(self, morph: Any, prop: str) -> Any:
        """The value ``prop`` will have after the next refresh."""
        return self._staged.get(morph, {}).get(prop, getattr(morph, prop))

    def flush_morphs(self) -> None:
        staged, self._staged = self._staged, {}
        for morph, props in staged.items():
            for key, value in props.items():
                setattr(morph, key, value)

    def _set_connected(self, ok: bool, text: str | None = None) -> None:
        self.connected = ok
        self.status_bar.connected = ok
        self.status_bar.connection = text or ("connected" if ok else "disconnected")

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
        self.apply_snapshot(reply.result or {})
        self._set_connected(True)

    # -- snapshot --------------------------------------------------------------------
    def apply_snapshot(self, snap: dict[str, Any]) -> None:
        """Rebuild morphs, tools, proposals, tasks and status from ``system.snapshot``."""
        daemon = snap.get("daemon") if isinstance(snap.get("daemon"), dict) else {}
        if daemon.get("boot_id"):
            self.boot_id = str(daemon["boot_id"])
        protos = snap.get("protos") or {}
        if isinstance(protos, dict):
            protos = [dict(v, name=v.get("name", k)) for k, v in protos.items()]
        names = set()
        for data in protos:
            if isinstance(data, dict) and data.get("name") and not _is_tool_proto(data):
                names.add(data["name"])
                self.apply_proto(data)
        for name in list(self.canvas.morphs):
            morph = self.canvas.morphs[name]
            if isinstance(morph, ProtoMorph) and name not in names and protos:
                self.canvas.remove_morph(name)
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
            if isinstance(t, dict):
                rec = record_from_task(t)
                if rec.task_id and rec.task_id not in self.tasks:
                    self.tasks[rec.task_id] = rec
        self._refresh_history()
        status = snap.get("status") if isinstance(snap.get("status"), dict) else snap
        self.apply_status(status)

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
    def apply_proto(self, data: dict) -> ProtoMorph:
        name = data["name"]
        morph = self.canvas.get(name)
        slots = data.get("slots") or {}
        pos = _pos(slots.get("morph_pos"))
        if not isinstance(morph, ProtoMorph):
            morph = ProtoMorph(name=name, controller=self,
                               show_dissonance=name in DISSONANCE_PERSONAS)
            morph.apply_proto(data)
            self.canvas.add_morph(morph, pos)
        else:
            morph.apply_proto(data)
            if pos is not None and not morph.dragging:
                morph.pos = pos
        if self.inspector is not None and self.inspector.proto_name == name:
            self.inspector.busy = False
            self.inspector.show_proto(data)
        return morph

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
                self.canvas.remove_morph(name)
            if name in self._refetch:
                self._refetch.discard(name)
                self.fetch_proto(name)
        self.call("proto.get", {"name": name}, done)

    def morph_moved(self, morph) -> None:
        """A drag ended: save the position into the image."""
        if isinstance(morph, ToolMorph):
            return  # tools have no writable position slot
        pos = [round(float(morph.x), 1), round(float(morph.y), 1)]

        def done(reply: Reply) -> None:
            if not reply.ok:
                self.add_log("error", f"could not save {morph.name}'s position: {reply.message}")
        self.call("proto.update", {"name": morph.name, "slots": {"morph_pos": pos}}, done)

    def update_proto(self, name: str, slots: dict | None = None, methods: dict | None = None,
                     expected_version: int | None = None,
                     on_error: Callable[[str], None] | None = None) -> None:
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

    # -- inspector -----------------------------------------------------------------
    def open_inspector(self, name: str) -> Inspector:
        if self.inspector is not None:
            self.inspector.dismiss()
        insp = Inspector(controller=self, proto_name=name)
        self.inspector = insp
        insp.open(animation=False)
        self.fetch_proto(name)
        return insp

    def inspector_closed(self, insp: Inspector) -> None:
        if self.inspector is insp:
            self.inspector = None

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
        text = (text or "").strip()
        if not text:
            return

        def done(reply: Reply) -> None:
            if not reply.ok:
                self.add_log("error", f"task not submitted: {reply.message}")
                self.root.ids.task_error.text = reply.message
                return
            self.root.ids.task_error.text = ""
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
        if self.dialog is None:
            self._open_next_proposal()

    def _open_next_proposal(self) -> None:
        if self.dialog is not None or not self.proposals:
            return
        p = next(iter(self.proposals.values()))
        self.dialog = ApprovalDialog(p, controller=self)
        self.dialog.open(animation=False)

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
        if self.dialog is not None and self.dialog.proposal_id == key:
            self.dialog.dismiss(animation=False)
            self.dialog = None
        self._open_next_proposal()

    # -- log -----------------------------------------------------------------------
    def add_log(self, level: str, message: str, source: str = "ui") -> None:
        self.log_lines.append({"text": f"[{level.upper()[:5]:5}] {source}: {message}",
                               "level": level})
        self._log_dirty = True

    # -- events --------------------------------------------------------------------
    def handle_event(self, topic: str, payload: dict[str, Any]) -> None:
        """Apply one daemon event to the widgets (main thread only)."""
        self.events_seen += 1
        fn = self._HANDLERS.get(topic)
        if fn is None:
            return
        try:
            fn(self, payload or {})
        except Exception:  # one odd event must not stop the stream
            log.exception("UI could not apply event %s", topic)

    def _on_heartbeat(self, p: dict) -> None:
        if not self.connected and not self._snapshot_in_flight:
            self.resync()
        self.apply_status(p)

    def _on_proto_changed(self, p: dict) -> None:
        name = p.get("name")
        if not name or str(name).startswith("tool."):
            return   # tool protos are shown by tool.created / the snapshot's tool list
        if p.get("change") == "removed":
            self._staged.pop(self.canvas.get(name), None)
            self.canvas.remove_morph(name)
            return
        morph = self.canvas.get(name)
        version = p.get("version")
        if isinstance(morph, ProtoMorph) and isinstance(version, int) \
                and version <= morph.version:
            return  # we already show this version
        self.fetch_proto(name)

    def _on_task_queued(self, p: dict) -> None:
        tid = str(p.get("task_id", p.get("id", "")))
        if not tid:
            return
        rec = self._task(tid, refresh=False)
        rec.text = rec.text or str(p.get("text") or "")
        rec.status = "queued"
        self._bump_queue(+1, p)
        if not self.transcript.task_id:
            self.show_task(tid)   # refreshes the history
        else:
            self._refresh_history()

    def _on_task_step(self, p: dict) -> None:
        tid = str(p.get("task_id", ""))
        rec = self._task(tid)
        if rec.status == "queued":
            self._bump_queue(-1, {})
        rec.status = "running"
        turn = turn_from_step(p)
        if turn.text or turn.dissonance is not None:
            rec.turns.append(turn)
            self.transcript.append(rec, turn)
        else:
            self.transcript.update(rec)
        if turn.dissonance is not None:
            for other in DISSONANCE_PERSONAS:
                m = self.canvas.get(other)
                if isinstance(m, ProtoMorph):
                    self.stage(m, dissonance=turn.dissonance)
        morph = self.canvas.get(p.get("persona") or "")
        if isinstance(morph, ProtoMorph):
            self._stop_thinking(keep=morph)
            self._thinking.add(morph)
            self.stage(morph, status="thinking")
            if turn.text and p.get("node") != "alfred_route":
                self.stage(morph, utterance=turn.text)

    def _on_task_end(self, p: dict, status: str) -> None:
        tid = str(p.get("task_id", p.get("id", "")))
        rec = self._task(tid, refresh=False)
        if rec.status == "queued":
            self._bump_queue(-1, {})
        rec.status = status
        if status == "done":
            answer = p.get("answer") or p.get("result")
            if isinstance(answer, dict):
                answer = answer.get("answer") or answer.get("text")
            rec.answer = str(answer or rec.answer)
            alfred = self.canvas.get("ALFRED")
            if isinstance(alfred, ProtoMorph) and rec.answer:
                self.stage(alfred, utterance=rec.answer)
        else:
            rec.error = str(p.get("error") or p.get("message") or "failed")
        self._stop_thinking()
        self.transcript.update(rec)
        self._refresh_history()

    def _stop_thinking(self, keep: Any = None) -> None:
        """The persona that spoke last is thinking; the others go back to idle."""
        for m in list(self._thinking):
            if m is not keep:
                self._thinking.discard(m)
                if self.staged(m, "status") == "thinking":
                    self.stage(m, status="idle")

    def _bump_queue(self, delta: int, p: dict) -> None:
        q = p.get("queue_length")
        if isinstance(q, int):
            self._queue_len = q
        elif self._queue_len is not None:
            self._queue_len = max(0, self._queue_len + delta)
        else:
            self._queue_len = max(0, delta)
        self.bar.queue = self._queue_len

    def _persona_morphs_for_model(self, p: dict) -> list[ProtoMorph]:
        persona = p.get("persona")
        model = p.get("model") or p.get("model_name")
        out = []
        for m in self.canvas.morphs.values():
            if isinstance(m, ProtoMorph) and (m.name == persona or
                                              (model and m.model_name == model)):
                out.append(m)
        return out

    def _on_model_loading(self, p: dict) -> None:
        model = p.get("model") or p.get("model_name") or "?"
        frac = p.get("progress")
        stage = p.get("stage")
        self.bar.progress_text = f"loading {model}" + (f": {stage}" if stage else "…")
        self.bar.progress = float(frac) if isinstance(frac, (int, float)) and frac > 0 \
            else -1
        for m in self._persona_morphs_for_model(p):
            self.stage(m, status="loading model")

    def _on_model_loaded(self, p: dict) -> None:
        model = p.get("model") or p.get("model_name") or "?"
        self.bar.model = str(model)
        secs = p.get("seconds") or p.get("load_s")
        self.bar.progress_text = f"loaded {model}" + (
            f" in {secs:.1f}s" if isinstance(secs, (int, float)) else "")
        self.bar.progress = 0
        for m in self._persona_morphs_for_model(p):
            if self.staged(m, "status") == "loading model":
                self.stage(m, status="idle")

    def _on_model_unloaded(self, p: dict) -> None:
        model = p.get("model") or p.get("model_name")
        if not model or self.bar.model == model:
            self.bar.model = "none"

    def _on_finetune(self, p: dict) -> None:
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
        m = self.canvas.get(persona)
        if isinstance(m, ProtoMorph):
            self.stage(m, status="fine-tuning")

    def _on_model_tuned(self, p: dict) -> None:
        persona = p.get("persona", "")
        self.bar.progress_text = f"fine-tune of {persona} finished"
        self.bar.progress = 0
        m = self.canvas.get(persona)
        if isinstance(m, ProtoMorph) and self.staged(m, "status") == "fine-tuning":
            self.stage(m, status="idle")

    def _on_model_swapped(self, p: dict) -> None:
        persona = p.get("persona", "")
        what = "rolled back" if p.get("rollback") else "swapped"
        text = f"{persona} {what}: {p.get('old')} -> {p.get('new')}"
        self.bar.progress_text = text
        self.add_log("info", text, "finetune")
        m = self.canvas.get(persona)
        if isinstance(m, ProtoMorph) and self.staged(m, "status") == "fine-tuning":
            self.stage(m, status="idle")

    def _on_dissonance_high(self, p: dict) -> None:
        d = p.get("dissonance")
        self.add_log("warning", f"high dissonance {d:.2f} on task {p.get('task_id')}"
                     if isinstance(d, (int, float)) else "high dissonance", "cognition")

    def _on_goal_generated(self, p: dict) -> None:
        self.add_log("info", f"new goal ({p.get('trigger') or 'idle'}): {p.get('goal')}",
                     "motivator")

    def _on_tool_forging(self, p: dict) -> None:
        name = _tool_name(p) or "?"
        attempt, most = p.get("attempt"), p.get("max_attempts")
        text = f"forging {name}"
        if attempt is not None:
            text += f" (attempt {attempt}" + (f"/{most}" if most else "") + ")"
        if p.get("stage"):
            text += f": {p['stage']}"
        self.bar.progress_text = text

    def _on_tool_created(self, p: dict) -> None:
        """The forge's payload: {tool: name, version, description, passed, total, ...}."""
        data = dict(p["tool"]) if isinstance(p.get("tool"), dict) else dict(p)
        name = _tool_name(p)
        if name:
            data["name"] = name
            self.add_tool(data)
            self.bar.progress_text = f"tool {name} created"

    def _on_tool_rejected(self, p: dict) -> None:
        name = _tool_name(p) or "?"
        self.bar.progress_text = f"tool {name} rejected"
        self.add_log("warning", f"tool {name} rejected: {p.get('reason') or p.get('error') or ''}",
                     "forge")

    def _on_codex_proposed(self, p: dict) -> None:
        data = p.get("proposal") if isinstance(p.get("proposal"), dict) else p
        if isinstance(data.get("base_version"), int):
            self.codex_version = max(self.codex_version, data["base_version"])
        self.add_proposal(data)

    def _on_codex_decided(self, p: dict) -> None:
        if isinstance(p.get("codex_version"), int):
            self.codex_version = p["codex_version"]
        key = proposal_key(p)
        if key:
            self._close_proposal(key)

    def _on_log(self, p: dict) -> None:
        self.add_log(str(p.get("level") or "info"), str(p.get("message") or p.get("msg") or ""),
                     str(p.get("source") or p.get("logger") or "daemon"))

    _HANDLERS: dict[str, Callable[[MorphicController, dict], None]] = {
        "heartbeat": _on_heartbeat,
        "proto.changed": _on_proto_changed,
        "task.queued": _on_task_queued,
        "task.step": _on_task_step,
        "task.done": lambda self, p: self._on_task_end(p, "done"),
        "task.failed": lambda self, p: self._on_task_end(p, "failed"),
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


def _pos(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return (float(value[0]), float(value[1]))
    return None


def _task_id_arg(tid: str) -> int | str:
    return int(tid) if tid.isdigit() else tid
