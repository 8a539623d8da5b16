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
