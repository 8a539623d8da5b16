import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dill
import pytest

from a4ps.events import EventBus
from a4ps.image import IMAGE_FORMAT, ImageError, ImageStore
from a4ps.proto import ProtoManager


def store_for(d: Path, ring: int = 5) -> ImageStore:
    return ImageStore(d / "live_image.dill", d / "snapshots", ring)


def build_graph(pm: ProtoManager) -> None:
    pm.create("persona", {"temperature": 0.7},
              methods={"describe": "def describe(self):\n    return f'{self.name}:{self.temperature}'"})
    pm.clone("persona", "BRICK", temperature=0.2)
    pm.copy("BRICK", "BRICK_COPY")


def test_proto_graph_round_trip_with_edited_method(data_dir):
    pm = ProtoManager(EventBus())
    build_graph(pm)
    pm.update("persona", methods={"describe": "def describe(self):\n    return 'edited ' + self.name"})
    store_for(data_dir).save({"protos": pm.image_state()})

    # a "restart": a fresh manager from the file alone
    pm2 = ProtoManager(EventBus())
    parts, info = store_for(data_dir).load()
    pm2.restore_image(parts["protos"])
    brick = pm2.get("BRICK")
    assert brick.describe() == "edited BRICK"     # the edit survived
    assert brick.parent is pm2.get("persona")     # delegation rebuilt
    assert pm2.get("BRICK_COPY").temperature == 0.2
    assert brick.version == pm.get("BRICK").version
    assert info.format == IMAGE_FORMAT


def test_snapshot_ring_keeps_last_n(data_dir):
    store = store_for(data_dir, ring=3)
    for i in range(6):
        store.save({"n": i})
    assert len(store.snapshots()) == 3
    assert store.load()[0] == {"n": 5}
    assert [store.read(p)[2]["n"] for p in store.snapshots()] == [4, 3, 2]


@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_corrupt_newest_falls_back_to_previous(data_dir, caplog, damage):
    store = store_for(data_dir)
    store.save({"n": 1})
    store.save({"n": 2})
    live = data_dir / "live_image.dill"
    blob = live.read_bytes()
    live.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else os.urandom(len(blob)))
    caplog.set_level(logging.ERROR)
    parts, info = store.load()
    assert parts == {"n": 1}
    assert info.skipped and info.skipped[0][0] == live
    assert str(live) in caplog.text and "trying the previous snapshot" in caplog.text
    # the next save must not push the bad image into the ring
    store.save({"n": 3})
    assert all(store.read(p) for p in store.snapshots())
    assert list(data_dir.glob("live_image.dill.corrupt-*"))


def test_nothing_readable_is_an_error_not_a_silent_reset(data_dir):
    (data_dir / "live_image.dill").write_bytes(b"\x80\x05garbage")
    with pytest.raises(ImageError, match="no readable image"):
        store_for(data_dir).load()


def test_sigkill_during_save_leaves_previous_image_loadable(data_dir):
    store = store_for(data_dir, ring=3)
    store.save({"n": 0, "protos": {}})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("image_saver.py")),
                             str(data_dir)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(1.2)  # many 8 MB saves in flight; the kill lands mid-write most times
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts, info = store_for(data_dir, ring=3).load()
    assert parts["n"] >= 0 and not info.skipped
    removed = store_for(data_dir).sweep_temp()
    assert not list(data_dir.glob("live_image.dill.tmp*"))
    assert all(p.name.startswith("live_image.dill.tmp") for p in removed)


def test_migration_from_format_1(data_dir):
    legacy = {"magic": "a4ps-image", "format": 1, "saved_at": 0.0,
              "parts": {"protos": {
                  "persona": {"slots": {"temperature": 0.4}, "methods": {}},
                  "ROBIN": {"slots": {"_parent": "persona", "role": "empath"},
                            "methods": {"hi": "def hi(self):\n    return self.role"}}}}}
    (data_dir / "live_image.dill").write_bytes(dill.dumps(legacy))
    parts, info = store_for(data_dir).load()
    assert info.format == 1
    pm = ProtoManager()
    pm.restore_image(parts["protos"])
    robin = pm.get("ROBIN")
    assert robin.temperature == 0.4 and robin.hi() == "empath"


def test_newer_format_is_refused_clearly(data_dir):
    (data_dir / "live_image.dill").write_bytes(dill.dumps(
        {"magic": "a4ps-image", "format": IMAGE_FORMAT + 1, "parts": {}}))
    with pytest.raises(ImageError, match="upgrade A4PS"):
        store_for(data_dir).load()


def test_concurrent_edits_while_autosaving(data_dir):
    pm = ProtoManager(EventBus())
    for i in range(200):
        pm.create(f"p{i}", {"n": 0})
    store = store_for(data_dir)
    stop = threading.Event()
    errors: list[BaseException] = []

    def saver():
        try:
            while not stop.is_set():
                store.save({"protos": pm.image_state()})
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    def editor(k):
        try:
            for i in range(300):
                pm.update(f"p{(k * 31 + i) % 200}", {f"w{k}": i})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=saver)
    t.start()
    editors = [threading.Thread(target=editor, args=(k,)) for k in range(4)]
    for e in editors:
        e.start()
    for e in editors:
        e.join()
    stop.set()
    t.join()
    assert not errors
    store.save({"protos": pm.image_state()})
    pm2 = ProtoManager()
    pm2.restore_image(store.load()[0]["protos"])
    for p in pm:
        assert pm2.get(p.name).own_slots() == p.own_slots()
        assert pm2.get(p.name).version == p.version


