"""The Morphic UI against real daemons.

``daemon``: `python -m a4ps daemon` in a subprocess (temp data dir, free ports, the
scripted chat backend), one per module. ``live``: a real Daemon on a real System in
this process (real ZeroMQ), for tests that publish on its bus or register a stand-in
handler. One headless app per test. Screenshots are saved under
ui_harness.SCREENSHOT_DIR (outside the checkout) and their paths printed.
"""
from __future__ import annotations

import ui_harness  # noqa: F401  (sets Kivy's environment before Kivy is imported)

import itertools
import time

import pytest

pytestmark = pytest.mark.slow

SIZES = [(800, 600), (1280, 800), (1920, 1080)]
PERSONAS = ("ALFRED", "BRICK", "ROBIN")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # the hash stand-in embedder: a task's recall would otherwise load MiniLM (torch,
    # sentence-transformers: ~9 s of CPU) in the daemon, which no UI test looks at
    # (test_models_embeddings and test_memory use the real one)
    d = ui_harness.DaemonProcess(tmp_path_factory.mktemp("ui-daemon") / "data",
                                 A4PS_MODELS__EMBEDDING_BACKEND="hash")
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def ui():
    h = ui_harness.harness()
    yield h
    h.stop()
    h.set_size(ui_harness.WIDTH, ui_harness.HEIGHT)


@pytest.fixture
def app(ui, daemon, tmp_path):
    from a4ps.ui.app import MorphicApp
    ui.set_size(ui_harness.WIDTH, ui_harness.HEIGHT)
    app = ui.start(MorphicApp(daemon.settings, poll_hz=30,
                              geometry_path=tmp_path / "ui_window.json"))
    ui.wait_until(lambda: app.controller.connected and app.controller.canvas.get("BRICK"),
                  30, "the UI to connect and show BRICK")
    yield app
    ui.stop()


@pytest.fixture
def live(tmp_path):
    d = ui_harness.InProcessDaemon(tmp_path / "live-data", latency_s=0.4).start()
    yield d
    d.stop()


def start_app(ui, settings, tmp_path):
    from a4ps.ui.app import MorphicApp
    app = ui.start(MorphicApp(settings, poll_hz=30, geometry_path=tmp_path / "ui_window.json"))
    ui.wait_until(lambda: app.controller.connected and app.controller.canvas.get("ROBIN"),
                  30, "the UI to connect")
    return app


def proto(daemon, name):
    with daemon.client() as c:
        return c.request("proto.get", {"name": name})


def slot(daemon, name, key):
    """A slot's value as the proto sees it: its own, or inherited from its parent."""
    data = proto(daemon, name)
    if key in data["slots"]:
        return data["slots"][key]
    return data["inherited"][key]["value"]


# -- what a user sees first ---------------------------------------------------------------

def walk(widget):
    yield widget
    for child in widget.children:
        yield from walk(child)


def shown(widget) -> bool:
    """On screen: in the window, no ancestor hidden (opacity 0) or collapsed."""
    w = widget
    while w is not None and w.parent is not w:
        if getattr(w, "opacity", 1) == 0 or w.width <= 0 or w.height <= 0:
            return False
        w = w.parent
    return widget.get_root_window() is not None


def window_box(w):
    x, y = w.to_window(w.x, w.y)
    return (x, y, x + w.width, y + w.height)


def label_problems(root) -> list[str]:
    """Every label whose text is bigger than the label, or which sits outside the
    widget that holds it (ScrollViews clip on purpose and are exempt)."""
    from kivy.uix.label import Label
    from kivy.uix.recycleview import RecycleView
    from kivy.uix.scrollview import ScrollView
    out = []
    for w in walk(root):
        if not isinstance(w, Label) or not w.text.strip() or not shown(w):
            continue
        w.texture_update()
        tw, th = w.texture_size
        if tw > w.width + 1 or th > w.height + 1:
            out.append(f"{type(w).__name__} {w.text[:40]!r}: text {tw}x{th} in {w.width:.0f}"
                       f"x{w.height:.0f}")
            continue
        p = w.parent
        clipped = False
        while p is not None and p is not p.parent:
            if isinstance(p, (ScrollView, RecycleView)):
                clipped = True
                break
            p = p.parent
        if clipped or w.parent is None:
            continue
        x0, y0, x1, y1 = window_box(w)
        px0, py0, px1, py1 = window_box(w.parent)
        if x0 < px0 - 1 or y0 < py0 - 1 or x1 > px1 + 1 or y1 > py1 + 1:
            out.append(f"{type(w).__name__} {w.text[:40]!r} sticks out of its "
                       f"{type(w.parent).__name__}")
    return out


