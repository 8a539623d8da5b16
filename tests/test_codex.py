"""The codex's approval rules: only a valid, current, first decision changes it.

Approve -> new version with history, prompts rebuilt, survives a restart (dill round
trip of the image state); reject -> unchanged, closed, never proposed again; unknown
id, stale version, repeated decision -> refused and nothing changes. Also the CLI
(`a4ps codex propose/show/history`) working in-process on the image.
"""
from __future__ import annotations

import copy

import dill
import pytest

from a4ps.codex import Codex, CodexError
from a4ps.events import EventRecorder
from a4ps.system import CODEX_PATH

NEW_CARE = "Name the feeling first, then offer one kind and honest step."


@pytest.fixture
def codex(bus):
    from a4ps.system import CODEX_PATH
    return Codex.from_toml(CODEX_PATH, bus)


def frozen(codex: Codex) -> dict:
    state = copy.deepcopy(codex.image_state())
    for a in state["proposals"].values():   # only the decision fields may differ
        a.pop("created_at", None)
    return state


def test_approve_bumps_the_version_records_history_and_changes_the_prompt(codex, bus):
    rec = EventRecorder(bus)
    a = codex.propose("ROBIN", "care", NEW_CARE, "ROBIN keeps hedging", origin="user",
                      sources=["t1"])
    assert rec.of("codex.proposed")[0].payload["id"] == a.id
    assert codex.version == 1 and NEW_CARE not in codex.system_prompt("ROBIN")
    out = codex.decide(a.id, 1, True, by="user", reason="agreed")
    assert out.status == "approved" and codex.version == 2
    assert codex.personas["ROBIN"].principles["care"] == NEW_CARE
    assert NEW_CARE in codex.system_prompt("ROBIN")
    last = codex.history[-1]
    assert (last.version, last.by, last.reason, last.proposal_id) == (2, "user", "agreed", a.id)
    assert last.at > 0 and last.old_text.startswith("Notice how")
    decided = rec.of("codex.decided")[0].payload
    assert decided["approved"] is True and decided["codex_version"] == 2
    assert decided["persona"] == "ROBIN"
    diffs = codex.history_diffs()
    assert f"+{NEW_CARE}" in diffs[-1]["diff"] and diffs[0]["diff"] == ""
    assert codex.pending() == []


def test_approval_survives_a_restart(codex):
    a = codex.propose("BRICK", "brevity", "Prefer three short steps to one long one.",
                      "answers run long", origin="user")
    codex.decide(a.id, 1, True, by="user", reason="yes")
    blob = dill.dumps({"codex": codex.image_state()})          # what the image stores
    restored = Codex.from_toml(CODEX_PATH)
    restored.restore_image(dill.loads(blob)["codex"])
    assert restored.version == 2
    assert restored.personas["BRICK"].principles["brevity"] == "Prefer three short steps to one long one."
    assert "three short steps" in restored.system_prompt("BRICK")
    assert restored.proposals[a.id].status == "approved"
    assert [h.version for h in restored.history] == [1, 2]
    # a whole Codex pickles too (locks and the bus stay behind)
    again = dill.loads(dill.dumps(codex))
    assert again.version == 2 and again.system_prompt("BRICK") == codex.system_prompt("BRICK")
    with pytest.raises(CodexError, match="already approved"):
        again.decide(a.id, 2, True, by="user")


def test_reject_leaves_the_codex_unchanged_and_is_not_proposed_again(codex, bus):
    rec = EventRecorder(bus, "codex.decided")
    before = codex.system_prompt("ROBIN")
    a = codex.propose("ROBIN", "care", NEW_CARE, "why not")
    out = codex.decide(a.id, 1, False, by="user", reason="no")
    assert out.status == "rejected" and out.decided_by == "user"
    assert codex.version == 1 and codex.system_prompt("ROBIN") == before
    assert len(codex.history) == 1 and codex.pending() == []
    assert rec.events[0].payload["approved"] is False
    assert codex.was_rejected("ROBIN", "care", NEW_CARE)
    with pytest.raises(CodexError, match="rejected before"):
        codex.propose("ROBIN", "care", "  " + NEW_CARE.upper() + " ", "again")  # same, re-spaced
    # and it stays remembered across a restart
    restored = dill.loads(dill.dumps(codex))
    with pytest.raises(CodexError, match="rejected before"):
        restored.propose("ROBIN", "care", NEW_CARE, "again")


