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
        self.protos.create("persona", {"temperature": 0.5, "last_utterance": "",
                                       "greeting": "hi"},
                           methods={"hello": "def hello(self):\n    return 'hi'\n"})
        for name, role in [("ALFRED", "steward"), ("BRICK", "logic"), ("ROBIN", "empathy")]:
            self.protos.create(name, {"role": role, "model_name": "smollm2-135m",
                                      "temperature": 0.7, "system_prompt": f"You are {name}.",
                                      "last_utterance": "", "verbose": False,
                                      "limits": {"rounds": 3, "tags": ["a", "b"]}},
                               parent="persona")
        self.decided: list[dict] = []
        self.codex_version = 4
        self.steps: dict[str, dict] = {}      # task.steps replies, set by a test
        self.snapshot_tasks: list[dict] = []

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
                        "tasks": list(self.snapshot_tasks),
                        "graph": GRAPH,
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
            if cmd == "proto.clone":
                return self.protos.clone(args["name"], args["new_name"],
                                         **(args.get("slots") or {})).to_dict()
            if cmd == "proto.remove":
                if args["name"] in ("ALFRED", "BRICK", "ROBIN"):
                    raise DaemonError("conflict", f"{args['name']} is a codex persona")
                self.protos.remove(args["name"])
                return {"removed": args["name"]}
            if cmd == "task.steps":
                if args["task_id"] not in self.steps:
                    raise DaemonError("not_found", f"no task {args['task_id']}")
                return self.steps[args["task_id"]]
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


# the graph's shape as system.snapshot sends it (a4ps.system.System.graph_shape)
GRAPH = {"nodes": ["__start__", "alfred_route", "recall", "brick", "robin", "measure", "forge",
                   "alfred_synthesize", "remember", "__end__"],
         "edges": [{"source": s, "target": t, "conditional": c, "label": lab} for s, t, c, lab in [
             ("__start__", "alfred_route", False, None), ("alfred_route", "recall", False, None),
             ("alfred_synthesize", "remember", False, None), ("brick", "forge", True, None),
             ("brick", "robin", True, None), ("forge", "brick", False, None),
             ("measure", "alfred_synthesize", True, "synthesize"),
             ("measure", "brick", True, "again"), ("recall", "alfred_synthesize", True, "direct"),
             ("recall", "brick", True, "contrapunto"), ("recall", "forge", True, "tool"),
             ("robin", "measure", False, None), ("remember", "__end__", False, None)]]}


class ListSubscriber:
    """Events handed to the controller through the same poll() the real SUB uses."""

    def __init__(self):
        self.queue: list[EventMessage] = []
        self.polls: list[int] = []
        self.alive = True
        self.resync_needed = False
        self.seq = 0

    def push(self, topic, payload, ts=None):
        self.seq += 1
        self.queue.append(EventMessage(topic=topic, seq=self.seq, ts=ts or time.time(),
                                       payload=payload))
        return self.seq

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
        if app.controller.runner.idle:
            ui.pump(2)
            if app.controller.runner.idle:
                return
    raise AssertionError("commands did not settle")


# -- canvas --------------------------------------------------------------------------

def boxes_of(canvas):
    return {n: (m.x, m.y, m.right, m.top) for n, m in canvas.morphs.items()}