LONG = ("loading smollm2-135m: dequantizing the GGUF weights into the model cache and "
        "loading the tokenizer (first start only)")


def test_first_screen_at_every_size(ui, app, daemon):
    """Persona morphs inside the visible canvas, no overlap, top-left anchored; no
    label's text bigger than its label; prototypes on the shelf, not the canvas."""
    c = app.controller
    # long texts where the issue found them spilling: status bar, morph, error, log
    c.handle_event("model.loading", {"model": "smollm2-135m", "stage": LONG[21:]})
    c.handle_event("log", {"level": "error", "message": "offline: " + LONG * 2})
    app.root.ids.task_error.text = "offline: not sent; " + LONG
    c.handle_event("task.queued", {"task_id": "long", "text": "Why? " * 60})
    c.handle_event("task.token", {"task_id": "long", "node": "brick", "persona": "BRICK",
                                  "round": 1, "text": "word " * 200, "seq": 1})
    assert c.shelf.get("persona") is not None and c.shelf.get("tool") is not None
    assert "persona" not in c.canvas.morphs and "tool" not in c.canvas.morphs
    for w, h in SIZES:
        ui.set_size(w, h)
        c.flush_morphs()
        ui.pump(5)
        canvas = window_box(c.canvas)
        boxes = {n: window_box(c.canvas.get(n)) for n in PERSONAS}
        for name, (x0, y0, x1, y1) in boxes.items():
            assert canvas[0] <= x0 and x1 <= canvas[2] and canvas[1] <= y0 and y1 <= canvas[3], \
                f"{name} {(x0, y0, x1, y1)} outside the canvas {canvas} at {w}x{h}"
        for (a, ra), (b, rb) in itertools.combinations(boxes.items(), 2):
            assert ra[2] <= rb[0] or rb[2] <= ra[0] or ra[3] <= rb[1] or rb[3] <= ra[1], \
                f"{a} and {b} overlap at {w}x{h}"
        top = min(canvas[3] - r[3] for r in boxes.values())
        assert top < 20, f"the morphs are not anchored at the top at {w}x{h}"
        for name in PERSONAS:        # the text drawn in each morph's picture fits it
            ui.wait_until(lambda: c.canvas.get(name).picture_size[0], 10, "the picture")
            assert c.canvas.get(name).text_fits, f"{name}'s text is cut at {w}x{h}"
        problems = label_problems(ui.window)
        assert not problems, f"at {w}x{h}: " + "; ".join(problems)
        print(f"first screen {w}x{h}:", ui.screenshot(f"ui-first-screen-{w}x{h}"))
    ui.set_size(ui_harness.WIDTH, ui_harness.HEIGHT)


def test_panels_fit_at_800x600(ui, app, daemon):
    """An inspector, the approval dialog and the snapshot browser at the smallest
    window: inside it, and their labels fit."""
    c = app.controller
    ui.set_size(800, 600)
    insp = c.open_inspector("BRICK")
    ui.wait_until(lambda: "temperature" in insp.rows, 15, "the inspector's rows")
    from a4ps.ui.approval import ApprovalDialog
    dlg = ApprovalDialog({"id": "x", "persona": "ROBIN", "principle_id": "care",
                          "current_text": "Be kind. " * 20, "proposed_text": "Be bold. " * 20,
                          "rationale": "because " * 30, "base_version": 3}, controller=c)
    c.desk.open(dlg)
    ui.pump(5)
    for panel in c.desk.panels:
        x0, y0, x1, y1 = window_box(panel)
        assert x0 >= -1 and y0 >= -1 and y1 <= 601, f"{panel.title} outside the window"
    problems = label_problems(ui.window)
    assert not problems, "; ".join(problems)
    print("panels at 800x600:", ui.screenshot("ui-panels-800x600"))
    dlg.close()
    insp.close()
    ui.set_size(ui_harness.WIDTH, ui_harness.HEIGHT)


# -- input -------------------------------------------------------------------------------

def touch_circles(window):
    from kivy.graphics import Ellipse
    return [i for i in window.canvas.after.children if isinstance(i, Ellipse)]


