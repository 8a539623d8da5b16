"""Time travel: snapshot metadata, list, diff, named snapshots, restore without restart.

A real System (real ProtoManager, Codex, ImageStore on disk, LanceDB) on the scripted
stand-in chat backend and the hash embedder, so it is fast; the daemon and CLI tests
at the end go over real ZeroMQ sockets.
"""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from a4ps.config import load_settings
from a4ps.events import EventRecorder
from a4ps.image import ImageStore
from a4ps.models.scripted import ScriptedBackend, demo_decision, demo_reply
from a4ps.snapshots import SnapshotConflict, SnapshotError, SnapshotNotFound, TaskGate
from a4ps.system import System

GREET_V1 = "def greet(self):\n    return 'hello from ' + self.name"
GREET_V2 = "def greet(self):\n    return 'HOWDY ' + self.name.lower()"


def make_settings(data_dir, **extra):
    return load_settings(data_dir=data_dir, models={"backend": "scripted",
                                                    "embedding_backend": "hash"}, **extra)


@pytest.fixture
def system(data_dir):
    s = System(make_settings(data_dir)).start(services=False)
    yield s
    s.stop()


# -- metadata -------------------------------------------------------------------------

def test_every_save_writes_metadata_with_a_summary_of_what_changed(system):
    first = system.timemachine.list()
    assert first[0]["generation"] == 1 and first[0]["trigger"] == "manual"
    assert first[0]["summary"].startswith("first image:")
    system.protos.update("BRICK", {"temperature": 0.1}, methods={"greet": GREET_V1})
    system.protos.create("scratch", {"x": 1})
    system.save(trigger="autosave")
    entries = system.timemachine.list()
    newest = entries[0]
    assert list(newest) == ["id", "name", "ts", "generation", "trigger", "size", "summary",
                            "changes"]
    assert newest["trigger"] == "autosave" and newest["generation"] == 2
    assert newest["size"] == system.settings.image_path.stat().st_size
    assert "+1 proto (scratch)" in newest["summary"]
    assert "BRICK.greet/temperature" in newest["summary"]
    assert newest["changes"]["protos"]["changed"]["BRICK"] == ["greet", "temperature"]
    assert newest["changes"]["protos"]["added"] == ["scratch"]
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    # the previous image moved into the ring and kept its own metadata
    assert entries[1]["id"] == first[0]["id"] and entries[1]["summary"] == first[0]["summary"]


def test_codex_and_tool_changes_are_summarised(system):
    a = system.codex.propose("ROBIN", "care", "Listen first, then answer kindly.", "asked")
    system.codex.decide(a.id, system.codex.version, True, by="user")
    system.protos.create("tool", {"kind": "tool"}) if "tool" not in system.protos else None
    system.protos.create("tool.adder", {"name": "adder"}, parent="tool")
    system.save(trigger="autosave")
    newest = system.timemachine.list()[0]
    assert "codex v1 -> v2 (ROBIN.care)" in newest["summary"]
    assert "tools +adder" in newest["summary"]
    assert newest["changes"]["codex"] == {"before_version": 1, "after_version": 2,
                                          "changed": ["ROBIN.care"]}
    assert newest["changes"]["tools"]["added"] == ["adder"]


def test_ring_prunes_snapshots_and_their_metadata_but_never_named_ones(data_dir):
    with System(make_settings(data_dir, image={"snapshot_ring": 2})).start(services=False) as s:
        named = s.timemachine.snapshot("keeper")["id"]
        for i in range(6):
            s.protos.update("BRICK", {"n": i})
            s.save(trigger="autosave")
        snaps = s.image.snapshots()
        assert len(snaps) == 2
        metas = sorted(p.name for p in s.settings.snapshot_dir.glob("*.meta.json"))
        assert metas == sorted(ImageStore.meta_path(p).name for p in snaps)
        entry = s.timemachine.resolve("keeper")
        assert entry["id"] == named and entry["trigger"] == "named"
        assert s.timemachine.read(entry)["protos"]["BRICK"]["slots"].get("n") is None


def test_named_snapshot_names_are_checked(system):
    system.timemachine.snapshot("before-edit")
    with pytest.raises(SnapshotConflict, match="exists"):
        system.timemachine.snapshot("before-edit")
    for bad in ("", "../x", "a b", "1234567"):
        with pytest.raises(SnapshotError):
            system.timemachine.snapshot(bad)
    with pytest.raises(SnapshotNotFound, match="a4ps image list"):
        system.timemachine.resolve("nope")