def test_wrong_id_stale_version_and_repeated_decisions_are_refused_and_change_nothing(codex, bus):
    a = codex.propose("ROBIN", "care", NEW_CARE, "r")
    b = codex.propose("ALFRED", "candour", "Say 'I do not know' when you do not know.", "r")
    rec = EventRecorder(bus, "codex.decided")
    state = frozen(codex)
    with pytest.raises(CodexError, match="no amendment"):
        codex.decide("nope", 1, True, by="user")
    with pytest.raises(CodexError, match="stale"):
        codex.decide(a.id, 0, True, by="user")
    with pytest.raises(CodexError, match="stale"):
        codex.decide(a.id, 2, True, by="user")
    assert frozen(codex) == state and rec.events == []
    codex.decide(a.id, 1, True, by="user")
    state = frozen(codex)
    with pytest.raises(CodexError, match="already approved"):
        codex.decide(a.id, 2, True, by="user")                 # repeated
    with pytest.raises(CodexError, match="already approved"):
        codex.decide(a.id, 2, False, by="user")
    with pytest.raises(CodexError, match="stale"):
        codex.decide(b.id, 1, True, by="user")                 # the human saw v1; it is v2 now
    assert frozen(codex) == state and len(rec.events) == 1
    codex.decide(b.id, 2, True, by="user")                     # reloaded: accepted
    assert codex.version == 3


def test_an_amendment_whose_principle_changed_since_it_was_drafted_is_refused(codex):
    a = codex.propose("ROBIN", "care", NEW_CARE, "r")
    b = codex.propose("ROBIN", "care", "Be warm, and brief.", "r")
    codex.decide(a.id, 1, True, by="user")
    with pytest.raises(CodexError, match="changed since"):
        codex.decide(b.id, 2, True, by="user")
    assert codex.personas["ROBIN"].principles["care"] == NEW_CARE
    codex.decide(b.id, 2, False, by="user")                    # it can still be closed


@pytest.mark.parametrize("args, match", [
    (("NOBODY", "care", "text here", "r"), "no persona"),
    (("ROBIN", "care", "", "r"), "non-empty"),
    (("ROBIN", "care", "text here", " "), "rationale"),
    (("ROBIN", "bad id!", "text here", "r"), "principle id"),
    (("ROBIN", "care", "Notice how the question touches the people involved and speak to "
      "that with warmth.", "r"), "already says"),
])
def test_bad_proposals_are_refused(codex, args, match):
    with pytest.raises(CodexError, match=match):
        codex.propose(*args)
    assert codex.proposals == {}


def test_duplicate_pending_proposal_is_refused(codex):
    a = codex.propose("ROBIN", "care", NEW_CARE, "r")
    with pytest.raises(CodexError, match=a.id):
        codex.propose("ROBIN", "care", NEW_CARE, "r2")


# -- the CLI, in-process on the image (no daemon running) ------------------------------

