"""The Morphic UI with real Kivy widgets, headless, fed events directly.

Commands go through the real CommandRunner to ``LocalDaemon``, a stand-in for the
command seam backed by a real ProtoManager and Codex (same errors as the daemon);
tests against a real daemon process are in test_ui_daemon.py.
"""
from __future__ import annotations

import ui_harness  # noqa: F401  (sets Kivy's environment before Kivy is imported)

import itertools
import time

import pytest

from a4ps.client import DaemonError, DaemonUnavailable
from a4ps.protocol import EventMessage
from a4ps.ui import values as V


# -- plain rules (no window) ----------------------------------------------------------

def test_parse_value_keeps_the_slot_type():
    assert V.parse_value("0.25", 0.7) == 0.25
    assert V.parse_value(" 3 ", 1) == 3
    assert V.parse_value("false", True) is False
    assert V.parse_value("[1, 2]", [0]) == [1, 2]
    assert V.parse_value('{"a": [1]}', {"b": 2}) == {"a": [1]}
    assert V.parse_value("two words", "x") == "two words"
    for text, like in [("hot", 0.7), ("1.5", 3), ("maybe", True), ("{", [1]), ("[1]", {"a": 1}),
                       ("nan", 0.5)]:
        with pytest.raises(V.EditError):
            V.parse_value(text, like)


def test_nested_replace_and_diff_markup():
    value = {"a": [1, {"b": 2}]}
    new = V.replace_at(value, ("a", 1, "b"), 5)
    assert new == {"a": [1, {"b": 5}]} and value == {"a": [1, {"b": 2}]}
    assert V.children([7, 8]) == [(0, 7), (1, 8)]
    markup = V.diff_markup("keep\nold [x]", "keep\nnew")
    assert "[color=ff7a7a]- old &bl;x&br;[/color]" in markup
    assert "[color=7aff8a]+ new[/color]" in markup and "  keep" in markup


# -- a stand-in for the command seam ---------------------------------------------------

class LocalDaemon:
    """Answers UI commands from a real ProtoManager and Codex, like the daemon does."""

    def __init__(self, settings):
        from a4ps.events import EventBus
        from a4ps.proto import ProtoManager
        self.bus = EventBus()
        self.protos = ProtoManager(self.bus)
        self.calls: list[tuple[str, dict]] = []
        self.down = False
        self.tasks = itertools.count(1)
        self.protos.create("persona", {"status": "idle", "temperature": 0.5},
                           methods={"hello": "def hello(self):\n    return 'hi'\n"})
        for name, role in [("ALFRED", "steward"), ("BRICK", "logic"), ("ROBIN", "empathy")]:
            self.protos.create(name, {"role": role, "model_name": "smollm2-135m",
                                      "temperature": 0.7, "system_prompt": f"You are {name}.",
                                      "last_utterance": "", "verbose": False,
                                      "limits": {"rounds": 3, "tags": ["a", "b"]}},
                               parent="persona")
        self.decided: list[dict] = []
        self.codex_version = 4

    def request(self, cmd, args=None, timeout=None):
        from a4ps.proto import ProtoError
        args = dict(args or {})
        self.calls.append((cmd, args))
        if self.down:
            raise DaemonUnavailable("no daemon (test)")
        try:
            if cmd == "system.snapshot":
                return {"protos": [p.to_dict() for p in self.protos],
                        "tools": [{"name": "fib", "description": "fibonacci numbers",
                                   "version": 2, "tests_passed": 4, "tests_total": 4}],
                        "codex": {"version": self.codex_version, "pending": []},
                        "pending_amendments": [],
                        "tasks": [],
                        "status": {"models": {"resident": "smollm2-135m"},
                                   "queue": {"pending": 2}}}
            if cmd == "proto.get":
                return self.protos.get(args["name"]).to_dict()
            if cmd == "proto.update":
                if args.get("expected_version") not in (None, self.protos.get(args["name"]).version):
                    raise DaemonError("conflict", "stale version: reload it and try again")
                return self.protos.update(args["name"], args.get("slots"),
                                          methods=args.get("methods")).to_dict()
            if cmd == "task.submit":
                return {"id": f"t{next(self.tasks)}", "text": args["text"], "status": "queued"}
            if cmd == "task.get":
                return {"id": args["id"], "text": "old question", "status": "done",
                        "result": {"answer": "old answer",
                                   "turns": [{"persona": "BRICK", "round": 1, "text": "b1"},
                                             {"persona": "ROBIN", "round": 1, "text": "r1"},
                                             {"persona": "ALFRED", "round": "answer",
                                              "text": "old answer"}],
                                   "rounds": [{"round": 1, "dissonance": 0.4}]}}
            if cmd == "codex.get":
                return {"version": self.codex_version}
            if cmd == "codex.decide":
                if args["version"] != self.codex_version:
                    raise DaemonError("conflict", "stale decision")
                self.decided.append(args)
                if args["approve"]:
                    self.codex_version += 1
                return {"id": args["proposal_id"], "codex_version": self.codex_version}
        except ProtoError as e:
            raise DaemonError("invalid_args", str(e)) from None
        raise DaemonError("unknown_command", cmd)