def test_kept_snapshots_beyond_the_limit_are_pruned_named_ones_stay(data_dir):
    with System(make_settings(data_dir, image={"kept_snapshots": 2})).start(services=False) as s:
        s.timemachine.snapshot("one")
        ids = []
        for i in range(4):
            s.protos.update("BRICK", {"n": i})
            ids.append(s.timemachine.checkpoint("pre-swap"))
        kept = [e for e in s.image.catalog() if e["where"] == "kept"]
        assert [e["trigger"] for e in kept].count("pre-swap") == 2
        assert {e["id"] for e in kept if e["trigger"] == "pre-swap"} == set(ids[-2:])
        assert any(e["name"] == "one" for e in kept)


def test_a_snapshot_without_metadata_is_still_listed(system):
    system.protos.update("BRICK", {"temperature": 0.4})   # unchanged saves write nothing
    system.save(trigger="autosave")
    ring = system.image.snapshots()[0]
    ImageStore.meta_path(ring).unlink()
    entry = next(e for e in system.timemachine.list() if ring.name.split(".")[1] == e["id"])
    assert entry["trigger"] == "unknown" and entry["size"] == ring.stat().st_size


# -- diff -------------------------------------------------------------------------------

def test_diff_against_live_and_between_snapshots(system):
    system.protos.update("BRICK", {"temperature": 0.3}, methods={"greet": GREET_V1})
    # (personas get a morph_pos only once the user drags them in the UI)
    system.protos.update("ROBIN", {"morph_pos": {"left": 12.0, "top": 40.0}})
    s1 = system.timemachine.snapshot("s1")["id"]
    system.protos.update("BRICK", {"temperature": 0.9}, methods={"greet": GREET_V2})
    system.protos.create("extra", {"y": 2})
    system.protos.update("ROBIN", delete=["morph_pos"])
    live = system.timemachine.diff(s1)
    assert live["protos"]["added"] == ["extra"] and live["protos"]["removed"] == []
    brick = live["protos"]["changed"]["BRICK"]
    assert brick["slots"]["temperature"] == {"before": 0.3, "after": 0.9}
    assert brick["methods"]["greet"] == {"before": GREET_V1, "after": GREET_V2}
    assert live["protos"]["changed"]["ROBIN"]["slots"]["morph_pos"]["after"] is None
    assert live["codex"] == {"before_version": 1, "after_version": 1, "changed": []}
    assert live["tools"] == {"added": [], "removed": []}
    s2 = system.timemachine.snapshot("s2")["id"]
    back = system.timemachine.diff(s2, s1)
    assert back["protos"]["removed"] == ["extra"]
    assert back["protos"]["changed"]["BRICK"]["methods"]["greet"]["after"] == GREET_V1
    assert system.timemachine.diff(s2)["protos"] == {"added": [], "removed": [], "changed": {}}
    # by the last digits of an id, too
    assert system.timemachine.resolve(s1[-8:])["id"] == s1


# -- restore ------------------------------------------------------------------------------

def test_restoring_a_snapshot_from_before_a_method_edit_brings_the_old_behaviour_back_live(system):
    system.protos.update("persona", methods={"greet": GREET_V1})
    brick = system.protos.get("BRICK")
    assert brick.greet() == "hello from BRICK"
    before = system.timemachine.snapshot("before-edit")["id"]
    system.protos.update("persona", methods={"greet": GREET_V2})
    assert system.protos.get("BRICK").greet() == "HOWDY brick"
    rec = EventRecorder(system.bus)

    out = system.timemachine.restore("before-edit")

    assert out["restored"] == before
    assert system.protos.get("BRICK").greet() == "hello from BRICK"     # live, no restart
    topics = [t for t in rec.topics() if t in ("image.restored", "proto.changed")]
    assert topics[0] == "image.restored" and "proto.changed" in topics[1:]
    assert rec.of("image.restored")[0].payload == {"snapshot": before,
                                                   "pre_restore": out["pre_restore"],
                                                   "name": "before-edit"}
    changed = [e.payload for e in rec.of("proto.changed")]
    assert {"name": "persona", "change": "updated", "keys": ["greet"]}.items() <= changed[0].items()
    # the restore was saved: a restart sees the restored state
    pre = system.timemachine.resolve(out["pre_restore"])
    assert pre["trigger"] == "pre-restore"
    assert system.timemachine.list()[0]["summary"].startswith(f"restored snapshot {before}")
    # and it can be undone
    system.timemachine.restore(out["pre_restore"])
    assert system.protos.get("BRICK").greet() == "HOWDY brick"