def test_right_click_twice_opens_the_inspector_twice(ui, app):
    """Kivy's multitouch emulation is off: a right click leaves no red circle, and a
    second right click on the same spot is not swallowed by the first one's touch."""
    from kivy.base import EventLoop
    c = app.controller
    brick = c.canvas.get("BRICK")
    for _ in range(2):
        ui.right_click(brick)
        insp = ui.wait_until(lambda: c.inspectors.get("BRICK"), 10, "the inspector")
        assert not touch_circles(ui.window)
        insp.close()
        ui.pump(2)
        assert "BRICK" not in c.inspectors
    mouse = [p for p in EventLoop.input_providers if hasattr(p, "disable_multitouch")]
    assert mouse and all(p.disable_multitouch and not p.touches for p in mouse)


def test_escape_closes_windows_and_never_stops_the_app(ui, app):
    from kivy.app import App
    c = app.controller
    ui.right_click(c.canvas.get("ROBIN"))
    ui.wait_until(lambda: c.inspectors.get("ROBIN"), 10, "the inspector")
    ui.key(27)
    assert not c.inspectors
    for _ in range(3):
        ui.key(27)
    ui.pump(3)
    assert App.get_running_app() is app and ui.event_loop.status == "started"
    assert c.connected


# -- editing -----------------------------------------------------------------------------

def test_inspector_edits_temperature_in_the_daemon(ui, app, daemon):
    c = app.controller
    ui.right_click(c.canvas.get("ALFRED"))
    insp = ui.wait_until(lambda: c.inspector if c.inspector and "temperature" in
                         c.inspector.rows else None, 15, "the inspector")
    assert insp.proto_name == "ALFRED" and insp.activity == "idle"
    new_t = 0.15 if slot(daemon, "ALFRED", "temperature") != 0.15 else 0.25
    ui.type_into(insp.rows["temperature"].editor, str(new_t))
    ui.wait_until(lambda: slot(daemon, "ALFRED", "temperature") == new_t, 10,
                  "the new temperature in the daemon")
    ui.wait_until(lambda: insp.rows["temperature"].editor.text == str(new_t), 10, "refresh")
    # not a number: refused in the UI, nothing sent
    row = insp.rows["temperature"]
    ui.type_into(row.editor, "lukewarm")
    assert "not a number" in row.error and row.editor.text == str(new_t)
    insp.close()


def test_refused_method_edit_keeps_the_code(ui, app, daemon):
    c = app.controller
    ui.right_click(c.canvas.get("BRICK"))
    insp = ui.wait_until(lambda: c.inspector if c.inspector and "invoke_llm()" in
                         c.inspector.rows else None, 15, "the inspector")
    version = proto(daemon, "BRICK")["version"]
    row = insp.rows["invoke_llm()"]
    code = row.value.replace("= self.service(", "= (self.service(", 1)   # an open bracket
    assert code != row.value, row.value
    row.editor.text = code
    # the persona's own generation slots come first: scroll to the method, as a user would
    insp.ids.rows_scroll.scroll_to(row, animate=False)
    ui.click(row.ids.set_button)
    ui.wait_until(lambda: "syntax error" in insp.error, 10, "the daemon's error")
    row = insp.rows["invoke_llm()"]
    assert row.editor.text == code and row.dirty
    assert row.editor.error_line > 0 and row.error
    assert proto(daemon, "BRICK")["version"] == version
    assert "invoke_llm" not in proto(daemon, "BRICK")["methods"]
    print("refused method:", ui.screenshot("ui-daemon-method-refused"))
    row.reset()
    assert row.editor.text == row.value and not row.dirty and row.editor.error_line == 0
    insp.close()


def test_drag_saves_position_across_daemon_restart(ui, app, daemon):
    c = app.controller
    brick = c.canvas.get("BRICK")
    ui.drag(brick, 150, -90)
    left, top = c.canvas.spot_of(brick)
    want = {"left": pytest.approx(left, abs=0.2), "top": pytest.approx(top, abs=0.2)}
    ui.wait_until(lambda: proto(daemon, "BRICK")["slots"].get("morph_pos") == want, 10,
                  "morph_pos in the daemon")
    old_boot = c.boot_id
    daemon.restart()
    assert daemon.boot_id != old_boot
    # the same UI notices the new daemon and rebuilds from its snapshot
    ui.wait_until(lambda: c.boot_id == daemon.boot_id and c.connected, 30,
                  "the UI to resync with the restarted daemon")
    assert proto(daemon, "BRICK")["slots"]["morph_pos"] == want   # it was in the image
    assert c.canvas.spot_of(c.canvas.get("BRICK")) == pytest.approx((left, top), abs=0.2)


