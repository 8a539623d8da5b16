"""System: the parts built from Settings, the image across restarts, one task end to end.

Uses the scripted stand-in chat backend and the hash embedder, so it is fast; the real
model runs in the models, graph and daemon tests.
"""
from __future__ import annotations

import pytest

from a4ps.config import load_settings
from a4ps.events import EventRecorder
from a4ps.system import System, SystemStateError


def make_settings(data_dir, backend="scripted"):
    return load_settings(data_dir=data_dir, models={"backend": backend, "embedding_backend": "hash"})


def test_fresh_start_seeds_personas_from_the_codex(data_dir):
    with System(make_settings(data_dir)).start(services=False) as system:
        for name in ("ALFRED", "BRICK", "ROBIN"):
            p = system.protos.get(name)
            assert p.parent is system.protos.get("persona")
            assert p.system_prompt == system.codex.system_prompt(name)
            assert p.model_name == "smollm2-135m"
            assert p.has("invoke_llm")            # inherited live method
        assert system.settings.image_path.exists()
        snap = system.snapshot()
        assert {p["name"] for p in snap["protos"]} >= {"ALFRED", "BRICK", "ROBIN"}
        assert snap["status"]["codex_version"] == 1


def test_persona_invoke_llm_goes_through_the_model_manager(data_dir):
    with System(make_settings(data_dir)).start(services=False) as system:
        reply = system.protos.get("BRICK").invoke_llm("Task: count to three")
        assert reply.startswith("Brick reflects")
        assert system.models.stats()["generations"] == 1


def test_edits_survive_a_restart(data_dir):
    settings = make_settings(data_dir)
    with System(settings).start(services=False) as system:
        system.protos.update("persona", methods={
            "greet": "def greet(self):\n    return 'edited ' + self.role"})
        system.protos.update("ROBIN", {"morph_pos": [11, 22], "temperature": 0.1})
    with System(settings).start(services=False) as again:
        robin = again.protos.get("ROBIN")
        assert robin.greet() == "edited empath"
        assert robin.morph_pos == [11, 22] and robin.temperature == 0.1
        assert again.last_load is not None and not again.last_load.skipped


def test_switching_backend_in_settings_switches_persona_models(data_dir):
    with System(make_settings(data_dir)).start(services=False):
        pass
    with System(make_settings(data_dir, backend="ollama")).start(services=False) as system:
        assert system.protos.get("BRICK").model_name == "phi3:mini"
        assert system.protos.get("BRICK").model_backend == "ollama"


def test_one_task_end_to_end(data_dir):
    settings = make_settings(data_dir)
    with System(settings).start(services=False) as system:
        rec = EventRecorder(system.bus)
        task = system.tasks.submit("Why do we dream?")
        claimed = system.tasks.claim(timeout=1)
        assert claimed.id == task.id
        result = system.run_task(claimed)
        assert result["answer"]
        assert system.tasks.get(task.id).status == "done"
        steps = [e.payload["persona"] for e in rec.of("task.step")]
        assert "BRICK" in steps and "ROBIN" in steps and "ALFRED" in steps
        assert rec.of("task.done")[0].payload["task_id"] == task.id
        assert any(r.task_id == task.id for r in system.memory.search("dream", k=5))


def test_codex_approval_changes_the_live_prompt(data_dir):
    settings = make_settings(data_dir)
    with System(settings).start(services=False) as system:
        a = system.codex.propose("ROBIN", "care", "Listen first, then answer kindly.", "user asked")
        system.codex.decide(a.id, system.codex.version, True, by="test")
        assert "Listen first" in system.protos.get("ROBIN").system_prompt
    with System(settings).start(services=False) as again:
        assert again.codex.version == 2
        assert "Listen first" in again.protos.get("ROBIN").system_prompt


def test_lifecycle_is_explicit(data_dir):
    system = System(make_settings(data_dir))
    system.start(services=False)
    with pytest.raises(SystemStateError, match="new System"):
        system.start()
    system.stop()
    system.stop()  # idempotent
    assert system.state.value == "stopped"


def test_brick_is_told_the_imports_the_gate_allows(data_dir):
    from a4ps.models.scripted import ScriptedBackend
    from a4ps.tools.tool_forge import ToolSpec
    settings = load_settings(data_dir=data_dir, models={"embedding_backend": "hash"},
                             sandbox={"allowed_imports": ["math", "fractions"]})
    backend = ScriptedBackend(["no code"])
    with System(settings, chat_backend=backend).start(services=False) as system:
        system._brick_writes_tool(ToolSpec(name="halve", description="half of x"), None)
        prompt = backend.calls[-1][1][-1]["content"]
        assert "math, fractions" in prompt and "statistics" not in prompt


# -- issue 13: saves that fail are retried, and nothing is marked saved that is not ----

import contextlib  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
import time  # noqa: E402

from conftest import file_size_limit, fill_up  # noqa: E402


def _fast_settings(data_dir, **image):
    return load_settings(data_dir=data_dir,
                         models={"backend": "scripted", "embedding_backend": "hash"},
                         image={"autosave_interval_s": 0.2, **image})


