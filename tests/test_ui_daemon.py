"""The Morphic UI against a real daemon (`python -m a4ps daemon` in a subprocess).

One daemon per module (temp data dir, free ports, the scripted chat backend), one
headless app per test, real ZeroMQ both ways. Screenshots are saved under
ui_harness.SCREENSHOT_DIR and their paths printed.
"""
from __future__ import annotations

import ui_harness  # noqa: F401  (sets Kivy's environment before Kivy is imported)

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = ui_harness.DaemonProcess(tmp_path_factory.mktemp("ui-daemon") / "data")
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def ui():
    h = ui_harness.harness()
    yield h
    h.stop()


@pytest.fixture
def app(ui, daemon):
    from a4ps.ui.app import MorphicApp
    app = ui.start(MorphicApp(daemon.settings(), poll_hz=30))
    ui.wait_until(lambda: app.controller.connected and app.controller.canvas.get("BRICK"),
                  30, "the UI to connect and show BRICK")
    yield app
    ui.stop()


def proto(daemon, name):
    with daemon.client() as c:
        return c.request("proto.get", {"name": name})


def slot(daemon, name, key):
    """A slot's value as the proto sees it: its own, or inherited from its parent."""
    data = proto(daemon, name)
    if key in data["slots"]:
        return data["slots"][key]
    return data["inherited"][key]["value"]


def test_drag_saves_position_across_daemon_restart(ui, app, daemon):
    c = app.controller
    brick = c.canvas.get("BRICK")
    x0, y0 = brick.pos
    ui.drag(brick, 150, -90)
    want = [pytest.approx(x0 + 150, abs=0.2), pytest.approx(y0 - 90, abs=0.2)]
    ui.wait_until(lambda: proto(daemon, "BRICK")["slots"].get("morph_pos") == want, 10,
                  "morph_pos in the daemon")
    old_boot = c.boot_id
    daemon.restart()
    assert daemon.boot_id != old_boot
    # the same UI notices the new daemon and rebuilds from its snapshot
    ui.wait_until(lambda: c.boot_id == daemon.boot_id and c.connected, 30,
                  "the UI to resync with the restarted daemon")
    assert proto(daemon, "BRICK")["slots"]["morph_pos"] == want   # it was in the image
    assert list(c.canvas.get("BRICK").pos) == want
    # and a fresh UI places BRICK there too
    ui.stop()
    from a4ps.ui.app import MorphicApp
    app2 = ui.start(MorphicApp(daemon.settings(), poll_hz=30))
    ui.wait_until(lambda: app2.controller.canvas.get("BRICK"), 30, "a fresh UI")
    assert list(app2.controller.canvas.get("BRICK").pos) == want


def test_inspector_edits_temperature_in_the_daemon(ui, app, daemon):
    c = app.controller
    ui.right_click(c.canvas.get("ALFRED"))
    insp = ui.wait_until(lambda: c.inspector if c.inspector and "temperature" in
                         c.inspector.rows else None, 15, "the inspector")
    assert insp.proto_name == "ALFRED"
    new_t = 0.15 if slot(daemon, "ALFRED", "temperature") != 0.15 else 0.25
    ui.type_into(insp.rows["temperature"].editor, str(new_t))
    ui.wait_until(lambda: slot(daemon, "ALFRED", "temperature") == new_t, 10,
                  "the new temperature in the daemon")
    ui.wait_until(lambda: insp.rows["temperature"].editor.text == str(new_t), 10, "refresh")
    version = proto(daemon, "ALFRED")["version"]

    # not a number: refused in the UI, nothing sent
    row = insp.rows["temperature"]
    ui.type_into(row.editor, "lukewarm")
    assert "not a number" in row.error and row.editor.text == str(new_t)

    # refused by the daemon: a method that doesn't compile
    key = next(k for k in insp.rows if k.endswith("()"))
    row = insp.rows[key]
    row.editor.text = f"def {key[:-2]}(self):\n    return (\n"
    row.commit()
    ui.wait_until(lambda: "syntax error" in insp.error, 10, "the daemon's error")
    after = proto(daemon, "ALFRED")
    assert after["version"] == version and slot(daemon, "ALFRED", "temperature") == new_t
    print("inspector screenshot:", ui.screenshot("ui-daemon-inspector"))
    insp.close()


