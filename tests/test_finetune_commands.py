"""`a4ps curate | finetune | models` go through a running daemon (which owns the image).

A real System (scripted chat backend, hash embedder) behind an in-process Daemon on
real sockets; the CLI's offline path would fail here, since the daemon holds the lock.
"""
from __future__ import annotations

import json
import time

import pytest

from a4ps.cli import main
from a4ps.config import load_settings
from a4ps.daemon import Daemon
from a4ps.system import System
from ports import free_addr


@pytest.fixture
def running(tmp_path, monkeypatch):
    monkeypatch.setenv("A4PS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free_addr())
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", free_addr())
    monkeypatch.setenv("A4PS_MODELS__BACKEND", "scripted")
    monkeypatch.setenv("A4PS_MODELS__EMBEDDING_BACKEND", "hash")
    for part in ("CURATOR", "MOTIVATOR", "PHILOSOPHER"):
        monkeypatch.setenv(f"A4PS_{part}__ENABLED", "false")
    settings = load_settings()
    system = System(settings)
    daemon = Daemon(system, shutdown_grace_s=5).start()
    yield system
    daemon.stop()


def test_curate_runs_in_the_daemon(running, capsys):
    system = running
    task = system.tasks.submit("What makes a good friend?")   # the daemon's worker runs it
    deadline = time.monotonic() + 30
    while system.tasks.get(task.id).status != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert system.tasks.get(task.id).status == "done"
    assert main(["curate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the scripted ALFRED answers no score: judged, nothing kept, the reason recorded
    assert [s["task_id"] for s in report["scored"]] == [task.id]
    assert report["added"] == 0 and report["scored"][0]["kept"] is False
    assert system.memory.recent(5, uncurated_only=True) == []   # marked curated, in the daemon


def test_models_commands_through_the_daemon(running, capsys):
    assert main(["models", "lineage", "brick"]) == 0
    out = capsys.readouterr().out
    assert "BRICK uses smollm2-135m" in out and "no fine-tuned versions yet" in out
    with pytest.raises(SystemExit, match="no fine-tuned version to roll back"):
        main(["models", "rollback", "BRICK"])
    with pytest.raises(SystemExit, match="no dataset at"):
        main(["finetune", "BRICK", "--steps", "1"])
    with pytest.raises(SystemExit, match="no persona"):
        main(["models", "lineage", "NOBODY"])


def test_offline_path_under_a_silent_daemon_ends_with_what_to_do(tmp_path, monkeypatch):
    """The commands build their offline System through a4ps.offline (one helper): a
    daemon that holds the lock but does not answer ends the command, naming it."""
    import subprocess
    import sys

    from a4ps.daemon import LOCK_NAME
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", free_addr())
    monkeypatch.setenv("A4PS_BUS__EVENT_ADDR", free_addr())
    data = tmp_path / "data"
    data.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from a4ps.daemon import DaemonLock; "
        f"DaemonLock(Path({str(data / LOCK_NAME)!r})).acquire(); "
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as ended:
            main(["--data-dir", str(data), "models", "rollback", "ALFRED"])
        message = str(ended.value.code)
        assert message.startswith("a4ps models rollback: ") and "did not answer" in message
        assert "`a4ps models rollback` again" in message
    finally:
        holder.kill()
        holder.wait()