# -- tasks ----------------------------------------------------------------------------------

def test_task_shows_dialogue_and_answer(ui, app, daemon):
    root = app.root
    c = app.controller
    ui.type_into(root.ids.task_input, "How should I balance logic and feeling?", validate=False)
    ui.click(root.ids.submit)
    tid = ui.wait_until(lambda: c.transcript.task_id, 15, "the task id")
    ui.wait_until(lambda: c.tasks[tid].status in ("done", "failed"), 120, "the task to finish")
    ui.wait_until(lambda: c.settled, 10, "the display to catch up")
    rec = c.tasks[tid]
    assert rec.status == "done", rec.error
    personas = [t.persona for t in rec.turns]
    assert "BRICK" in personas and "ROBIN" in personas, personas
    assert rec.answer and "ALFRED's answer" in c.transcript.answer
    texts = [w.text for w in c.transcript.ids.turns.children]
    assert any("BRICK" in t and "round 1" in t for t in texts)
    assert c.transcript.ids.plot.points, "dissonance per round is plotted"
    assert [t.node for t in rec.timeline][:2] == ["alfred_route", "recall"]
    ui.wait_until(lambda: c.settled, 10, "the display to refresh")
    assert c.canvas.get("BRICK").dissonance >= 0
    assert [c.canvas.get(p).activity for p in PERSONAS] == ["idle"] * 3
    print("transcript screenshot:", ui.screenshot("ui-daemon-transcript"))


def test_streamed_tokens_arrive_in_order_and_end_as_the_answer(ui, live, tmp_path):
    """Tokens the graph publishes as task.token while each persona speaks (the
    contract) reach the transcript and the speaking persona's morph in order; the
    answer ALFRED chooses is the turn that streamed it, and ends the transcript."""
    published = ui_harness.install_token_stream_standin(live.system)
    live.system.models.backend.latency_s = 1.0     # a turn streams for a second
    app = start_app(ui, live.settings(), tmp_path)
    c = app.controller
    speaking: set[str] = set()      # morphs that showed "speaking" (every change)
    for name in PERSONAS:
        c.canvas.get(name).bind(status=lambda m, v: v == "speaking" and speaking.add(m.name))
    told: dict[str, set[str]] = {}  # the statuses the controller staged for them (a
    stage = c.stage                 # busy machine may show a short turn's status late)

    def spy(widget, **props):
        if "status" in props:
            told.setdefault(widget.name, set()).add(props["status"])
        return stage(widget, **props)
    c.stage = spy
    ui.type_into(app.root.ids.task_input, "What is a good question?", validate=False)
    ui.click(app.root.ids.submit)
    tid = ui.wait_until(lambda: c.transcript.task_id, 15, "the task id")
    seen: list[tuple[str, str]] = []

    def watch():
        rec = c.tasks.get(tid)
        text = c.transcript.streamed_text
        if rec is not None and rec.partial is not None and text:
            seen.append((rec.partial.node, text))
        return rec is not None and rec.status in ("done", "failed")
    ui.wait_until(watch, 120, "the task to finish")
    ui.wait_until(lambda: c.settled, 10, "the display to catch up")
    rec = c.tasks[tid]
    assert rec.status == "done", rec.error
    with live.client() as cl:
        result = cl.request("task.get", {"id": tid})["result"]
    answer = result["answer"]
    # what the transcript showed while streaming only ever grew, token by token
    for (n1, a), (n2, b) in zip(seen, seen[1:]):
        if n1 == n2 and len(b) >= len(a):
            assert b.startswith(a), (a, b)
    expected = {}
    for p in published:
        if p["task_id"] == tid:
            expected[p["node"]] = expected.get(p["node"], "") + p["text"]
    assert [p["seq"] for p in published if p["task_id"] == tid] == \
        list(range(1, 1 + len([p for p in published if p["task_id"] == tid])))
    # ALFRED chooses between BRICK's and ROBIN's answers (a decision; he does not speak
    # on this route): the answer is the chosen persona's streamed turn, word for word
    assert result["answer_source"] in ("choice:BRICK", "choice:ROBIN"), result
    chosen = result["answer_source"].split(":")[1].lower()
    assert expected[chosen].strip() == answer == rec.answer
    final = [t for t in rec.turns if t.node == "alfred_synthesize"]
    assert final[-1].text == answer and "ALFRED's answer" in c.transcript.answer
    # BRICK and ROBIN spoke; ALFRED was shown answering (choosing, without tokens)
    assert "speaking" in told["BRICK"] and "speaking" in told["ROBIN"], told
    assert "answering" in told["ALFRED"], told
    assert speaking & {"BRICK", "ROBIN"}
    ui.wait_until(lambda: c.settled, 10, "the display")
    assert c.canvas.get("ALFRED").utterance == answer
    print("streamed task:", ui.screenshot("ui-daemon-streamed"))
    ui.stop()