def test_task_shows_dialogue_and_answer(ui, app, daemon):
    root = app.root
    c = app.controller
    ui.type_into(root.ids.task_input, "How should I balance logic and feeling?", validate=False)
    ui.click(root.ids.submit)
    tid = ui.wait_until(lambda: c.transcript.task_id, 15, "the task id")
    ui.wait_until(lambda: c.tasks[tid].status in ("done", "failed"), 120, "the task to finish")
    rec = c.tasks[tid]
    assert rec.status == "done", rec.error
    personas = [t.persona for t in rec.turns]
    assert "BRICK" in personas and "ROBIN" in personas, personas
    assert rec.answer and "ALFRED's answer" in c.transcript.answer
    texts = [w.text for w in c.transcript.ids.turns.children]
    assert any("BRICK" in t and "round 1" in t for t in texts)
    assert any("ROBIN" in t for t in texts)
    assert c.transcript.ids.plot.points, "dissonance per round is plotted"
    ui.wait_until(lambda: c.settled, 10, "the display to refresh")
    assert c.canvas.get("BRICK").dissonance >= 0
    assert [c.canvas.get(p).status for p in ("ALFRED", "BRICK", "ROBIN")] == ["idle"] * 3
    print("transcript screenshot:", ui.screenshot("ui-daemon-transcript"))


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
    assert dlg.persona == "ROBIN" and "Listen twice" in dlg.diff_markup
    print("approval screenshot:", ui.screenshot("ui-daemon-approval"))
    ui.click(dlg.ids.approve)
    ui.wait_until(lambda: c.dialog is None, 15, "the dialog to close")
    with daemon.client() as cl:
        after = cl.request("codex.get")
    assert after["version"] == codex["version"] + 1
    assert any("Listen twice" in t for t in after["personas"]["ROBIN"]["principles"].values())



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
    system = System(daemon.settings(), embedder=HashEmbedder()).start(services=False)
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
    c = App.get_running_app().controller
    if c.connected and c.canvas.get("BRICK"):
        print("UI connected; morphs:", sorted(c.canvas.morphs), flush=True)
        App.get_running_app().stop()
    else:
        Clock.schedule_once(check, 0.2)

Clock.schedule_once(check, 0.5)
sys.exit(run_ui(load_settings(), stop_daemon_on_exit=True))
"""


def test_a4ps_ui_starts_a_daemon_and_stops_it_on_exit(tmp_path):
    """`a4ps ui --stop-daemon-on-exit` with no daemon running: start one, connect, stop it."""
    import os
    import subprocess
    import sys
    from a4ps.ui.launch import daemon_alive, daemon_starting
    d = ui_harness.DaemonProcess(tmp_path / "data")      # env and free ports only
    env = dict(d.env, KIVY_HOME=str(tmp_path / "kivy"), KIVY_NO_ARGS="1",
               SDL_AUDIODRIVER="dummy")
    if not env.get("DISPLAY"):
        env["SDL_VIDEODRIVER"] = "offscreen"
    assert not daemon_alive(d.settings(), timeout=0.5)
    try:
        out = subprocess.run([sys.executable, "-c", RUN_UI], env=env, capture_output=True,
                             text=True, timeout=240, cwd=os.getcwd())
    finally:   # never leave a daemon behind, whatever happened
        if daemon_starting(d.settings()):
            import signal
            os.kill(int((tmp_path / "data" / "daemon.lock").read_text().splitlines()[0]),
                    signal.SIGTERM)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "starting one" in text and "UI connected" in text and "'BRICK'" in text
    assert "stopping the daemon it started" in text
    assert not daemon_alive(d.settings(), timeout=0.5)
    assert not daemon_starting(d.settings())    # the lock names a process that is gone
    assert (tmp_path / "data" / "live_image.dill").exists()   # it saved on the way out


def test_launcher_sees_a_running_daemon(daemon):
    from a4ps.ui.launch import daemon_alive, daemon_starting
    assert daemon_alive(daemon.settings()) and daemon_starting(daemon.settings())


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
