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