def test_cli_propose_show_history_on_the_image(settings, capsys):
    from a4ps.cli import main
    from a4ps.image import ImageStore
    d = ["--data-dir", str(settings.data_dir)]
    assert main(d + ["codex", "propose", "ROBIN", "care", *NEW_CARE.split(),
                     "-r", "my own idea"]) == 0
    out = capsys.readouterr().out
    assert "proposed" in out and f"+{NEW_CARE}" in out and "pending" in out
    # stored in the image as pending, origin user
    parts, _ = ImageStore(settings.image_path, settings.snapshot_dir).load()
    [a] = parts["codex"]["proposals"].values()
    assert (a["persona"], a["origin"], a["status"]) == ("ROBIN", "user", "pending")
    # the same again is refused with a reason, exit 1
    assert main(d + ["codex", "propose", "ROBIN", "care", NEW_CARE, "-r", "x"]) == 1
    assert "already pending" in capsys.readouterr().err
    assert main(d + ["codex", "propose", "NOBODY", "care", "x y z", "-r", "x"]) == 1
    assert "no persona" in capsys.readouterr().err
    assert main(d + ["codex", "show"]) == 0
    out = capsys.readouterr().out
    assert "codex version 1" in out and a["id"] in out and "1 pending" in out
    # a human approves (as the daemon's codex.decide would), then history shows the diff
    codex = Codex.from_toml(CODEX_PATH)
    codex.restore_image(parts["codex"])
    codex.decide(a["id"], 1, True, by="user", reason="good idea")
    ImageStore(settings.image_path, settings.snapshot_dir).save({**parts, "codex": codex.image_state()})
    assert main(d + ["codex", "history"]) == 0
    out = capsys.readouterr().out
    assert "v1" in out and "v2" in out and "ROBIN.care" in out and "good idea" in out
    assert f"+{NEW_CARE}" in out and "-Notice how" in out
    assert main(d + ["codex", "history", "--json"]) == 0
    import json
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == [1, 2]


# -- through the daemon: the token guards codex.decide; the CLI talks to it --------------

class _Started:
    value = "started"


class DaemonSystem:
    """The parts the daemon's codex commands touch (real Codex, bus, queue)."""

    def __init__(self, settings) -> None:
        from a4ps.events import EventBus
        from a4ps.proto import ProtoManager
        from a4ps.tasks import SqliteTaskQueue
        self.settings = settings
        self.bus = EventBus()
        self.protos = ProtoManager(self.bus)
        self.tasks = SqliteTaskQueue(settings.tasks_path, bus=self.bus)
        self.codex = Codex.from_toml(CODEX_PATH, self.bus)
        self.state = _Started()

    def stop(self) -> None:
        self.tasks.close()

    def save(self) -> dict:
        return {}

    def status(self) -> dict:
        return {"state": "started"}

    def run_task(self, task, cancel=None) -> None:
        self.tasks.finish(task.id, {"answer": ""})


@pytest.fixture
def served(tmp_path, monkeypatch):
    import socket

    def free() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"
    from a4ps.config import load_settings
    from a4ps.daemon import Daemon
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free())
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", free())
    settings = load_settings(data_dir=tmp_path / "data")
    system = DaemonSystem(settings)
    daemon = Daemon(system, shutdown_grace_s=5).start()
    yield settings, system
    daemon.stop()


def test_decide_without_or_with_a_wrong_token_is_refused_and_changes_nothing(served, capsys):
    from a4ps.cli import main
    from a4ps.client import DaemonClient, DaemonError
    settings, system = served
    d = ["--data-dir", str(settings.data_dir)]
    # the CLI proposes through the running daemon (not the image)
    assert main(d + ["codex", "propose", "ROBIN", "care", NEW_CARE, "-r", "via daemon"]) == 0
    assert "(daemon)" in capsys.readouterr().out
    [a] = system.codex.pending()
    assert a.origin == "user" and not settings.image_path.exists()
    assert main(d + ["codex", "show"]) == 0
    assert a.id in capsys.readouterr().out
    state = frozen(system.codex)
    decide = {"proposal_id": a.id, "version": 1, "approve": True}
    for token in ("", "not-the-token"):
        with DaemonClient(settings.bus.command_addr, token=token, timeout=5) as c:
            with pytest.raises(DaemonError) as e:
                c.request("codex.decide", decide)
            assert e.value.code == "unauthorized"
    assert frozen(system.codex) == state and system.codex.version == 1
    with DaemonClient.from_settings(settings, timeout=5) as c:
        with pytest.raises(DaemonError) as e:
            c.request("codex.decide", {**decide, "proposal_id": "nope"})
        assert e.value.code == "not_found"
        with pytest.raises(DaemonError) as e:
            c.request("codex.decide", {**decide, "version": 7})
        assert e.value.code == "conflict"
        assert frozen(system.codex) == state
        out = c.request("codex.decide", decide)                 # the human's approval
        assert out["status"] == "approved" and out["codex_version"] == 2
        with pytest.raises(DaemonError) as e:                   # repeated
            c.request("codex.decide", decide)
        assert e.value.code == "conflict"
    assert system.codex.version == 2
    assert main(d + ["codex", "history"]) == 0
    assert f"+{NEW_CARE}" in capsys.readouterr().out