# -- issue 13: versions, permissions, no identical snapshots ----------------------------

import stat  # noqa: E402

from a4ps.image import ImageTooNew, SaveRetry  # noqa: E402


def _newer_image(path: Path) -> None:
    path.write_bytes(dill.dumps({"magic": "a4ps-image", "format": IMAGE_FORMAT + 1,
                                 "saved_at": 0.0, "parts": {"protos": {}}}))


def test_a_newer_image_is_refused_not_renamed(data_dir):
    """Failure 4: a newer image was taken for corrupt, renamed *.corrupt-*, and the
    daemon silently started on an older snapshot."""
    store = store_for(data_dir)
    store.save({"n": 1})
    store.save({"n": 2})                        # snapshot ring now holds n=1
    live = data_dir / "live_image.dill"
    _newer_image(live)
    names = sorted(p.name for p in data_dir.rglob("*"))
    with pytest.raises(ImageTooNew) as e:
        store_for(data_dir).load()
    msg = str(e.value)
    snap = store.snapshots()[0]
    assert "written by a newer A4PS" in msg and "upgrade" in msg
    assert f"--from-snapshot {snap.name}" in msg and "\n" not in msg
    assert e.value.fallback == snap
    assert sorted(p.name for p in data_dir.rglob("*")) == names     # nothing renamed
    with pytest.raises(ImageTooNew, match="no older snapshot"):
        for p in store.snapshots():
            p.unlink()
        store_for(data_dir).load()


def test_no_readable_image_names_every_file_on_one_line(data_dir):
    store = store_for(data_dir)
    store.save({"n": 1})
    store.save({"n": 2})
    for p in [data_dir / "live_image.dill", *store.snapshots()]:
        p.write_bytes(b"garbage")
    with pytest.raises(ImageError) as e:
        store_for(data_dir).load()
    msg = str(e.value)
    assert "\n" not in msg and "live_image.dill" in msg
    assert all(p.name in msg for p in store.snapshots())


def test_image_files_are_private(data_dir):
    old = os.umask(0o022)
    try:
        store = store_for(data_dir)
        store.save({"n": 1})
        store.save({"n": 2})
    finally:
        os.umask(old)
    for p in [data_dir / "live_image.dill", *store.snapshots()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_unchanged_saves_write_no_new_snapshot(data_dir):
    """Failure 11: identical saves pushed good snapshots out of the ring."""
    store = store_for(data_dir, ring=3)
    for i in range(3):
        store.save({"n": i})
    ring = store.snapshots()
    mtime = (data_dir / "live_image.dill").stat().st_mtime_ns
    for _ in range(10):
        info = store.save({"n": 2})
        assert not info.written
    assert store.snapshots() == ring
    assert (data_dir / "live_image.dill").stat().st_mtime_ns == mtime
    assert store.save({"n": 3}).written and len(store.snapshots()) == 3
    # after a load, saving what was loaded writes nothing either
    again = store_for(data_dir, ring=3)
    parts, _ = again.load()
    again.remember(parts)
    assert not again.save(parts).written
    assert again.save(parts, force=True).written


def test_save_refused_without_the_lock(data_dir):
    from a4ps.lock import DataLock
    lock = DataLock.for_data_dir(data_dir)
    store = ImageStore(data_dir / "live_image.dill", data_dir / "snapshots", lock=lock)
    with pytest.raises(ImageError, match="lock"):
        store.save({"n": 1})
    assert not (data_dir / "live_image.dill").exists()
    lock.acquire()
    try:
        store.save({"n": 1})
    finally:
        lock.release()


def test_save_retry_schedule_and_free_space_trigger(data_dir, monkeypatch):
    retry = SaveRetry(base_s=0.5, max_s=4.0)
    store = store_for(data_dir)
    store.last_attempt_bytes = 1000
    full = OSError(28, "No space left on device")
    delays = [retry.failed(full, data_dir).retry_in_s for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert "full" in retry.failure.hint and retry.failure.attempts == 6
    # not due by time, but due at once when space is back
    class Vfs:
        f_bavail, f_frsize = 0, 4096
    monkeypatch.setattr(os, "statvfs", lambda p: Vfs)
    assert not retry.due(store)
    Vfs.f_bavail = 1000
    assert retry.due(store)
    ended = retry.succeeded()
    assert ended.attempts == 6 and retry.failure is None and retry.due(store)


def test_cli_daemon_refuses_a_newer_image_in_one_line(data_dir, monkeypatch, capsys):
    import socket
    from a4ps.cli import main

    def free() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"
    for k, v in {"A4PS_MODELS__BACKEND": "scripted", "A4PS_MODELS__EMBEDDING_BACKEND": "hash",
                 "A4PS_BUS__COMMAND_ADDR": free(), "A4PS_BUS__EVENT_ADDR": free()}.items():
        monkeypatch.setenv(k, v)
    store = store_for(data_dir)
    store.save({"protos": {}})
    store.save({"protos": {}, "n": 2})
    _newer_image(data_dir / "live_image.dill")
    before = {p.name: p.read_bytes() for p in data_dir.rglob("live_image*")}
    assert main(["--data-dir", str(data_dir), "daemon"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert "written by a newer A4PS" in err[-1] and "--from-snapshot" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert {p.name: p.read_bytes() for p in data_dir.rglob("live_image*")} == before
