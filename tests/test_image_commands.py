"""Time travel over the wire and on the command line: image.* commands on a daemon over
real ZeroMQ sockets (a real System on the scripted stand-in backend), `a4ps image ...`
with and without a daemon, and `a4ps daemon --from-snapshot`."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from a4ps.cli import main
from a4ps.client import DaemonClient, DaemonError, EventSubscriber
from a4ps.config import PROJECT_ROOT, load_settings
from a4ps.daemon import Daemon, DaemonError as StartError
from a4ps.system import System
from daemon_process import DaemonProcess
from ports import free_addr

GREET_V1 = "def greet(self):\n    return 'hello from ' + self.name"
GREET_V2 = "def greet(self):\n    return 'HOWDY ' + self.name.lower()"


@pytest.fixture
def fast_env(tmp_path, monkeypatch):
    """Settings (via A4PS_* env, as the CLI reads them) for a fast System."""
    data = tmp_path / "data"
    for key, value in {"A4PS_DATA_DIR": str(data), "A4PS_MODELS__BACKEND": "scripted",
                       "A4PS_MODELS__EMBEDDING_BACKEND": "hash",
                       "A4PS_BUS__COMMAND_ADDR": free_addr(), "A4PS_BUS__EVENT_ADDR": free_addr(),
                       "A4PS_BUS__HEARTBEAT_INTERVAL_S": "0.2",
                       "A4PS_CURATOR__ENABLED": "false", "A4PS_MOTIVATOR__ENABLED": "false",
                       "A4PS_PHILOSOPHER__ENABLED": "false"}.items():
        monkeypatch.setenv(key, value)
    return load_settings()


@pytest.fixture
def served(fast_env):
    system = System(fast_env)
    daemon = Daemon(system, shutdown_grace_s=5).start()
    client = DaemonClient.from_settings(fast_env, timeout=20)
    sub = EventSubscriber.from_settings(fast_env)
    deadline = time.monotonic() + 10
    while not sub.alive and time.monotonic() < deadline:
        sub.poll(100, timeout_ms=100)
    yield fast_env, system, client, sub
    sub.close()
    client.close()
    daemon.stop()


def _events(sub, until, timeout=10.0):
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out.extend(e for e in sub.poll(500, timeout_ms=50) if e.topic != "heartbeat")
        if until(out):
            return out
    raise AssertionError(f"timed out; got {[(e.topic, e.payload) for e in out][-10:]}")


def test_the_wire_shapes_of_image_commands(served):
    settings, system, client, sub = served
    client.request("proto.update", {"name": "persona", "methods": {"greet": GREET_V1}})
    named = client.request("image.snapshot", {"name": "before-edit"})
    assert set(named) == {"id"}
    client.request("proto.update", {"name": "persona", "methods": {"greet": GREET_V2}})
    assert system.protos.get("BRICK").greet() == "HOWDY brick"

    listed = client.request("image.snapshots", {})
    assert set(listed) == {"snapshots"}
    newest = listed["snapshots"][0]
    assert set(newest) == {"id", "name", "ts", "generation", "trigger", "size", "summary",
                           "changes"}
    assert newest["id"] == named["id"] and newest["trigger"] == "named"
    assert newest["name"] == "before-edit"

    d = client.request("image.diff", {"snapshot": named["id"], "against": None})
    assert set(d) == {"protos", "codex", "tools"}
    assert set(d["protos"]) == {"added", "removed", "changed"}
    assert d["protos"]["changed"]["persona"]["methods"]["greet"] == {"before": GREET_V1,
                                                                      "after": GREET_V2}
    assert set(d["codex"]) == {"before_version", "after_version", "changed"}
    assert set(d["tools"]) == {"added", "removed"}

    out = client.request("image.restore", {"snapshot": named["id"]})
    assert set(out) == {"restored", "pre_restore"} and out["restored"] == named["id"]
    evs = _events(sub, lambda es: any(e.topic == "proto.changed" and e.payload.get("restored")
                                      for e in es))
    topics = [e.topic for e in evs if e.topic in ("image.restored", "proto.changed")]
    first_restored = topics.index("image.restored")
    assert all(t == "proto.changed" for t in topics[first_restored + 1:])
    restored = next(e for e in evs if e.topic == "image.restored").payload
    assert restored["snapshot"] == named["id"] and restored["pre_restore"] == out["pre_restore"]
    # the UI's next look sees the restored state, no restart
    brick = client.request("proto.get", {"name": "BRICK"})
    assert brick["inherited_methods"]["greet"]["source"] == GREET_V1
    assert system.protos.get("BRICK").greet() == "hello from BRICK"


def test_image_commands_refuse_bad_input_and_keep_serving(served):
    settings, system, client, sub = served
    client.request("image.snapshot", {"name": "taken"})
    cases = [("image.restore", {"snapshot": "no-such"}, "not_found"),
             ("image.diff", {"snapshot": "12345678"}, "not_found"),
             ("image.snapshot", {"name": "taken"}, "conflict"),
             ("image.snapshot", {"name": "../etc"}, "invalid_args"),
             ("image.snapshot", {"name": ""}, "invalid_args"),
             ("image.restore", {}, "invalid_args"),
             ("image.diff", {"snapshot": "x", "extra": 1}, "invalid_args")]
    for cmd, args, code in cases:
        with pytest.raises(DaemonError) as e:
            client.request(cmd, args)
        assert e.value.code == code, (cmd, args, e.value)
    assert client.request("system.ping")["pong"]


def test_cli_image_commands_without_a_daemon(fast_env, capsys):
    with System(fast_env).start(services=False) as s:
        s.protos.update("persona", methods={"greet": GREET_V1})
    assert main(["image", "snapshot", "v1"]) == 0
    with System(fast_env).start(services=False) as s:
        s.protos.update("persona", methods={"greet": GREET_V2})
    capsys.readouterr()
    assert main(["image", "list"]) == 0
    out = capsys.readouterr().out
    assert "[v1]" in out and "named" in out and "shutdown" in out
    assert main(["image", "diff", "v1"]) == 0
    out = capsys.readouterr().out
    assert "~ proto persona" in out and "-    return 'hello from ' + self.name" in out
    assert main(["image", "restore", "v1"]) == 0
    out = capsys.readouterr().out
    assert "restored snapshot" in out and "undoes this" in out
    with System(fast_env).start(services=False) as s:
        assert s.protos.get("ROBIN").greet() == "hello from ROBIN"
    assert main(["image", "restore", "nope"]) == 1
    assert "no snapshot 'nope'" in capsys.readouterr().err


def test_cli_image_commands_go_through_a_running_daemon(served, capsys):
    settings, system, client, sub = served
    system.protos.update("persona", methods={"greet": GREET_V1})
    assert main(["image", "snapshot", "v1"]) == 0
    system.protos.update("persona", methods={"greet": GREET_V2})
    assert main(["image", "diff", "v1", "--json"]) == 0
    assert '"greet"' in capsys.readouterr().out
    assert main(["image", "restore", "v1"]) == 0
    assert "the running daemon" in capsys.readouterr().out
    assert system.protos.get("BRICK").greet() == "hello from BRICK"   # the daemon's own state


def test_daemon_from_snapshot_starts_on_that_state(fast_env):
    with System(fast_env).start(services=False) as s:
        s.protos.update("persona", methods={"greet": GREET_V1})
        sid = s.timemachine.snapshot("v1")["id"]
        s.protos.update("persona", methods={"greet": GREET_V2})
    system = System(fast_env)
    daemon = Daemon(system, shutdown_grace_s=5, from_snapshot=sid[-6:]).start()
    try:
        assert system.protos.get("ROBIN").greet() == "hello from ROBIN"
        kinds = [e["trigger"] for e in system.timemachine.list()[:3]]
        assert "pre-restore" in kinds
    finally:
        daemon.stop()
    bad = Daemon(System(fast_env), shutdown_grace_s=5, from_snapshot="nope")
    with pytest.raises(StartError, match="--from-snapshot nope: no snapshot"):
        bad.start()
    assert not bad.lock.held


def test_a_newer_image_is_kept_when_the_daemon_starts_from_the_snapshot_it_names(fast_env):
    """The refusal of a newer image names a snapshot file and --from-snapshot; that
    command must work, and the newer image must survive it (pinned, never pruned)."""
    import dill

    from a4ps.image import IMAGE_FORMAT, ImageTooNew
    with System(fast_env).start(services=False) as s:
        s.protos.update("persona", methods={"greet": GREET_V1})
        s.save()
        s.protos.update("persona", methods={"greet": GREET_V2})
    live = fast_env.image_path
    newer = dill.dumps({"magic": "a4ps-image", "format": IMAGE_FORMAT + 1, "saved_at": 0.0,
                        "parts": {"protos": {}}})
    live.write_bytes(newer)
    with pytest.raises(ImageTooNew) as refused:
        System(fast_env).start(services=False)
    snap = refused.value.fallback.name             # what the one-line refusal names
    system = System(fast_env)
    daemon = Daemon(system, shutdown_grace_s=5, from_snapshot=snap).start()
    try:
        assert system.protos.get("ROBIN").greet() == "hello from ROBIN"   # GREET_V1's state
    finally:
        daemon.stop()
    kept = [e for e in System(fast_env).image.catalog() if e["where"] == "kept"]
    pinned = [e for e in kept if (e.get("name") or "").startswith("newer-a4ps-")]
    assert len(pinned) == 1 and pinned[0]["path"].read_bytes() == newer
    assert not list(live.parent.glob("*.corrupt-*"))


@pytest.mark.slow
def test_real_daemon_process_from_snapshot_flag(fast_env, tmp_path):
    with System(fast_env).start(services=False) as s:
        s.protos.update("persona", methods={"greet": GREET_V1})
        s.timemachine.snapshot("v1")
        s.protos.update("persona", methods={"greet": GREET_V2})
    daemon = DaemonProcess(fast_env.data_dir, fast_env.bus.command_addr,
                           fast_env.bus.event_addr, args=["--from-snapshot", "v1"])
    try:
        with daemon.start().client() as client:
            brick = client.request("proto.get", {"name": "persona"})
            assert brick["methods"]["greet"] == GREET_V1
    finally:
        daemon.stop()
    bad = subprocess.run([sys.executable, "-m", "a4ps", "daemon", "--from-snapshot", "nope"],
                         cwd=PROJECT_ROOT, env=dict(os.environ), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "no snapshot 'nope'" in bad.stderr