def test_ui_restarted_mid_task_shows_the_steps_so_far(ui, live, tmp_path):
    app = start_app(ui, live.settings(), tmp_path)
    ui.stop()                                   # the user closes the UI...
    live.system.models.backend.latency_s = 3.0  # each turn takes 3 s: a task of ~25 s
    with live.client() as cl:
        tid = cl.request("task.submit", {"text": "Tell me about patience."})["id"]
    buf = live.daemon.task_steps
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len((buf.get(tid) or {}).get("steps", [])) < 3:
        time.sleep(0.05)
    so_far = [s["node"] for s in buf.get(tid)["steps"]]
    assert len(so_far) >= 3, so_far
    app = start_app(ui, live.settings(), tmp_path)   # ...and opens it again mid-task
    c = app.controller
    ui.wait_until(lambda: c.transcript.task_id == tid and len(c.tasks[tid].turns) >= 3, 20,
                  "the rebuilt transcript")
    rec = c.tasks[tid]
    assert [t.node for t in rec.turns][:len(so_far)] == so_far
    assert rec.status == "running"
    print("restarted mid-task:", ui.screenshot("ui-daemon-restarted-mid-task"))
    ui.wait_until(lambda: rec.status == "done", 120, "the task to finish")
    with live.client() as cl:
        result = cl.request("task.get", {"id": tid})["result"]
    shown = [(t.persona, t.text) for t in rec.turns if not t.system
             and t.node != "alfred_route"]
    spoken = [(t["persona"], t["text"]) for t in result["turns"] if t.get("round") != "route"]
    # every persona turn once, in order, then ALFRED's line: the answer he chose between
    # BRICK's and ROBIN's (a decision, not a turn of his own): nothing lost or doubled
    # across the restart
    assert result["answer_source"].startswith("choice:"), result["answer_source"]
    assert shown == spoken + [("ALFRED", result["answer"])]
    ui.stop()


# -- halo, approval, time travel ------------------------------------------------------------

def test_halo_clones_a_persona_and_deletes_the_clone(ui, app, daemon):
    c = app.controller
    ui.click(c.canvas.get("ROBIN"))
    halo = app.root.ids.halo
    assert halo.target is c.canvas.get("ROBIN") and halo.opacity == 1
    print("halo:", ui.screenshot("ui-daemon-halo"))
    c.clone_morph(halo.target)
    clone = ui.wait_until(lambda: c.canvas.get("ROBIN_2"), 15, "the clone's morph")
    assert proto(daemon, "ROBIN_2")["parent"] == "ROBIN"
    dlg = c.delete_morph(clone)
    ui.click(dlg.ids.yes)
    ui.wait_until(lambda: c.canvas.get("ROBIN_2") is None, 15, "the clone gone")
    with daemon.client() as cl:
        assert "ROBIN_2" not in [p["name"] for p in cl.request("proto.list")]


def test_amendment_dialog_approve_changes_codex(ui, app, daemon):
    c = app.controller
    with daemon.client() as cl:
        codex = cl.request("codex.get")
        principles = codex["personas"]["ROBIN"]["principles"]
        pid = next(iter(principles))
        cl.request("codex.propose", {"persona": "ROBIN", "principle_id": pid,
                                     "proposed_text": principles[pid] + " Listen twice.",
                                     "rationale": "users felt unheard"})
    dlg = ui.wait_until(lambda: c.dialog, 15, "the approval dialog")
    assert dlg.persona == "ROBIN" and dlg.principle == pid and pid in dlg.title
    assert dlg.current_text == principles[pid] and "Listen twice" in dlg.proposed_text
    print("approval screenshot:", ui.screenshot("ui-daemon-approval"))
    ui.click(dlg.ids.approve)
    ui.wait_until(lambda: c.dialog is None, 15, "the dialog to close")
    with daemon.client() as cl:
        after = cl.request("codex.get")
    assert after["version"] == codex["version"] + 1
    assert any("Listen twice" in t for t in after["personas"]["ROBIN"]["principles"].values())