def test_restore_moves_versions_forward_so_stale_editors_conflict(system):
    v0, t0 = system.protos.get("BRICK").version, system.protos.get("BRICK").temperature
    system.timemachine.snapshot("old")
    system.protos.update("BRICK", {"temperature": 0.5})
    stale = system.protos.get("BRICK").version
    system.timemachine.restore("old")
    brick = system.protos.get("BRICK")
    assert brick.temperature == t0 != 0.5 and brick.version > stale > v0
    from a4ps.proto import ProtoError
    with pytest.raises(ProtoError, match="reload"):
        system.protos.update("BRICK", {"temperature": 0.2}, expected_version=stale)


def test_restore_survives_a_restart(data_dir):
    settings = make_settings(data_dir)
    with System(settings).start(services=False) as s:
        s.protos.update("persona", methods={"greet": GREET_V1})
        s.timemachine.snapshot("v1")
        s.protos.update("persona", methods={"greet": GREET_V2})
        s.timemachine.restore("v1")
    with System(settings).start(services=False) as again:
        assert again.protos.get("ROBIN").greet() == "hello from ROBIN"


def test_an_unreadable_snapshot_is_refused_and_nothing_changes(system):
    system.protos.update("BRICK", {"temperature": 0.4})
    sid = system.timemachine.snapshot("broken")["id"]
    system.protos.update("BRICK", {"temperature": 0.6})
    path = system.timemachine.resolve(sid)["path"]
    data = path.read_bytes()
    os.unlink(path)                      # hard links: break only this copy
    path.write_bytes(data[: len(data) // 2])
    meta = ImageStore.meta_path(path)
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "size": path.stat().st_size}))
    n_snaps = len(system.timemachine.list())
    with pytest.raises(SnapshotError, match="cannot be read"):
        system.timemachine.restore(sid)
    assert system.protos.get("BRICK").temperature == 0.6
    assert len(system.timemachine.list()) == n_snaps      # no pre-restore snapshot either


def test_a_snapshot_that_cannot_become_live_is_refused(system, tmp_path):
    store = system.image
    bad = {"protos": {"BRICK": {"slots": {}, "methods": {}, "parent": "missing", "version": 1}}}
    store.save(bad, trigger="manual")
    sid = store.catalog()[0]["id"]
    system.save()                        # the live image is good again
    with pytest.raises(SnapshotError, match="missing"):
        system.timemachine.restore(sid)
    assert "ALFRED" in system.protos


def _slow_system(data_dir, latency=0.02):
    backend = ScriptedBackend(demo_reply, models=None, decide=demo_decision, latency_s=latency)
    return System(make_settings(data_dir), chat_backend=backend).start(services=False)


BRICK_SAYS = ("def invoke_llm(self, prompt, **kw):\n"
              "    return '{word} brick: a careful logical answer about the question asked.'\n")


def test_a_task_in_flight_finishes_on_the_old_state_and_the_next_sees_the_new(data_dir):
    s = _slow_system(data_dir)
    try:
        s.protos.update("BRICK", methods={"invoke_llm": BRICK_SAYS.format(word="NEW")})
        s.timemachine.snapshot("new")
        s.protos.update("BRICK", methods={"invoke_llm": BRICK_SAYS.format(word="OLD")})
        rec = EventRecorder(s.bus)
        task = s.tasks.submit("Is a hot dog a sandwich?")
        claimed = s.tasks.claim(timeout=1)
        worker = threading.Thread(target=s.run_task, args=(claimed,))
        worker.start()
        rec.wait_for("task.step", where=lambda e: e.payload.get("persona") == "BRICK")
        s.timemachine.restore("new")              # waits for the task boundary
        topics = rec.topics()
        assert topics.index("task.done") < topics.index("image.restored")
        worker.join(10)
        turns = [e.payload["text"] for e in rec.of("task.step")
                 if e.payload.get("persona") == "BRICK" and e.payload.get("node") == "brick"]
        assert turns and all(t.startswith("OLD") for t in turns)
        assert s.tasks.get(task.id).status == "done"
        rec2 = EventRecorder(s.bus)
        nxt = s.tasks.submit("And a taco?")
        s.run_task(s.tasks.claim(timeout=1))
        turns = [e.payload["text"] for e in rec2.of("task.step")
                 if e.payload.get("persona") == "BRICK" and e.payload.get("node") == "brick"]
        assert turns and all(t.startswith("NEW") for t in turns)
        assert s.tasks.get(nxt.id).status == "done"
    finally:
        s.stop()