class ListSubscriber:
    """Events handed to the controller through the same poll() the real SUB uses."""

    def __init__(self):
        self.queue: list[EventMessage] = []
        self.polls: list[int] = []
        self.alive = True
        self.resync_needed = False
        self.seq = 0

    def push(self, topic, payload):
        self.seq += 1
        self.queue.append(EventMessage(topic=topic, seq=self.seq, ts=time.time(),
                                       payload=payload))

    def poll(self, max_events=500, timeout_ms=0):
        out, self.queue = self.queue[:max_events], self.queue[max_events:]
        self.polls.append(len(out))
        return out

    def mark_synced(self):
        self.resync_needed = False


@pytest.fixture(scope="module")
def ui():
    h = ui_harness.harness()
    yield h
    h.stop()


@pytest.fixture
def daemon(settings):
    return LocalDaemon(settings)


@pytest.fixture
def sub():
    return ListSubscriber()


@pytest.fixture
def app(ui, daemon, sub):
    from a4ps.ui.app import MorphicApp
    from a4ps.ui.bus_client import CommandRunner
    runner = CommandRunner(lambda: daemon, timeout=2)
    app = ui.start(MorphicApp(runner=runner, subscriber_factory=lambda: sub, poll_hz=60))
    ui.wait_until(lambda: app.controller.connected, 5, "the first snapshot")
    yield app
    ui.stop()