def test_time_travel_lists_diffs_and_restores(ui, live, tmp_path):
    """The snapshot browser against the daemon's image.* commands (the time-travel
    part's, on real image files)."""
    app = start_app(ui, live.settings(), tmp_path)
    c = app.controller
    before = live.system.protos.get("BRICK").temperature
    ui.click(app.root.ids.status_bar.ids.snapshots)
    panel = ui.wait_until(lambda: c.snapshots_panel if c.snapshots_panel and
                          c.snapshots_panel.snapshots else None, 10, "the snapshot list")
    n = len(panel.snapshots)
    ui.type_into(panel.ids.name_input, "not a valid name")       # the daemon says why
    ui.wait_until(lambda: "failed" in panel.status, 10, "the refusal")
    assert "letters, digits" in panel.status and len(panel.snapshots) == n
    ui.type_into(panel.ids.name_input, "before-the-edit")
    ui.wait_until(lambda: any(s.get("name") == "before-the-edit" for s in panel.snapshots), 10,
                  "the named snapshot")
    named = next(s for s in panel.snapshots if s.get("name") == "before-the-edit")
    assert named["trigger"] == "named" and panel.status.startswith("saved snapshot")
    assert panel.ids.name_input.text == ""
    with live.client() as cl:
        cl.request("proto.update", {"name": "BRICK", "slots": {"temperature": 0.11,
                                                              "mood": "stern"}})
    item = next(w for w in panel.ids.snapshot_list.children if "before-the-edit" in w.heading)
    assert "named" in item.summary
    ui.click(item)
    ui.wait_until(lambda: "mood" in panel.diff_markup, 10, "the diff")
    # BRICK's own (seeded) temperature changed; "mood" is a slot the snapshot did not have
    lines = panel.diff_markup.splitlines()
    at = lines.index("  temperature:")
    assert f"snapshot: {before}" in lines[at + 1] and "now:      0.11" in lines[at + 2]
    at = lines.index("  mood:")
    assert "snapshot: (not set here)" in lines[at + 1] and "now:      stern" in lines[at + 2]
    print("time travel:", ui.screenshot("ui-daemon-time-travel"))
    ui.click(panel.ids.restore)
    confirm = c.desk.top_panel()
    assert confirm.modal and "pre-restore" in confirm.message
    ui.click(confirm.ids.yes)
    ui.wait_until(lambda: live.system.protos.get("BRICK").temperature == before, 20,
                  "the restore in the daemon")
    assert "mood" not in live.system.protos.get("BRICK").own_slots()
    ui.wait_until(lambda: "restored" in panel.status, 10, "the panel to say so")
    ui.wait_until(lambda: any(s["trigger"] == "pre-restore" for s in panel.snapshots), 10,
                  "the pre-restore snapshot listed")
    ui.stop()


# -- tools, launcher, goals --------------------------------------------------------------

FIB_SOURCE = """def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
"""


def seed_tool(daemon) -> None:
    """Register a tool in the stopped daemon's image, as the forge would after its tests.

    The scripted chat backend cannot write tool code, so the forge itself can't run
    here; its exact ``tool.created`` payload is covered in test_ui.py.
    """
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.system import System
    system = System(daemon.settings, embedder=HashEmbedder()).start(services=False)
    try:
        system.tools.register({"name": "fib", "description": "the n-th Fibonacci number"},
                              FIB_SOURCE, "assert fib(10) == 55\n", "BRICK",
                              {"passed": 2, "total": 2})
    finally:
        system.stop()


def test_forged_tool_appears_as_tool_morph(ui, app, daemon):
    c = app.controller
    assert c.canvas.get("tool:fib") is None
    daemon.stop()
    try:
        seed_tool(daemon)
    finally:   # the module's other tests need the daemon back either way
        daemon.start()
    morph = ui.wait_until(lambda: c.canvas.get("tool:fib"), 30, "the ToolMorph after resync")
    assert (morph.tool_name, morph.version, morph.test_status) == ("fib", "1", "passed 2/2")
    assert "Fibonacci" in morph.description
    assert c.canvas.get("tool.fib") is None   # the tool's proto is not a ProtoMorph too
    ui.wait_until(lambda: c.settled, 10, "the display")
    print("canvas screenshot:", ui.screenshot("ui-daemon-tools"))