def test_a_failed_save_is_retried_and_its_changes_stay_unsaved(small_fs, tmp_path):
    """Failure 2: System.save cleared the dirty flags before writing; when the write
    failed (disk full) autosave thought there was nothing to save."""
    data = (small_fs or tmp_path) / "data"
    system = System(_fast_settings(data)).start(services=False)
    rec = EventRecorder(system.bus)
    limit = contextlib.ExitStack()
    try:
        if small_fs is not None:
            ballast = fill_up(small_fs)                 # a real full filesystem
        else:                                           # no tmpfs here: a file size limit
            ballast = None
            limit.enter_context(file_size_limit(system.image.path.stat().st_size // 2))
        system.protos.update("BRICK", {"mood": "stern"})
        failed = rec.wait_for("image.save_failed", timeout=10)
        assert failed.payload["attempts"] >= 1 and failed.payload["retry_in_s"] > 0
        assert ("No space left" if ballast else "too large") in failed.payload["error"]
        assert system.dirty                             # still unsaved
        status = system.status()["image"]
        assert status["save_error"]["attempts"] >= 1 and status["unsaved_changes"]
        with pytest.raises(OSError):
            system.save()
        # space comes back: the retry writes the image within moments
        t0 = time.monotonic()
        if ballast is not None:
            ballast.unlink()
        limit.close()
        rec.wait_for("image.save_recovered", timeout=35)
        assert time.monotonic() - t0 < 35
        assert not system.dirty and system.status()["image"]["save_error"] is None
        from a4ps.image import ImageStore
        parts, _ = ImageStore(system.image.path, system.image.snapshot_dir).load()
        assert parts["protos"]["BRICK"]["slots"]["mood"] == "stern"
    finally:
        system.stop()


def test_start_then_stop_writes_no_new_snapshot(data_dir):
    settings = _fast_settings(data_dir)
    System(settings).start(services=False).stop()
    with System(settings).start(services=False) as system:
        system.protos.update("BRICK", {"mood": "calm"})
    ring = sorted(settings.snapshot_dir.iterdir())
    for _ in range(3):                                  # idle restarts
        with System(settings).start(services=False) as system:
            time.sleep(0.5)                             # autosave ticks, nothing changed
    assert sorted(settings.snapshot_dir.iterdir()) == ring
    assert stat.S_IMODE(settings.image_path.stat().st_mode) == 0o600


def test_status_says_what_was_loaded_and_what_was_skipped(data_dir):
    settings = _fast_settings(data_dir)
    with System(settings).start(services=False) as system:
        system.protos.update("BRICK", {"mood": "calm"})
    settings.image_path.write_bytes(b"not an image")
    with System(settings).start(services=False) as system:
        image = system.status()["image"]
        assert image["loaded_from"] != str(settings.image_path)
        assert image["skipped"][0]["path"] == str(settings.image_path)
        assert "unreadable" in image["skipped"][0]["reason"]


def test_one_writer_per_data_directory(data_dir):
    from a4ps.lock import DataLockHeld
    settings = _fast_settings(data_dir)
    with System(settings).start(services=False):
        with pytest.raises(DataLockHeld, match=str(os.getpid())):
            System(settings).start(services=False)
    System(settings).start(services=False).stop()       # released at stop


def test_a_persona_damaged_in_an_old_image_is_repaired_at_start(data_dir):
    """Failure 8's leftovers: an image saved before the checks, with ROBIN's role and
    model_name deleted and a 200-deep slot, starts repaired and lists fine."""
    settings = _fast_settings(data_dir)
    with System(settings).start(services=False) as system:
        pass
    from a4ps.image import ImageStore
    store = ImageStore(settings.image_path, settings.snapshot_dir)
    parts, _ = store.load()
    robin = parts["protos"]["ROBIN"]["slots"]
    robin.pop("role")
    robin.pop("model_name")
    deep: list = []
    node = deep
    for _ in range(200):
        node.append([])
        node = node[0]
    robin["poison"] = deep
    store.save(parts)
    with System(settings).start(services=False) as system:
        robin = system.protos.get("ROBIN")
        assert robin.role == system.codex.persona("ROBIN").role and robin.model_name
        listed = system.snapshot()["protos"]          # no RecursionError
        assert any(p["name"] == "ROBIN" for p in listed)


def test_a_new_image_is_seeded_with_the_calculate_tool_once(data_dir, tmp_path):
    with System(make_settings(data_dir)).start(services=False) as system:
        tool = system.tools.get("calculate")
        assert tool.get("created_by") == "seed"
        system.tools.protos.remove(tool.name)          # a person deletes it
    with System(make_settings(data_dir)).start(services=False) as again:
        assert "calculate" not in again.tools           # the deletion stands over a restart
    off = load_settings(data_dir=tmp_path / "off", forge={"seed_tools": False},
                        models={"backend": "scripted", "embedding_backend": "hash"})
    with System(off).start(services=False) as bare:
        assert "calculate" not in bare.tools