def settle(ui, app, daemon, n_calls=None, timeout=5.0):
    """Pump until the runner has no queued work and its replies were applied."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ui.pump(1)
        if app.controller.runner.pending == 0 and not app.controller.runner._done:
            ui.pump(2)
            if app.controller.runner.pending == 0 and not app.controller.runner._done:
                return
    raise AssertionError("commands did not settle")


# -- canvas --------------------------------------------------------------------------

def test_snapshot_builds_morphs_tools_and_status(ui, app):
    c = app.controller
    names = set(c.canvas.morphs)
    assert {"persona", "ALFRED", "BRICK", "ROBIN", "tool:fib"} <= names
    brick = c.canvas.get("BRICK")
    assert (brick.role, brick.model_name, brick.status) == ("logic", "smollm2-135m", "idle")
    assert brick.show_dissonance and not c.canvas.get("ALFRED").show_dissonance
    fib = c.canvas.get("tool:fib")
    assert (fib.tool_name, fib.version, fib.test_status) == ("fib", "2", "passed 4/4")
    assert c.status_bar.model == "smollm2-135m" and c.status_bar.queue == 2
    assert c.status_bar.connected
    # morphs don't overlap
    morphs = list(c.canvas.morphs.values())
    for a, b in itertools.combinations(morphs, 2):
        assert a.right <= b.x or b.right <= a.x or a.top <= b.y or b.top <= a.y


def test_drag_moves_morph_and_saves_position(ui, app, daemon):
    brick = app.controller.canvas.get("BRICK")
    x0, y0 = brick.pos
    ui.drag(brick, 120, -80)
    assert brick.pos[0] == pytest.approx(x0 + 120) and brick.pos[1] == pytest.approx(y0 - 80)
    settle(ui, app, daemon)
    assert daemon.protos.get("BRICK").morph_pos == [pytest.approx(x0 + 120),
                                                     pytest.approx(y0 - 80)]
    # a click without movement saves nothing
    n = len([c for c in daemon.calls if c[0] == "proto.update"])
    ui.click(brick)
    settle(ui, app, daemon)
    assert len([c for c in daemon.calls if c[0] == "proto.update"]) == n


def test_saved_position_is_used_and_followed_live(ui, app, daemon, sub):
    daemon.protos.update("ROBIN", {"morph_pos": [333.0, 111.0]})
    sub.push("proto.changed", {"name": "ROBIN", "change": "updated", "keys": ["morph_pos"],
                               "version": daemon.protos.get("ROBIN").version})
    ui.wait_until(lambda: tuple(app.controller.canvas.get("ROBIN").pos) == (333.0, 111.0),
                  5, "ROBIN to move")
    daemon.protos.create("GUEST", {"role": "visitor", "morph_pos": [50, 60]}, parent="persona")
    sub.push("proto.changed", {"name": "GUEST", "change": "created", "keys": [], "version": 1})
    guest = ui.wait_until(lambda: app.controller.canvas.get("GUEST"), 5, "a GUEST morph")
    assert tuple(guest.pos) == (50, 60) and guest.role == "visitor"
    sub.push("proto.changed", {"name": "GUEST", "change": "removed", "keys": [], "version": 1})
    ui.wait_until(lambda: app.controller.canvas.get("GUEST") is None, 5, "GUEST removed")


# -- inspector ----------------------------------------------------------------------

def open_inspector(ui, app, name):
    ui.right_click(app.controller.canvas.get(name))
    insp = ui.wait_until(lambda: app.controller.inspector, 5, "the inspector")
    ui.wait_until(lambda: insp.proto_name == name and "temperature" in insp.rows, 5, "rows")
    return insp


def test_right_click_opens_inspector_with_typed_rows(ui, app):
    insp = open_inspector(ui, app, "BRICK")
    rows = insp.rows
    assert rows["temperature"].kind == "float" and rows["verbose"].kind == "bool"
    assert rows["limits"].kind == "dict" and rows["limits"].drillable
    assert rows["status"].inherited_from == "persona"          # inherited, marked
    assert rows["role"].inherited_from == ""
    assert rows["hello()"].kind == "method" and rows["hello()"].inherited_from == "persona"
    assert "def hello(self" in rows["hello()"].value   # the inherited source, ready to override
    assert rows["temperature"].editor.text == "0.7"
    path = ui.screenshot("ui-inspector")
    print("inspector screenshot:", path)
    insp.close()
    ui.pump(2)
    assert app.controller.inspector is None


def test_inspector_edits_and_refusals(ui, app, daemon):
    insp = open_inspector(ui, app, "BRICK")
    row = insp.rows["temperature"]
    ui.type_into(row.editor, "0.25")
    settle(ui, app, daemon)
    assert daemon.protos.get("BRICK").temperature == 0.25
    ui.wait_until(lambda: insp.rows["temperature"].editor.text == "0.25", 5, "the new value")

    # a value that doesn't parse: local error, nothing sent, old value back
    version = daemon.protos.get("BRICK").version
    row = insp.rows["temperature"]
    ui.type_into(row.editor, "very hot")
    assert "not a number" in row.error and row.editor.text == "0.25"
    assert daemon.protos.get("BRICK").version == version

    # the daemon refuses (a method with a syntax error): its message shows, nothing changes
    row = insp.rows["hello()"]
    row.editor.text = "def hello(self):\n    return (\n"
    ui.click(row.ids.editor_box.parent.children[0])     # the Set button
    settle(ui, app, daemon)
    ui.wait_until(lambda: "syntax error" in insp.error, 5, "the daemon's error")
    assert "invalid_args" in insp.error
    assert daemon.protos.get("BRICK").version == version
    assert "hello" not in daemon.protos.get("BRICK").own_methods()

    # another slot changing in the daemon doesn't wipe an edit being typed
    row = insp.rows["system_prompt"]
    row.editor.focus = True
    row.editor.text = "half-typed"
    daemon.protos.update("BRICK", {"last_utterance": "new words"})
    app.controller.fetch_proto("BRICK")
    ui.wait_until(lambda: insp.rows["last_utterance"].editor.text == "new words", 5, "refresh")
    assert insp.rows["system_prompt"].editor.text == "half-typed"
    row.editor.focus = False
    version = daemon.protos.get("BRICK").version

    # booleans toggle with a check box
    insp.rows["verbose"].editor.active = True
    settle(ui, app, daemon)
    assert daemon.protos.get("BRICK").verbose is True
    insp.close()


def test_inspector_drills_into_nested_values(ui, app, daemon):
    insp = open_inspector(ui, app, "ROBIN")
    insp.rows["limits"].drill()
    ui.pump(2)
    assert set(insp.rows) == {"'rounds'", "'tags'"} and insp.crumb == "ROBIN.limits"
    insp.rows["'tags'"].drill()
    ui.pump(2)
    assert insp.crumb == "ROBIN.limits['tags']" and set(insp.rows) == {"0", "1"}
    ui.type_into(insp.rows["1"].editor, "zed")
    settle(ui, app, daemon)
    assert daemon.protos.get("ROBIN").limits == {"rounds": 3, "tags": ["a", "zed"]}
    ui.wait_until(lambda: "1" in insp.rows and insp.rows["1"].editor.text == "zed", 5, "refresh")
    insp.back()
    insp.back()
    assert insp.path == [] and "temperature" in insp.rows
    insp.close()


# -- tasks and transcript -------------------------------------------------------------

def test_task_box_submits_and_transcript_streams(ui, app, daemon, sub):
    root = app.root
    ui.type_into(root.ids.task_input, "What is courage?", validate=False)
    ui.click(root.ids.submit)
    settle(ui, app, daemon)
    assert ("task.submit", {"text": "What is courage?"}) in daemon.calls
    tr = app.controller.transcript
    assert tr.task_id == "t1" and root.ids.task_input.text == ""
    steps = [("alfred_route", "ALFRED", "contrapunto", None, None),
             ("brick", "BRICK", "Courage is acting despite fear.", 1, None),
             ("robin", "ROBIN", "Courage is a gentle heart that stays.", 1, None),
             ("measure", None, "dissonance 0.600", 1, 0.6),
             ("brick", "BRICK", "Agreed: persistence.", 2, None),
             ("robin", "ROBIN", "Yes, staying.", 2, None),
             ("measure", None, "dissonance 0.200", 2, 0.2),
             ("alfred_synthesize", "ALFRED", "Courage is staying with what matters.", 2, 0.2)]
    sub.push("task.queued", {"task_id": "t1", "text": "What is courage?"})
    for node, persona, text, rnd, d in steps:
        sub.push("task.step", {"task_id": "t1", "node": node, "persona": persona,
                               "text": text, "round": rnd, "dissonance": d})
        if persona == "BRICK":
            ui.wait_until(lambda: app.controller.canvas.get("BRICK").status == "thinking",
                          5, "BRICK thinking")
    sub.push("task.done", {"task_id": "t1", "answer": "Courage is staying with what matters."})
    ui.wait_until(lambda: "ALFRED's answer" in tr.answer, 5, "the answer")
    texts = [w.text for w in reversed(tr.ids.turns.children)]
    assert "BRICK" in texts[1] and "round 1" in texts[1] and "acting despite fear" in texts[1]
    assert "ROBIN" in texts[2] and "dissonance 0.60" in texts[3]
    assert "staying with what matters" in tr.answer
    assert tr.ids.plot.points == [0.6, 0.2]
    brick = app.controller.canvas.get("BRICK")
    ui.wait_until(lambda: app.controller.settled, 5, "the morphs to refresh")
    assert brick.dissonance == pytest.approx(0.2) and brick.utterance == "Agreed: persistence."
    assert brick.status == "idle"
    assert app.controller.canvas.get("ALFRED").utterance.startswith("Courage is staying")
    print("transcript screenshot:", ui.screenshot("ui-transcript"))


def test_earlier_tasks_can_be_reopened(ui, app, daemon, sub):
    c = app.controller
    sub.push("task.queued", {"task_id": "a", "text": "first"})
    sub.push("task.step", {"task_id": "a", "node": "brick", "persona": "BRICK", "text": "A!",
                           "round": 1})
    sub.push("task.done", {"task_id": "a", "answer": "answer A"})
    ui.pump(3)
    c.show_task("a")
    sub.push("task.queued", {"task_id": "b", "text": "second"})
    sub.push("task.done", {"task_id": "b", "answer": "answer B"})
    ui.pump(3)
    c.show_task("b")
    assert "answer B" in c.transcript.answer
    titles = c.transcript.history
    assert titles[0].startswith("#b") and any(t.startswith("#a") for t in titles)
    c.transcript.reopen(next(t for t in titles if t.startswith("#a")))
    assert "answer A" in c.transcript.answer and len(c.transcript.ids.turns.children) == 1
    # a task this UI never saw is fetched with task.get, rounds and all
    c.reopen_task("old7")
    settle(ui, app, daemon)
    assert c.transcript.task_id == "old7" and "old answer" in c.transcript.answer
    assert c.transcript.ids.plot.points == [0.4]


# -- approval ------------------------------------------------------------------------

PROPOSAL = {"id": "am-1", "persona": "ROBIN", "principle_id": "care",
            "current_text": "Be kind.\nListen first.", "proposed_text": "Be kind.\nListen twice.",
            "rationale": "users felt unheard", "base_version": 4, "status": "pending"}


def test_proposal_opens_dialog_and_approve_decides(ui, app, daemon, sub):
    sub.push("codex.proposed", PROPOSAL)
    sub.push("codex.proposed", {**PROPOSAL, "id": "am-2", "proposed_text": "Be bold."})
    dlg = ui.wait_until(lambda: app.controller.dialog, 5, "the approval dialog")
    assert dlg.proposal_id == "am-1" and dlg.persona == "ROBIN"
    assert "- Listen first." in dlg.diff_markup and "+ Listen twice." in dlg.diff_markup
    assert dlg.rationale == "users felt unheard"
    print("approval screenshot:", ui.screenshot("ui-approval"))
    ui.click(dlg.ids.approve)
    settle(ui, app, daemon)
    assert daemon.decided[0] == {"proposal_id": "am-1", "version": 4, "approve": True}
    nxt = ui.wait_until(lambda: app.controller.dialog is not dlg and app.controller.dialog,
                        5, "the next proposal")
    assert nxt.proposal_id == "am-2"
    ui.click(nxt.ids.reject)
    settle(ui, app, daemon)
    assert daemon.decided[1] == {"proposal_id": "am-2", "version": 5, "approve": False}
    assert app.controller.dialog is None


def test_proposal_decided_elsewhere_closes_dialog(ui, app, sub):
    sub.push("codex.proposed", {**PROPOSAL, "id": "am-9"})
    ui.wait_until(lambda: app.controller.dialog, 5, "the dialog")
    sub.push("codex.decided", {**PROPOSAL, "id": "am-9", "approved": False, "codex_version": 4})
    ui.wait_until(lambda: app.controller.dialog is None, 5, "the dialog to close")
    assert app.controller.dialog is None


def test_pending_proposals_in_snapshot_open_on_connect(ui, app):
    app.controller.apply_snapshot({"pending_amendments": [PROPOSAL]})
    ui.pump(2)
    assert app.controller.dialog is not None and app.controller.dialog.proposal_id == "am-1"


# -- tools, status, log, polling ------------------------------------------------------------

def test_tool_created_adds_tool_morph(ui, app, sub):
    # payloads as a4ps/tools/tool_forge.py publishes them
    sub.push("tool.forging", {"tool": "primes", "attempt": 2, "max_attempts": 3,
                              "stage": "testing"})
    ui.wait_until(lambda: app.controller.status_bar.progress_text ==
                  "forging primes (attempt 2/3): testing", 5, "forging progress")
    sub.push("tool.created", {"tool": "primes", "version": 1, "attempts": 2,
                              "description": "lists primes", "signature": "primes(n)",
                              "passed": 3, "total": 3, "seconds": 1.2})
    morph = ui.wait_until(lambda: app.controller.canvas.get("tool:primes"), 5, "a ToolMorph")
    assert (morph.description, morph.version, morph.test_status) == \
        ("lists primes", "1", "passed 3/3")
    assert morph in app.controller.canvas.children
    sub.push("tool.rejected", {"tool": "evil", "reason": "imports os", "attempts": 3})
    ui.wait_until(lambda: app.controller.status_bar.progress_text == "tool evil rejected", 5,
                  "the rejection")
    # the tool's own proto gets no ProtoMorph
    sub.push("proto.changed", {"name": "tool.primes", "change": "created", "keys": [],
                               "version": 1})
    ui.pump(5)
    assert app.controller.canvas.get("tool.primes") is None


def test_status_bar_follows_long_work_and_log(ui, app, sub):
    sb = app.controller.status_bar
    sub.push("model.loading", {"model": "phi3", "progress": 0.5, "stage": "weights"})
    ui.wait_until(lambda: sb.progress == 0.5, 5, "loading progress")
    assert "loading phi3" in sb.progress_text
    sub.push("model.loaded", {"model": "phi3", "seconds": 1.5})
    sub.push("finetune.progress", {"persona": "BRICK", "step": 3, "max_steps": 10, "loss": 1.25})
    sub.push("log", {"level": "warning", "message": "disk nearly full"})
    ui.wait_until(lambda: sb.progress == 0.3 and app.root.ids.log_panel.data, 5, "fine-tuning")
    assert sb.model == "phi3"
    assert sb.progress_text == "fine-tuning BRICK step 3/10 loss 1.2500" and sb.progress == 0.3
    assert app.controller.canvas.get("BRICK").status == "fine-tuning"
    sub.push("model.swapped", {"persona": "BRICK", "old": "smollm2-135m",
                               "new": "smollm2-135m+brick-v1", "version": 1})
    sub.push("dissonance.high", {"task_id": "t9", "dissonance": 0.81})
    sub.push("goal.generated", {"task_id": "t10", "goal": "learn haiku", "trigger": "idle"})
    ui.wait_until(lambda: app.controller.canvas.get("BRICK").status == "idle", 5, "swap")
    assert sb.progress_text == "BRICK swapped: smollm2-135m -> smollm2-135m+brick-v1"
    ui.wait_until(lambda: app.controller.settled, 5, "the log")
    lines = [d["text"] for d in app.root.ids.log_panel.data[-3:]]
    assert "high dissonance 0.81 on task t9" in lines[1] and "learn haiku" in lines[2]
    assert any(d["text"].endswith("daemon: disk nearly full")
               for d in app.root.ids.log_panel.data)


def test_poll_is_bounded_per_tick(ui, app, sub):
    c = app.controller
    c.max_events_per_tick = 100
    for i in range(350):
        sub.push("log", {"message": f"line {i}"})
    sub.polls.clear()
    c.tick()
    assert sub.polls == [100] and len(sub.queue) == 250
    log = app.root.ids.log_panel
    ui.wait_until(lambda: not sub.queue and log.data and
                  log.data[-1]["text"].endswith("line 349"), 5, "the rest of the burst")


def test_connection_lost_and_regained(ui, app, daemon, sub):
    c = app.controller
    c.retry_s = 0.1
    daemon.down = True
    sub.alive = False
    ui.pump(3)
    assert not c.status_bar.connected
    n = len([x for x in daemon.calls if x[0] == "system.snapshot"])
    ui.pump_for(0.5)
    assert len([x for x in daemon.calls if x[0] == "system.snapshot"]) > n   # it retries
    daemon.down = False
    sub.alive = True
    ui.wait_until(lambda: c.status_bar.connected, 5, "reconnection")
    assert c.status_bar.connection == "connected"


def test_bad_events_do_not_break_the_stream(ui, app, sub):
    sub.push("task.step", {"task_id": None, "round": "x", "dissonance": "high"})
    sub.push("proto.changed", {"name": None})
    sub.push("tool.created", {"description": "no name"})
    sub.push("log", {"message": "still alive"})
    ui.wait_until(lambda: app.root.ids.log_panel.data and
                  app.root.ids.log_panel.data[-1]["text"].endswith("still alive"), 5, "the log")
    assert app.root.ids.log_panel.data[-1]["text"].endswith("still alive")