RUN_UI = r"""
import sys
from kivy.app import App
from kivy.clock import Clock
from a4ps.config import load_settings
from a4ps.ui.launch import run_ui

def check(dt):
    from kivy.core.window import Window   # (opened by run_ui, after its settings)
    app = App.get_running_app()
    c = app.controller
    if c.connected and c.canvas.get("BRICK"):
        print("UI connected; morphs:", sorted(c.canvas.morphs), flush=True)
        print("window", tuple(Window.size), flush=True)
        Window.size = (1000, 700)
        Clock.schedule_once(lambda dt: app.stop(), 0.5)
    else:
        Clock.schedule_once(check, 0.2)

Clock.schedule_once(check, 0.5)
sys.exit(run_ui(load_settings(), stop_daemon_on_exit=True))
"""

RUN_UI_AGAIN = r"""
import sys
from kivy.app import App
from kivy.clock import Clock
from a4ps.config import load_settings
from a4ps.ui.launch import run_ui

def check(dt):
    from kivy.core.window import Window
    print("window", tuple(Window.size), flush=True)
    App.get_running_app().stop()

Clock.schedule_once(check, 1.0)
sys.exit(run_ui(load_settings(), start=False))
"""


def test_a4ps_ui_starts_a_daemon_stops_it_and_remembers_the_window(tmp_path):
    """`a4ps ui --stop-daemon-on-exit` with no daemon running: start one, connect, stop
    it; the window's size is saved on the way out and used by the next start."""
    import os
    import subprocess
    import sys
    from a4ps.ui.launch import daemon_alive, daemon_starting
    d = ui_harness.DaemonProcess(tmp_path / "data")      # env and free ports only
    env = dict(d.env, KIVY_HOME=str(tmp_path / "kivy"), KIVY_NO_ARGS="1",
               SDL_AUDIODRIVER="dummy")
    if not env.get("DISPLAY"):
        env["SDL_VIDEODRIVER"] = "offscreen"
    assert not daemon_alive(d.settings, timeout=0.5)
    try:
        out = subprocess.run([sys.executable, "-c", RUN_UI], env=env, capture_output=True,
                             text=True, timeout=240, cwd=os.getcwd())
    finally:   # never leave a daemon behind, whatever happened
        if daemon_starting(d.settings):
            import signal
            os.kill(int((tmp_path / "data" / "daemon.lock").read_text().splitlines()[0]),
                    signal.SIGTERM)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "starting one" in text and "UI connected" in text and "'BRICK'" in text
    assert "stopping the daemon it started" in text
    assert not daemon_alive(d.settings, timeout=0.5)
    assert not daemon_starting(d.settings)    # the lock names a process that is gone
    assert (tmp_path / "data" / "live_image.dill").exists()   # it saved on the way out
    saved = (tmp_path / "data" / "ui_window.json").read_text()
    assert '"width": 1000' in saved and '"height": 700' in saved, saved
    again = subprocess.run([sys.executable, "-c", RUN_UI_AGAIN], env=env, capture_output=True,
                           text=True, timeout=240, cwd=os.getcwd())
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "window (1000, 700)" in again.stdout


def test_launcher_sees_a_running_daemon(daemon):
    from a4ps.ui.launch import daemon_alive, daemon_starting
    assert daemon_alive(daemon.settings) and daemon_starting(daemon.settings)


def test_goals_toggle_pauses_the_daemons_motivator(ui, app, daemon):
    toggle = app.root.ids.status_bar.ids.goals_toggle
    ui.click(toggle)
    ui.wait_until(lambda: app.root.ids.status_bar.goals_paused, 10, "the toggle to show paused")
    with daemon.client() as c:
        ui.wait_until(lambda: c.request("system.status")["motivator"]["paused"], 10,
                      "the daemon's motivator to pause")
    ui.click(toggle)
    with daemon.client() as c:
        ui.wait_until(lambda: not c.request("system.status")["motivator"]["paused"], 10,
                      "the daemon's motivator to resume")
    assert not app.root.ids.status_bar.goals_paused
