"""`a4ps codex approve ID` / `a4ps codex reject ID`: a headless user decides amendments,
through the running daemon, or on the image under the daemon lock when none runs.

Real parts: the CLI, the image on disk, the System (restart), the Daemon with its
ZeroMQ server (the ``served`` fixture of tests/test_codex.py).
"""
from __future__ import annotations

import subprocess
import sys

from a4ps.cli import main
from a4ps.codex import Codex
from a4ps.image import ImageStore
from a4ps.system import CODEX_PATH

from test_codex import NEW_CARE, served  # noqa: F401  (the daemon fixture)


def _image_codex(settings) -> Codex:
    parts, _ = ImageStore(settings.image_path, settings.snapshot_dir).load()
    codex = Codex.from_toml(CODEX_PATH)
    codex.restore_image(parts["codex"])
    return codex


def _propose(settings, capsys, principle="care", text=NEW_CARE) -> str:
    d = ["--data-dir", str(settings.data_dir)]
    assert main(d + ["codex", "propose", "ROBIN", principle, text, "-r", "why not"]) == 0
    out = capsys.readouterr().out
    return out.split()[1]                        # "proposed <id> (...)"


def test_approve_on_the_image_applies_it_and_the_persona_follows(settings, capsys):
    d = ["--data-dir", str(settings.data_dir)]
    pid = _propose(settings, capsys)
    assert main(d + ["codex", "approve", pid[:6], "--reason", "kinder"]) == 0    # a prefix
    out = capsys.readouterr().out
    assert f"approved {pid} (image)" in out and "codex version 2" in out
    codex = _image_codex(settings)
    assert codex.version == 2 and codex.personas["ROBIN"].principles["care"] == NEW_CARE
    assert codex.history[-1].reason == "kinder" and codex.history[-1].by == "user"
    # a System started on that image gives ROBIN the approved principle
    from a4ps.config import load_settings
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.models.scripted import ScriptedBackend
    from a4ps.system import System
    s = load_settings(data_dir=settings.data_dir)
    with System(s, chat_backend=ScriptedBackend(["ok"]), embedder=HashEmbedder()).start(
            services=False) as system:
        assert NEW_CARE in system.protos.get("ROBIN").system_prompt
    # deciding it again is refused
    assert main(d + ["codex", "reject", pid]) == 1
    assert "no pending amendment" in capsys.readouterr().err


def test_reject_on_the_image_closes_it_for_good(settings, capsys):
    d = ["--data-dir", str(settings.data_dir)]
    pid = _propose(settings, capsys)
    assert main(d + ["codex", "reject", pid]) == 0
    assert f"rejected {pid} (image)" in capsys.readouterr().out
    codex = _image_codex(settings)
    assert codex.version == 1 and codex.pending() == []
    assert codex.was_rejected("ROBIN", "care", NEW_CARE)
    assert main(d + ["codex", "propose", "ROBIN", "care", NEW_CARE, "-r", "again"]) == 1
    assert "rejected before" in capsys.readouterr().err


def test_unknown_or_ambiguous_ids_are_refused(settings, capsys):
    d = ["--data-dir", str(settings.data_dir)]
    _propose(settings, capsys)
    _propose(settings, capsys, "rigour_care", "Weigh the facts and the feelings together.")
    assert main(d + ["codex", "approve", "nope"]) == 1
    assert "no pending amendment 'nope'" in capsys.readouterr().err
    assert main(d + ["codex", "approve", ""]) == 1          # a prefix matching everything
    capsys.readouterr()
    assert _image_codex(settings).version == 1


def test_approve_and_reject_through_the_daemon(served, capsys):  # noqa: F811
    settings, system = served
    d = ["--data-dir", str(settings.data_dir)]
    a = system.codex.propose("ROBIN", "care", NEW_CARE, "r", origin="philosopher")
    b = system.codex.propose("BRICK", "rigour", "Reason step by step and name your assumptions.", "r")
    assert main(d + ["codex", "approve", a.id]) == 0
    assert f"approved {a.id} (daemon)" in capsys.readouterr().out
    assert system.codex.version == 2 and system.codex.proposals[a.id].status == "approved"
    assert main(d + ["codex", "reject", b.id, "--reason", "too strict"]) == 0
    assert f"rejected {b.id} (daemon)" in capsys.readouterr().out
    assert system.codex.proposals[b.id].status == "rejected"
    assert not settings.image_path.exists()              # the daemon owns the image
    assert main(d + ["codex", "approve", b.id]) == 1
    assert "no pending amendment" in capsys.readouterr().err


def test_decide_refuses_to_write_the_image_under_a_silent_daemon(settings, capsys):
    from a4ps.daemon import LOCK_NAME
    pid = _propose(settings, capsys)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from a4ps.daemon import DaemonLock; "
        f"DaemonLock(Path({str(settings.data_dir / LOCK_NAME)!r})).acquire(); "
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["--data-dir", str(settings.data_dir), "codex", "approve", pid])
        assert rc == 1 and "did not answer" in capsys.readouterr().err
        assert _image_codex(settings).version == 1
    finally:
        holder.kill()
        holder.wait()