def test_snapshot_builds_morphs_prototypes_tools_and_status(ui, app):
    c = app.controller
    assert {"ALFRED", "BRICK", "ROBIN", "tool:fib"} <= set(c.canvas.morphs)
    assert "persona" not in c.canvas.morphs and c.shelf.get("persona").clones == 3
    brick = c.canvas.get("BRICK")
    assert (brick.role, brick.model_name, brick.status, brick.activity) == \
        ("logic", "smollm2-135m", "idle", "idle")
    assert brick.show_dissonance and not c.canvas.get("ALFRED").show_dissonance
    fib = c.canvas.get("tool:fib")
    assert (fib.tool_name, fib.version, fib.test_status) == ("fib", "2", "passed 4/4")
    assert c.status_bar.model == "smollm2-135m" and c.status_bar.queue == 2
    assert c.status_bar.connected and not app.root.ids.submit.disabled
    assert c.strip.shape and "brick" in c.strip.boxes
    # top-left anchored, inside the canvas, no overlap
    for a, b in itertools.combinations(boxes_of(c.canvas).values(), 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    alfred = c.canvas.get("ALFRED")
    assert alfred.x == pytest.approx(12 * c.canvas.unit)
    assert c.canvas.height - alfred.top == pytest.approx(12 * c.canvas.unit)


def test_drag_moves_morph_and_saves_its_spot(ui, app, daemon):
    c = app.controller
    brick = c.canvas.get("BRICK")
    x0, y0 = brick.pos
    ui.drag(brick, 60, -40)
    assert brick.pos[0] == pytest.approx(x0 + 60) and brick.pos[1] == pytest.approx(y0 - 40)
    settle(ui, app, daemon)
    unit = c.canvas.unit
    saved = daemon.protos.get("BRICK").morph_pos
    assert saved == {"left": pytest.approx((x0 + 60) / unit, abs=0.1),
                     "top": pytest.approx((c.canvas.height - brick.top) / unit, abs=0.1)}
    # a click without movement saves nothing; it selects the morph (its halo shows)
    n = len([x for x in daemon.calls if x[0] == "proto.update"])
    ui.click(brick)
    settle(ui, app, daemon)
    assert len([x for x in daemon.calls if x[0] == "proto.update"]) == n
    assert c.selected is brick and app.root.ids.halo.opacity == 1
    # a drag beyond the canvas edge ends inside it
    ui.drag(brick, -2000, 0)
    settle(ui, app, daemon)
    assert brick.x >= 0 and daemon.protos.get("BRICK").morph_pos["left"] == 0


def test_saved_spot_is_used_and_followed_live(ui, app, daemon, sub):
    c = app.controller
    daemon.protos.update("ROBIN", {"morph_pos": {"left": 300, "top": 200}})
    sub.push("proto.changed", {"name": "ROBIN", "change": "updated", "keys": ["morph_pos"],
                               "version": daemon.protos.get("ROBIN").version})
    robin = c.canvas.get("ROBIN")
    ui.wait_until(lambda: c.canvas.spot_of(robin) == pytest.approx((300, 200)), 5,
                  "ROBIN to move")
    # an old-style [x, y] position is ignored: the morph flows like a new one
    daemon.protos.create("GUEST", {"role": "visitor", "morph_pos": [5000, 60]},
                         parent="persona")
    sub.push("proto.changed", {"name": "GUEST", "change": "created", "keys": [], "version": 1})
    guest = ui.wait_until(lambda: c.canvas.get("GUEST"), 5, "a GUEST morph")
    assert guest.role == "visitor" and guest.right <= c.canvas.width
    ui.wait_until(lambda: c.shelf.get("persona").clones == 4, 5, "the clone count")
    sub.push("proto.changed", {"name": "GUEST", "change": "removed", "keys": [], "version": 1})
    ui.wait_until(lambda: c.canvas.get("GUEST") is None, 5, "GUEST removed")


def test_halo_clones_and_deletes_after_asking(ui, app, daemon):
    c = app.controller
    ui.click(c.canvas.get("ROBIN"))
    halo = app.root.ids.halo
    assert halo.target is c.canvas.get("ROBIN")
    c.clone_morph(halo.target)
    settle(ui, app, daemon)
    clone = ui.wait_until(lambda: c.canvas.get("ROBIN_2"), 5, "the clone")
    assert daemon.protos.get("ROBIN_2").parent.name == "ROBIN"
    assert clone.role == "empathy"            # inherited from ROBIN
    for a, b in itertools.combinations(boxes_of(c.canvas).values(), 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    dlg = c.delete_morph(clone)
    assert c.desk.top_panel() is dlg and dlg.modal
    ui.click(dlg.ids.no)                      # "Keep": nothing happens
    settle(ui, app, daemon)
    assert "ROBIN_2" in daemon.protos
    dlg = c.delete_morph(clone)
    ui.click(dlg.ids.yes)
    settle(ui, app, daemon)
    assert "ROBIN_2" not in daemon.protos and c.canvas.get("ROBIN_2") is None
    # a codex persona cannot go: the refusal is in the log
    dlg = c.delete_morph(c.canvas.get("BRICK"))
    ui.click(dlg.ids.yes)
    settle(ui, app, daemon)
    ui.wait_until(lambda: c.settled, 5, "the log")
    assert "BRICK" in daemon.protos and c.canvas.get("BRICK") is not None
    assert "BRICK not deleted: conflict" in app.root.ids.log_panel.lines[-1]["message"]


# -- inspector ----------------------------------------------------------------------

def open_inspector(ui, app, name):
    ui.right_click(app.controller.morph(name))
    insp = ui.wait_until(lambda: app.controller.inspectors.get(name), 5, "the inspector")
    ui.wait_until(lambda: insp.proto_name == name and "temperature" in insp.rows, 5, "rows")
    return insp


def test_inspectors_are_non_modal_several_and_movable(ui, app):
    c = app.controller
    brick = open_inspector(ui, app, "BRICK")
    rows = brick.rows
    assert rows["temperature"].kind == "float" and rows["verbose"].kind == "bool"
    assert rows["limits"].kind == "dict" and rows["limits"].drillable
    assert rows["greeting"].inherited_from == "persona"      # inherited, marked
    assert rows["role"].inherited_from == ""
    assert rows["hello()"].kind == "method" and rows["hello()"].inherited_from == "persona"
    assert "def hello(self" in rows["hello()"].value   # the inherited source, ready to override
    assert "status" not in rows                         # activity is not a stored slot
    robin = open_inspector(ui, app, "ROBIN")
    assert c.desk.panels == [brick, robin] and c.inspector is robin
    # movable by its title bar
    x0, y0 = brick.pos
    ui.drag(brick.ids.title_bar, -30, -20)
    assert brick.x == pytest.approx(x0 - 30) and brick.y == pytest.approx(y0 - 20)
    assert c.desk.top_panel() is brick          # touching it raised it
    # non-modal: the canvas still takes clicks beside the windows
    def covered(m):
        x, y = m.to_window(*m.center)
        return any(p.collide_point(x, y) for p in c.desk.panels)
    free = next(m for m in c.canvas.morphs.values() if not covered(m))
    ui.click(free)
    assert c.selected is free
    # the prototype on the shelf has an inspector too
    persona = open_inspector(ui, app, "persona")
    assert persona.rows["hello()"].inherited_from == ""
    print("inspectors screenshot:", ui.screenshot("ui-inspectors"))
    for insp in (brick, robin, persona):
        insp.close()
    ui.pump(2)
    assert c.inspector is None and not c.inspectors


def test_a_late_ok_for_an_earlier_edit_keeps_a_later_edits_error(ui, app, daemon):
    """The daemon's reply to an edit can arrive after the user's next one: an "ok" for
    0.15 landing after "lukewarm" was refused must not clear the refusal (seen as a
    flaky test_ui_daemon run)."""
    insp = open_inspector(ui, app, "BRICK")
    row = insp.rows["temperature"]
    replies = []
    real = app.controller.update_proto
    app.controller.update_proto = lambda *a, **kw: replies.append(kw)
    try:
        ui.type_into(row.editor, "0.15")                  # sent; its reply is held back
        ui.type_into(row.editor, "lukewarm")              # refused in the UI
        assert "not a number" in row.error
        replies[0]["on_ok"]()                             # the late reply to 0.15
        assert "not a number" in row.error and "not a number" in insp.error
    finally:
        app.controller.update_proto = real


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
    # a later good edit clears the row's error
    ui.type_into(row.editor, "0.3")
    settle(ui, app, daemon)
    ui.wait_until(lambda: not insp.rows["temperature"].error, 5, "the error to clear")

    # the daemon refuses a method with a syntax error: the code stays, the line is marked
    version = daemon.protos.get("BRICK").version
    row = insp.rows["hello()"]
    code = "def hello(self):\n    x = 1\n    return (\n"
    row.editor.text = code
    assert row.dirty
    ui.click(row.ids.set_button)
    settle(ui, app, daemon)
    ui.wait_until(lambda: "syntax error" in insp.error, 5, "the daemon's error")
    assert "invalid_args" in insp.error and "line" in row.error
    assert insp.rows["hello()"].editor.text == code        # nothing thrown away
    assert insp.rows["hello()"].editor.error_line >= 3
    assert daemon.protos.get("BRICK").version == version
    assert "hello" not in daemon.protos.get("BRICK").own_methods()
    print("refused method screenshot:", ui.screenshot("ui-method-refused"))
    # fixing it clears the mark, and Set now defines the override
    row = insp.rows["hello()"]
    row.editor.text = "def hello(self):\n    return 'hello from BRICK'\n"
    assert row.editor.error_line == 0
    ui.click(row.ids.set_button)
    settle(ui, app, daemon)
    assert daemon.protos.get("BRICK").hello() == "hello from BRICK"
    ui.wait_until(lambda: not insp.rows["hello()"].error and not insp.error, 5, "clean")

    # another slot changing in the daemon doesn't wipe an edit being typed
    row = insp.rows["system_prompt"]
    row.editor.focus = True
    row.editor.text = "half-typed"
    daemon.protos.update("BRICK", {"last_utterance": "new words"})
    app.controller.fetch_proto("BRICK")
    ui.wait_until(lambda: insp.rows["last_utterance"].editor.text == "new words", 5, "refresh")
    assert insp.rows["system_prompt"].editor.text == "half-typed"
    row.editor.focus = False

    # booleans toggle with a check box
    insp.rows["verbose"].editor.active = True
    settle(ui, app, daemon)
    assert daemon.protos.get("BRICK").verbose is True
    insp.close()


def test_code_editor_has_line_numbers_and_no_soft_wrap(ui, app):
    insp = open_inspector(ui, app, "BRICK")
    ed = insp.rows["hello()"].editor
    assert type(ed.code).__name__ == "CodeInput" and not ed.code.do_wrap
    assert type(ed.code.lexer).__name__ == "PythonLexer"
    long = "def hello(self):\n    return " + " + ".join(["'word'"] * 40) + "\n"
    ed.text = long
    ui.pump(3)
    assert len(ed.code._lines) == len(long.split("\n"))     # not wrapped
    assert ed.gutter.canvas.length() > 2                      # numbers drawn
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


# -- tasks, streaming, activity ---------------------------------------------------------

STEPS = [("alfred_route", "ALFRED", "contrapunto", None, None, {"route": "contrapunto"}),
         ("recall", None, "nothing relevant remembered", None, None, {}),
         ("brick", "BRICK", "Courage is acting despite fear.", 1, None, {}),
         ("robin", "ROBIN", "Courage is a gentle heart that stays.", 1, None, {}),
         ("measure", None, "dissonance 0.600", 1, 0.6, {}),
         ("brick", "BRICK", "Agreed: persistence.", 2, None, {}),
         ("robin", "ROBIN", "Yes, staying.", 2, None, {}),
         ("measure", None, "dissonance 0.200: converged", 2, 0.2, {"stop": "converged"}),
         ("alfred_synthesize", "ALFRED", "Courage is staying with what matters.", 2, 0.2, {})]


def step(sub, tid, i, ts=None):
    node, persona, text, rnd, d, extra = STEPS[i]
    return sub.push("task.step", {"task_id": tid, "node": node, "persona": persona,
                                  "text": text, "round": rnd, "dissonance": d, **extra}, ts)


def tokens(sub, tid, node, persona, rnd, text, seq0=0):
    pieces = text.split(" ")
    for i, w in enumerate(pieces):
        sub.push("task.token", {"task_id": tid, "node": node, "persona": persona, "round": rnd,
                                "text": (" " if i else "") + w, "seq": seq0 + i + 1})
    return seq0 + len(pieces)


def test_task_box_submits_and_transcript_streams(ui, app, daemon, sub):
    c = app.controller
    root = app.root
    ui.type_into(root.ids.task_input, "What is courage?", validate=False)
    ui.click(root.ids.submit)
    settle(ui, app, daemon)
    assert ("task.submit", {"text": "What is courage?"}) in daemon.calls
    tr = c.transcript
    assert tr.task_id == "t1" and root.ids.task_input.text == ""
    sub.push("task.queued", {"task_id": "t1", "text": "What is courage?"})
    step(sub, "t1", 0)
    step(sub, "t1", 1)
    brick = c.canvas.get("BRICK")
    # recall ended: the graph's next node is brick, so BRICK is thinking in round 1
    ui.wait_until(lambda: brick.activity == "BRICK \u00b7 round 1 \u00b7 thinking", 5,
                  "BRICK thinking")
    assert brick.active and c.strip.current == "brick"
    assert c.canvas.get("ROBIN").activity == "idle"
    # BRICK's words stream into the transcript and into BRICK's morph
    seq = tokens(sub, "t1", "brick", "BRICK", 1, "Courage is acting")
    ui.wait_until(lambda: tr.streamed_text == "Courage is acting", 5, "streamed text")
    ui.wait_until(lambda: brick.status == "speaking" and brick.streaming, 5, "BRICK speaking")
    assert "Courage is acting" in brick.utterance
    print("streaming screenshot:", ui.screenshot("ui-streaming"))
    tokens(sub, "t1", "brick", "BRICK", 1, " despite fear.", seq)
    for i in range(2, len(STEPS)):
        step(sub, "t1", i)
        if i == 4:
            ui.wait_until(lambda: c.canvas.get("BRICK").activity ==
                          "BRICK \u00b7 round 2 \u00b7 thinking", 5, "round 2")
    sub.push("task.done", {"task_id": "t1", "answer": "Courage is staying with what matters."})
    ui.wait_until(lambda: "ALFRED's answer" in tr.answer, 5, "the answer")
    ui.wait_until(lambda: c.settled, 5, "the display")
    texts = [w.text for w in reversed(tr.ids.turns.children)]
    assert "ALFRED" in texts[0] and "BRICK" in texts[2] and "round 1" in texts[2]
    assert "acting despite fear" in texts[2] and "dissonance 0.60" in texts[4]
    assert not tr.streamed_text and "staying with what matters" in texts[-1]
    assert tr.ids.plot.points == [0.6, 0.2]
    assert [t.node for t in c.tasks["t1"].timeline][:3] == ["alfred_route", "recall", "brick"]
    brick_time = c.tasks["t1"].timeline[2]
    assert brick_time.tokens > 0 and brick_time.seconds is not None
    assert brick.dissonance == pytest.approx(0.2) and brick.utterance == "Agreed: persistence."
    assert [c.canvas.get(p).activity for p in ("ALFRED", "BRICK", "ROBIN")] == ["idle"] * 3
    assert c.canvas.get("ALFRED").utterance.startswith("Courage is staying")
    assert c.strip.current == ""
    tr.chart = "timeline"
    ui.pump(3)
    assert len(tr.ids.timeline.ids.rows.children) == len(STEPS)
    print("timeline screenshot:", ui.screenshot("ui-timeline"))
    tr.chart = "dissonance"
    print("transcript screenshot:", ui.screenshot("ui-transcript"))


def test_model_loading_marks_only_the_active_persona(ui, app, sub):
    c = app.controller
    sub.push("task.queued", {"task_id": "t7", "text": "hi"})
    step(sub, "t7", 0)
    step(sub, "t7", 1)
    step(sub, "t7", 2)      # brick ended: ROBIN is next
    sub.push("model.loading", {"model": "smollm2-135m", "stage": "loading weights"})
    ui.wait_until(lambda: c.canvas.get("ROBIN").status == "loading model", 5, "ROBIN loading")
    assert c.canvas.get("BRICK").status == "idle" and c.canvas.get("ALFRED").status == "idle"
    sub.push("model.loaded", {"model": "smollm2-135m", "seconds": 1.0})
    ui.wait_until(lambda: c.canvas.get("ROBIN").activity == "ROBIN \u00b7 round 1 \u00b7 thinking",
                  5, "ROBIN thinking")
    # the inspector says the same as the morph: one source
    insp = open_inspector(ui, app, "ROBIN")
    assert insp.activity == c.canvas.get("ROBIN").activity
    insp.close()


def test_ui_started_mid_task_rebuilds_it_from_task_steps(ui, app, daemon, sub):
    c = app.controller
    t0 = time.time() - 5
    daemon.snapshot_tasks = [{"id": "t9", "text": "long question", "status": "running",
                              "created": t0, "started": t0}]
    steps = [{"task_id": "t9", "node": n, "persona": p, "text": x, "round": r,
              "dissonance": d, **e, "seq": 10 + i, "ts": t0 + i}
             for i, (n, p, x, r, d, e) in enumerate(STEPS[:3])]
    daemon.steps["t9"] = {"task_id": "t9", "steps": steps, "status": "running", "seq": 15,
                          "partial": {"node": "robin", "persona": "ROBIN", "round": 1,
                                      "text": "Courage is a gentle", "token_seq": 4,
                                      "tokens": 4, "seq": 15}}
    c.resync()
    settle(ui, app, daemon)
    ui.wait_until(lambda: c.tasks.get("t9") is not None and not c.tasks["t9"].rebuilding, 5,
                  "the rebuild")
    rec = c.tasks["t9"]
    assert [t.persona for t in rec.turns] == ["ALFRED", "recall", "BRICK"]
    assert rec.partial.text == "Courage is a gentle"
    tr = c.transcript
    assert tr.task_id == "t9"
    ui.wait_until(lambda: tr.streamed_text == "Courage is a gentle", 5, "the partial turn")
    ui.wait_until(lambda: c.canvas.get("ROBIN").status == "speaking", 5, "ROBIN speaking")
    sub.seq = 15      # the next live event after the reply's seq
    sub.push("task.token", {"task_id": "t9", "node": "robin", "persona": "ROBIN", "round": 1,
                            "text": " heart", "seq": 5})
    ui.wait_until(lambda: tr.streamed_text == "Courage is a gentle heart", 5, "new tokens")
    texts = [w.text for w in reversed(tr.ids.turns.children)]
    assert any("acting despite fear" in t for t in texts)
    print("rebuilt screenshot:", ui.screenshot("ui-rebuilt-mid-task"))


def test_events_racing_a_rebuild_are_applied_once(ui, app, daemon, sub):
    c = app.controller
    daemon.steps["r1"] = {"task_id": "r1", "status": "running", "seq": 40, "partial": None,
                          "steps": [{"task_id": "r1", "node": "alfred_route",
                                     "persona": "ALFRED", "text": "contrapunto", "seq": 40,
                                     "ts": time.time()}]}
    rec = c._task("r1")
    rec.status = "running"
    c._rebuild_task("r1")
    # while task.steps is in flight: the step it already has (seq 40) and a newer one
    c.handle_event("task.step", {"task_id": "r1", "node": "alfred_route", "persona": "ALFRED",
                                 "text": "contrapunto"}, 40, time.time())
    c.handle_event("task.step", {"task_id": "r1", "node": "recall", "persona": None,
                                 "text": "nothing"}, 41, time.time())
    settle(ui, app, daemon)
    assert [t.node for t in c.tasks["r1"].turns] == ["alfred_route", "recall"]


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
    assert "answer A" in c.transcript.answer
    assert [w.persona for w in reversed(c.transcript.ids.turns.children)] == ["BRICK", "answer"]
    # a task this UI never saw is fetched with task.get, rounds and all
    c.reopen_task("old7")
    settle(ui, app, daemon)
    assert c.transcript.task_id == "old7" and "old answer" in c.transcript.answer
    assert c.transcript.ids.plot.points == [0.4]


def test_offline_disables_ask_and_keeps_the_question(ui, app, daemon, sub):
    c = app.controller
    root = app.root
    c.retry_s = 0.2
    daemon.down = True
    sub.alive = False
    ui.pump(3)
    assert not c.status_bar.connected and root.ids.submit.disabled
    ui.wait_until(lambda: c.settled, 5, "the status bar")
    assert "offline" in c.status_bar.model
    ui.type_into(root.ids.task_input, "Are you there?")       # Enter while offline
    assert root.ids.task_input.text == "Are you there?"
    assert root.ids.task_error.text.startswith("offline: not sent")
    assert not [x for x in daemon.calls if x[0] == "task.submit"]
    daemon.down = False
    sub.alive = True
    ui.wait_until(lambda: c.status_bar.connected and not root.ids.submit.disabled, 5,
                  "reconnection")
    assert root.ids.task_error.text == ""
    ui.click(root.ids.submit)
    settle(ui, app, daemon)
    assert ("task.submit", {"text": "Are you there?"}) in daemon.calls
    assert root.ids.task_input.text == ""


# -- approval ------------------------------------------------------------------------

PROPOSAL = {"id": "am-1", "persona": "ROBIN", "principle_id": "care",
            "current_text": "Be kind.\nListen first.", "proposed_text": "Be kind.\nListen twice.",
            "rationale": "users felt unheard", "base_version": 4, "status": "pending"}


def test_proposal_opens_dialog_and_approve_decides(ui, app, daemon, sub):
    sub.push("codex.proposed", PROPOSAL)
    sub.push("codex.proposed", {**PROPOSAL, "id": "am-2", "proposed_text": "Be bold."})
    dlg = ui.wait_until(lambda: app.controller.dialog, 5, "the approval dialog")
    assert dlg.proposal_id == "am-1" and dlg.persona == "ROBIN" and dlg.principle == "care"
    assert "care" in dlg.title and dlg.ids.current.text == PROPOSAL["current_text"]
    assert dlg.ids.proposed.text == PROPOSAL["proposed_text"]
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


def test_later_puts_a_proposal_away_and_the_status_bar_brings_it_back(ui, app, sub):
    c = app.controller
    sub.push("codex.proposed", {**PROPOSAL, "id": "am-5"})
    dlg = ui.wait_until(lambda: c.dialog, 5, "the dialog")
    ui.key(27)                                 # Esc = Later
    assert c.dialog is None and c.status_bar.pending_amendments == 1
    ui.click(app.root.ids.status_bar.ids.amendments)
    assert c.dialog is not None and c.dialog.proposal_id == "am-5" and c.dialog is not dlg
    sub.push("codex.decided", {**PROPOSAL, "id": "am-5", "approved": False, "codex_version": 4})
    ui.wait_until(lambda: c.dialog is None, 5, "the dialog to close")
    assert c.status_bar.pending_amendments == 0


def test_pending_proposals_in_snapshot_open_on_connect(ui, app):
    app.controller.apply_snapshot({"pending_amendments": [PROPOSAL]})
    ui.pump(2)
    assert app.controller.dialog is not None and app.controller.dialog.proposal_id == "am-1"


# -- keys and quitting ---------------------------------------------------------------------

def test_escape_closes_the_top_window_and_never_the_app(ui, app):
    from kivy.app import App
    c = app.controller
    open_inspector(ui, app, "BRICK")
    open_inspector(ui, app, "ROBIN")
    ui.key(27)
    assert set(c.inspectors) == {"BRICK"}
    ui.key(27)
    assert not c.inspectors
    ui.click(c.canvas.get("ALFRED"))
    ui.key(27)                               # nothing open: the selection goes
    assert c.selected is None
    ui.key(27)
    ui.pump(3)
    assert App.get_running_app() is app and ui.event_loop.status == "started"


def test_closing_while_a_task_runs_asks_first(ui, app, sub):
    c = app.controller
    quits = []
    app.quit_now = lambda: quits.append(True)
    assert not ui.window.dispatch("on_request_close")        # nothing runs: just close
    sub.push("task.queued", {"task_id": "q1", "text": "slow"})
    step(sub, "q1", 0)
    ui.wait_until(lambda: c.running_task() is not None, 5, "a running task")
    assert ui.window.dispatch("on_request_close") is True     # kept open
    dlg = app.quit_dialog
    assert dlg is c.desk.top_panel() and "q1" in dlg.message
    ui.click(dlg.ids.no)
    assert not quits and dlg.closed
    ui.window.dispatch("on_request_close")
    ui.click(app.quit_dialog.ids.yes)
    assert quits == [True]


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
    assert morph in app.controller.canvas.children and morph.proto_name == "tool.primes"
    sub.push("tool.rejected", {"tool": "evil", "reason": "imports os", "attempts": 3})
    ui.wait_until(lambda: app.controller.status_bar.progress_text == "tool evil rejected", 5,
                  "the rejection")
    # the tool's own proto gets no ProtoMorph
    sub.push("proto.changed", {"name": "tool.primes", "change": "created", "keys": [],
                               "version": 1})
    ui.pump(5)
    assert app.controller.canvas.get("tool.primes") is None


def test_status_bar_follows_long_work_and_log(ui, app, sub):
    c = app.controller
    sb = c.status_bar
    sub.push("model.loading", {"model": "phi3", "progress": 0.5, "stage": "weights"})
    ui.wait_until(lambda: sb.progress == 0.5, 5, "loading progress")
    assert "loading phi3" in sb.progress_text
    sub.push("model.loaded", {"model": "phi3", "seconds": 1.5})
    sub.push("finetune.progress", {"persona": "BRICK", "step": 3, "max_steps": 10, "loss": 1.25})
    sub.push("log", {"level": "warning", "message": "disk nearly full"})
    ui.wait_until(lambda: sb.progress == 0.3 and app.root.ids.log_panel.data, 5, "fine-tuning")
    assert sb.model == "phi3"
    assert sb.progress_text == "fine-tuning BRICK step 3/10 loss 1.2500" and sb.progress == 0.3
    assert c.canvas.get("BRICK").status == "fine-tuning"
    sub.push("model.swapped", {"persona": "BRICK", "old": "smollm2-135m",
                               "new": "smollm2-135m+brick-v1", "version": 1})
    sub.push("dissonance.high", {"task_id": "t9", "dissonance": 0.81})
    sub.push("goal.generated", {"task_id": "t10", "goal": "learn haiku", "trigger": "idle"})
    sub.push("log", {"level": "error", "message": "something broke"})
    ui.wait_until(lambda: c.canvas.get("BRICK").status == "idle", 5, "swap")
    ui.wait_until(lambda: c.settled, 5, "the status bar and the log")
    assert sb.progress_text == "BRICK swapped: smollm2-135m -> smollm2-135m+brick-v1"
    log = app.root.ids.log_panel
    lines = [d["text"] for d in log.data[-4:]]
    assert "high dissonance 0.81 on task t9" in lines[1] and "learn haiku" in lines[2]
    assert any("disk nearly full" in d["text"] and "WARNI" in d["text"] for d in log.data)
    log.show = "errors"
    assert len(log.data) == 1 and "something broke" in log.data[0]["text"]
    log.show = "all"


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
    sub.push("task.token", {"task_id": "z", "text": None, "seq": "x"})
    sub.push("proto.changed", {"name": None})
    sub.push("tool.created", {"description": "no name"})
    sub.push("log", {"message": "still alive"})
    ui.wait_until(lambda: app.root.ids.log_panel.data and
                  app.root.ids.log_panel.data[-1]["text"].endswith("still alive"), 5, "the log")
    assert app.root.ids.log_panel.data[-1]["text"].endswith("still alive")


def test_text_that_does_not_fit_ends_in_an_ellipsis_and_shows_in_a_tooltip(ui, app):
    err = app.root.ids.task_error
    full = "offline: not sent; " + "the daemon did not answer in time " * 6
    err.text = full
    ui.pump(3)
    assert err.is_cut() and err.texture_size[0] <= err.width + 1
    x, y = err.to_window(*err.center)
    ui.window.mouse_pos = (x, y)
    tips = app.tooltips
    ui.wait_until(lambda: tips.bubble.opacity == 1, 5, "the tooltip")
    assert tips.bubble.text == full
    ui.window.mouse_pos = (5, 5)       # moving away hides it
    ui.pump(2)
    assert tips.bubble.opacity == 0


# -- the display under load (speed itself is measured in bench/bench_ui.py) -------------

def _count_pictures(morph):
    """Texts of the pictures ``morph`` composes from now on."""
    made = []
    real = morph.composer.compose

    def compose(look):
        made.append(look.text)
        return real(look)
    morph.composer.compose = compose
    return made


def test_a_burst_for_one_morph_is_applied_and_drawn_once_with_its_last_state(ui, app, sub):
    c = app.controller
    brick = c.canvas.get("BRICK")
    c.flush()
    made = _count_pictures(brick)
    words = [f"w{i}" for i in range(60)]
    sub.push("task.queued", {"task_id": "tb", "text": "burst"})
    tokens(sub, "tb", "brick", "BRICK", 1, " ".join(words))
    c.tick()                                 # all 61 events in one frame
    assert not sub.queue
    assert c.staged(brick, "utterance").endswith("w58 w59")   # staged: the latest only
    for _ in range(3):
        c.tick()
        ui.pump(1)
    c.flush()
    assert brick.streaming and brick.utterance == " ".join(words)    # in seq order
    assert len(made) == 1 and made[0].endswith("w59")   # one picture, of the last state
    assert c.tasks["tb"].partial.text == " ".join(words)


def test_a_frame_over_its_budget_leaves_the_rest_staged_for_the_next(ui, app, sub):
    c = app.controller
    c.flush()
    names = ["ALFRED", "BRICK", "ROBIN"]
    sub.push("task.queued", {"task_id": "tq", "text": "budget"})
    for i, name in enumerate(names):
        sub.push("task.token", {"task_id": "tq", "node": name.lower(), "persona": name,
                                "round": 1, "text": f"{name} speaks", "seq": i + 1})
    c.max_staleness_s = 0.0
    c._refresh_t0 = 0.0
    c.display.last = time.time()             # no refresh due in these frames
    for ev in sub.poll(100):
        c.handle_event(ev.topic, ev.payload, ev.seq, ev.ts)
    morphs = [c.canvas.get(n) for n in names]
    assert all(c.staged(m, "utterance").endswith("speaks") for m in morphs)
    done = []
    for _ in names:                          # a spent budget: one morph per frame
        c.prepare_morphs(0.0)
        done.append([m.utterance.endswith("speaks") for m in morphs])
    assert done == [[True, False, False], [True, True, False], [True, True, True]]
    assert c.display.pending("canvas")       # composed; shown at the next refresh
    c.flush()
    assert c.settled and all(m.body_text.endswith("speaks") for m in morphs)


def test_a_covered_morph_is_drawn_when_it_is_uncovered(ui, app, sub):
    c = app.controller
    cv = c.canvas
    brick, robin = cv.get("BRICK"), cv.get("ROBIN")
    spot = cv.spot_of(robin)
    cv.set_spot("BRICK", spot)
    cv.set_spot("ROBIN", spot)
    cv.raise_morph(brick)                    # BRICK lies exactly over ROBIN
    ui.pump(2)
    c.flush()
    sub.push("task.queued", {"task_id": "tc", "text": "cover"})
    sub.push("task.token", {"task_id": "tc", "node": "robin", "persona": "ROBIN",
                            "round": 1, "text": "seen", "seq": 1})
    c.tick()
    c.flush()             # ROBIN speaks: its colour changes, and its edges show
    made = _count_pictures(robin)
    covered0 = c.covered
    sub.push("task.token", {"task_id": "tc", "node": "robin", "persona": "ROBIN",
                            "round": 1, "text": " unseen words", "seq": 2})
    c.tick()
    c.flush()
    assert robin.utterance == "seen unseen words"     # the state is applied...
    assert made == [] and c.covered > covered0        # ...but only its words changed,
    assert robin in cv.hidden                         # and they lie under BRICK
    cv.raise_morph(robin)                             # now they show: drawn before painting
    ui.pump(2)
    assert len(made) == 1 and "unseen words" in made[0] and robin not in cv.hidden
    cv.set_spot("BRICK", None)
    cv.set_spot("ROBIN", None)


def test_a_burst_of_turns_shows_the_newest_at_once_and_counts_the_rest(ui, app, sub):
    from a4ps.ui.transcript import MAX_NEW_PER_SYNC
    c = app.controller
    tr = c.transcript
    sub.push("task.queued", {"task_id": "tt", "text": "many turns"})
    c.tick()
    c.flush()
    assert tr.task_id == "tt"
    for i in range(40):
        sub.push("task.step", {"task_id": "tt", "node": "brick", "persona": "BRICK",
                               "text": f"turn {i}", "round": 1 + i // 2})
    c.tick()
    c.flush()                                 # one refresh, not ten
    views = [w.text for w in reversed(tr.ids.turns.children)]
    assert f"{40 - MAX_NEW_PER_SYNC} earlier turns" in views[0]
    assert [v.split("\n")[-1] for v in views[1:]] == \
        [f"turn {i}" for i in range(40 - MAX_NEW_PER_SYNC, 40)]
    rec = c.tasks["tt"]
    assert tr._hidden + len(views) - 1 == len(rec.turns)     # every turn accounted for


def test_turns_past_the_view_limit_keep_appearing(ui, app, sub):
    from a4ps.ui import transcript as T
    c = app.controller
    tr = c.transcript
    sub.push("task.queued", {"task_id": "tl", "text": "long"})
    c.tick()
    c.flush()
    rec = c.tasks["tl"]
    for i in range(T.MAX_TURN_VIEWS + 3):
        rec.apply_step({"task_id": "tl", "node": "brick", "persona": "BRICK",
                        "text": f"turn {i}", "round": 1}, time.time(), 0)
        tr.sync(rec)                          # one at a time, as a task runs
    last = [w.text for w in tr.ids.turns.children][0]
    assert last.endswith(f"turn {T.MAX_TURN_VIEWS + 2}")
    rec.apply_step({"task_id": "tl", "node": "robin", "persona": "ROBIN",
                    "text": "one more", "round": 1}, time.time(), 0)
    tr.sync(rec)
    assert [w.text for w in tr.ids.turns.children][0].endswith("one more")



def test_log_lines_are_appended_in_place_and_the_oldest_fall_out(ui, app):
    log = app.root.ids.log_panel
    log.max_lines = 50
    log.add([{"level": "info", "source": "t", "message": f"old {i}"} for i in range(50)])
    ui.pump(2)
    rows = log.data
    log.add([{"level": "warning", "source": "t", "message": f"new {i}"} for i in range(5)])
    ui.pump(2)
    # the same list, changed in place: the RecycleView sizes only the new rows
    assert log.data is rows and len(rows) == 50
    assert rows[0]["text"].endswith("old 5") and rows[-1]["text"].endswith("new 4")
    assert [line["message"] for line in log.lines][-1] == "new 4"
    log.show = "warnings"
    ui.pump(2)
    assert [r["text"][-5:] for r in log.data] == [f"new {i}" for i in range(5)]
    log.show = "all"
    log.max_lines = 1000


def test_the_canvas_framebuffer_is_drawn_opaque_and_blending_comes_back(ui, app):
    """The canvas's framebuffer quad is drawn with blending off (llvmpipe then does
    not read what lies under 0.5 Mpx) and blending is back on for everything after
    it: the canvas shows its background where no morph is, and the morphs' soft
    shadows (blended inside the framebuffer) are still there."""
    from kivy.graphics.opengl import (GL_BLEND, GL_RGBA, GL_UNSIGNED_BYTE, glIsEnabled,
                                      glReadPixels)
    c = app.controller
    c.flush()
    cv = c.canvas
    kids = cv.canvas.children
    off, on = cv.opaque
    assert kids.index(off) < kids.index(cv.fbo_rect) < kids.index(on)
    ui.window.canvas.ask_update()
    ui.pump(2)

    def on_screen(lx, ly):          # canvas coordinates -> window pixels
        return (int(v) for v in cv.parent.to_window(*cv.to_parent(lx, ly)))
    x, y = on_screen(cv.width - 3, 3)               # bottom right: no morph there
    px = glReadPixels(x, y, 1, 1, GL_RGBA, GL_UNSIGNED_BYTE)
    want = [round(255 * v) for v in cv.background[:3]]
    assert all(abs(a - b) <= 2 for a, b in zip(px[:3], want)), (list(px[:3]), want)
    m = next(iter(cv.morphs.values()))
    sx, sy = on_screen(m.x + m.width / 2, m.y - 2)  # its shadow
    shadow = glReadPixels(sx, sy, 1, 1, GL_RGBA, GL_UNSIGNED_BYTE)
    assert sum(shadow[:3]) < sum(want), (list(shadow[:3]), want)   # darker, not cut out
    assert glIsEnabled(GL_BLEND)                    # on again for the text after it


def test_new_words_on_a_morph_damage_only_the_tiles_under_its_words(ui, app, sub):
    """A streamed token changes only a morph's body text: the canvas repaints the
    tiles under the words, not the header's (fewer pixels into the framebuffer)."""
    c = app.controller
    cv = c.canvas
    c.flush()
    brick = cv.get("BRICK")
    sub.push("task.queued", {"task_id": "td", "text": "damage"})
    sub.push("task.token", {"task_id": "td", "node": "brick", "persona": "BRICK",
                            "round": 1, "text": "first", "seq": 1})
    c.tick()
    c.flush()                        # speaking: its colour and header changed
    sub.push("task.token", {"task_id": "td", "node": "brick", "persona": "BRICK",
                            "round": 1, "text": " and more words", "seq": 2})
    c.tick()
    c.prepare_morphs(None)
    damaged = set(cv.scene.dirty) | set(cv._planned)      # (planned ahead or not)
    c.flush()
    assert brick.utterance == "first and more words"
    whole = cv.scene._tiles_of[brick]
    assert damaged and damaged < whole, (len(damaged), len(whole))
    header_row = max(j for _, j in whole)            # y up: its top row of tiles
    assert all(j != header_row for _, j in damaged)


def test_a_full_gc_runs_in_the_frame_after_a_refresh_never_in_it(ui, app, sub):
    import gc

    from a4ps.ui.gcpace import NEVER
    c = app.controller
    pacer = app.collector
    assert pacer.active and c.collector is pacer and gc.get_threshold()[2] == NEVER
    c.flush()
    for _ in range(pacer.full_every):
        gc.collect(1)                        # a full collection is due
    ran = pacer.collections
    sub.push("log", {"level": "info", "message": "refresh me"})
    c._refresh_t0 = 0.0
    c.display.last = 0.0                     # a refresh is due this frame
    c.tick()
    assert c._refresh_t0 and pacer.collections == ran      # refreshed; no GC in it
    assert not gc.isenabled()                # not even a young one, until...
    c.tick()                                 # the frame after: it runs there
    assert pacer.collections == ran + 1 and gc.get_count()[2] == 0 and gc.isenabled()
    for _ in range(pacer.full_every):
        gc.collect(1)
    c.flush()
    c._refresh_t0 = 0.0
    assert c.settled
    c.tick()                                 # an idle window collects too
    assert pacer.collections == ran + 2


def test_tiles_planned_ahead_paint_what_a_full_repaint_paints(ui, app, sub):
    """Between refreshes the canvas plans its damaged tiles (the refresh frame then
    plans only what was damaged since); what the refresh paints from those plans is
    pixel for pixel what painting every tile from scratch paints, also when a tile
    planned ahead was damaged again before the refresh."""
    c = app.controller
    cv = c.canvas
    c.flush()
    ui.pump(2)
    sub.push("task.queued", {"task_id": "tp", "text": "plan ahead"})
    sub.push("task.token", {"task_id": "tp", "node": "brick", "persona": "BRICK",
                            "round": 1, "text": "planned", "seq": 1})
    c.display.last = time.time()             # no refresh due in these frames
    repaints = cv.repaints
    c.tick()                                 # a frame between refreshes plans...
    c.prepare_morphs(None)
    cv.plan_ahead()
    assert not cv.scene.dirty and cv._planned
    assert cv.damaged and cv.repaints == repaints     # ...and paints nothing
    sub.push("task.token", {"task_id": "tp", "node": "brick", "persona": "BRICK",
                            "round": 1, "text": " then more words", "seq": 2})
    c.tick()
    c.prepare_morphs(None)                   # the same tiles damaged again
    c.flush()
    ui.pump(2)
    assert cv.repaints == repaints + 1 and not cv._planned and not cv.damaged
    assert cv.get("BRICK").body_text.endswith("then more words")
    planned = bytes(cv.fbo.pixels)
    cv.scene.damage_all()
    cv.repaint_now()
    ui.pump(2)
    assert bytes(cv.fbo.pixels) == planned


def test_log_rows_rendered_ahead_are_shown_without_rendering_again(ui, app, sub):
    """Between refreshes the log renders the rows its next refresh brings into view;
    that refresh shows those very pictures (no second render in its frame), and they
    are the pictures a row renders on its own."""
    from kivy.uix.label import Label
    c = app.controller
    log = app.root.ids.log_panel
    log.add([{"level": "info", "source": "t", "message": f"before {i}"} for i in range(40)])
    c.flush()
    ui.pump(3)
    for i in range(3):
        sub.push("log", {"level": "warning", "message": f"ahead {i}"})
    for _ in range(10):                      # frames between refreshes: each renders
        c.display.last = time.time()         # rows for its 4 ms budget (one row on a
        c.tick()                             # loaded machine), no refresh comes due
        ahead = {k[0]: v[0] for k, v in log._rendered.items()}
        if len([t for t in ahead if "ahead" in t]) == 3:
            break
    assert len([t for t in ahead if "ahead" in t]) == 3
    assert not any("ahead" in r["text"] for r in log.data)
    c.flush()
    ui.pump(3)
    views = [v for v in log.ids.rv.children[0].children if "ahead" in v.text]
    assert len(views) == 3 and all(v.texture is ahead[v.text] for v in views)
    fresh = Label.texture_update                 # what the row renders by itself
    row = views[0]
    pixels = bytes(row.texture.pixels)
    row.rendered = None
    fresh(row)
    assert row.texture is not ahead[row.text] and bytes(row.texture.pixels) == pixels