# -- approval rebuilds the persona prompt live, and the change survives a restart -----------

def _system(settings, backend):
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.system import System
    return System(settings, chat_backend=backend, embedder=HashEmbedder())


def test_approval_changes_the_persona_prompt_live_and_survives_a_restart(settings):
    """The real System: its codex.decided handler rebuilds the proto's prompt, the next
    model call carries it, and a restarted System loads the approved codex."""
    from a4ps.models.scripted import ScriptedBackend
    settings.motivator.enabled = settings.philosopher.enabled = False
    settings.curator.enabled = False
    backend = ScriptedBackend(["ok"])
    system = _system(settings, backend).start()
    try:
        codex, protos = system.codex, system.protos
        a = codex.propose("ROBIN", "care", NEW_CARE, "r", origin="user")
        b = codex.propose("BRICK", "rigour", "Reason step by step and name your assumptions.", "r")
        codex.decide(b.id, 1, False, by="user")
        assert "name your assumptions" not in protos.get("BRICK").system_prompt
        v = protos.get("ROBIN").version
        assert NEW_CARE not in protos.get("ROBIN").system_prompt
        codex.decide(a.id, 1, True, by="user", reason="kinder")
        robin = protos.get("ROBIN")
        assert NEW_CARE in robin.system_prompt and robin.version > v          # live
        assert NEW_CARE not in protos.get("ALFRED").system_prompt
        robin.invoke_llm("hello")
        assert NEW_CARE in backend.calls[-1][1][0]["content"]                 # the model sees it
    finally:
        system.stop()
    again = _system(settings, ScriptedBackend(["ok"])).start()               # restart
    try:
        assert again.codex.version == 2
        assert NEW_CARE in again.protos.get("ROBIN").system_prompt
        assert again.codex.history[-1].reason == "kinder"
        assert [x.status for x in again.codex.proposals.values()].count("rejected") == 1
        with pytest.raises(CodexError, match="rejected before"):
            again.codex.propose("BRICK", "rigour",
                                "Reason step by step and name your assumptions.", "r")
    finally:
        again.stop()


def test_cli_propose_refuses_to_write_the_image_under_a_silent_daemon(settings, capsys):
    """A process holds the daemon lock but answers nothing: never write its image."""
    import subprocess
    import sys
    import time as _t

    from a4ps.cli import main
    from a4ps.daemon import LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from a4ps.daemon import DaemonLock; "
        f"DaemonLock(Path({str(settings.data_dir / LOCK_NAME)!r})).acquire(); "
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["--data-dir", str(settings.data_dir), "codex", "propose", "ROBIN", "care",
                   NEW_CARE, "-r", "x"])
        assert rc == 1 and "did not answer" in capsys.readouterr().err
        assert not settings.image_path.exists()
    finally:
        holder.kill()
        holder.wait()
    _t.sleep(0.05)
    assert main(["--data-dir", str(settings.data_dir), "codex", "propose", "ROBIN", "care",
                 NEW_CARE, "-r", "x"]) == 0