def test_restore_gives_up_clearly_when_a_task_does_not_finish(data_dir):
    s = System(make_settings(data_dir, image={"restore_wait_s": 0.3})).start(services=False)
    try:
        t0 = s.protos.get("BRICK").temperature
        s.timemachine.snapshot("x")
        s.protos.update("BRICK", {"temperature": 0.2})
        entered, release = threading.Event(), threading.Event()

        def a_long_task():
            with s.task_gate.task("task t-1"):
                entered.set()
                release.wait(10)
        holder = threading.Thread(target=a_long_task)
        holder.start()
        entered.wait(5)
        try:
            with pytest.raises(SnapshotConflict, match="task t-1 is still running"):
                s.timemachine.restore("x")
        finally:
            release.set()
            holder.join(5)
        assert s.protos.get("BRICK").temperature == 0.2
        s.timemachine.restore("x")
        assert s.protos.get("BRICK").temperature == t0 != 0.2
    finally:
        s.stop()


def test_task_gate_blocks_new_tasks_while_a_restore_waits():
    gate = TaskGate()
    order: list[str] = []
    first = gate.task("task a")
    first.__enter__()

    def restore():
        with gate.exclusive(5):
            order.append("restore")

    def later_task():
        with gate.task("task b"):
            order.append("task b")
    r = threading.Thread(target=restore)
    r.start()
    time.sleep(0.1)
    b = threading.Thread(target=later_task)
    b.start()
    time.sleep(0.1)
    assert order == []
    first.__exit__(None, None, None)
    r.join(5)
    b.join(5)
    assert order == ["restore", "task b"]


# -- automatic snapshots before swaps and amendments ------------------------------------------

def test_a_codex_amendment_is_preceded_by_a_snapshot(system):
    a = system.codex.propose("ROBIN", "care", "Listen first, then answer kindly.", "asked")
    system.codex.decide(a.id, system.codex.version, True, by="user")
    pre = [e for e in system.timemachine.list() if e["trigger"] == "pre-amendment"]
    assert len(pre) == 1
    image = system.timemachine.read(system.timemachine.resolve(pre[0]["id"]))
    assert image["codex"]["version"] == 1
    assert system.codex.version == 2
    # a rejection changes nothing in the codex: no snapshot
    b = system.codex.propose("ROBIN", "care", "Something else entirely.", "asked")
    system.codex.decide(b.id, system.codex.version, False, by="user")
    assert len([e for e in system.timemachine.list() if e["trigger"] == "pre-amendment"]) == 1


def test_a_model_swap_is_preceded_by_a_snapshot(system, tmp_path):
    dirs = []
    for v in (1, 2):
        d = tmp_path / f"v{v}"
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        dirs.append(d)
    lineage = [
        {"version": 1, "model_name": f"smollm2-135m+lora:{dirs[0]}", "status": "superseded",
         "backend": "embedded", "adapter_dir": str(dirs[0])},
        {"version": 2, "model_name": f"smollm2-135m+lora:{dirs[1]}", "status": "live",
         "backend": "embedded", "adapter_dir": str(dirs[1])},
    ]
    system.protos.update("BRICK", {"model_name": lineage[1]["model_name"], "model_lineage": lineage})
    system.finetuner.rollback("BRICK")                    # a swap back to v1
    pre = [e for e in system.timemachine.list() if e["trigger"] == "pre-swap"]
    assert len(pre) == 1
    image = system.timemachine.read(system.timemachine.resolve(pre[0]["id"]))
    assert image["protos"]["BRICK"]["slots"]["model_name"] == lineage[1]["model_name"]
    # and the fine-tuner's own swap (after its gate) takes one too
    from a4ps.fine_tuning.unsloth_forge import FinetuneReport
    report = FinetuneReport(persona="BRICK", adapter_dir=str(dirs[1]))
    proto = system.protos.get("BRICK")
    system.finetuner._record("BRICK", proto, list(proto.model_lineage), 3, proto.model_name,
                             f"smollm2-135m+lora:{dirs[1]}", report, "embedded",
                             status="live", swap=True)
    assert len([e for e in system.timemachine.list() if e["trigger"] == "pre-swap"]) == 2
