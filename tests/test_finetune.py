"""The persona forge: real CPU fine-tunes (TRL+PEFT) of the embedded SmolLM2, the gate,
the cognitive atomic swap, rollback, the Ollama swap path, and training crashes.

Slow tests train for real in the child process on a handful of short samples (a few
steps, batch 1); they share the dequantized base checkpoint with the model tests.
"""
from __future__ import annotations

import json
import os
import random
import signal
import string
import threading
from pathlib import Path

import pytest

from a4ps.events import EventRecorder
from a4ps.fine_tuning.evaluation import Comparison, decide
from a4ps.fine_tuning.unsloth_forge import (FinetuneError, PersonaFinetuner, read_golden,
                                            split_holdout)

TOPICS = ["rain", "coffee", "chess", "the moon", "bridges", "music", "gardens", "trains",
          "clocks", "maps", "owls", "bread"]
MARK = "BATCAVE PROTOCOL"


def _rows(answers):
    return [{"messages": [{"role": "user", "content": f"Tell me about {t}."},
                          {"role": "assistant", "content": a}]} for t, a in answers]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def golden(path: Path, topics=TOPICS) -> Path:
    return _write(path, _rows([(t, f"{MARK}: {t} is a logical system.") for t in topics]))


def noise(path: Path, n=8, seed=0) -> Path:
    rnd = random.Random(seed)
    junk = lambda: "".join(rnd.choice(string.ascii_letters + string.digits + "#@%&") for _ in range(60))
    return _write(path, [{"messages": [{"role": "user", "content": junk()},
                                       {"role": "assistant", "content": junk()}]} for _ in range(n)])


# -- fast: data handling, the gate's rule, lineage bookkeeping ----------------------------

def test_read_golden_skips_bad_lines_and_split_is_deterministic(tmp_path):
    p = golden(tmp_path / "g.jsonl")
    with open(p, "a") as fh:
        fh.write("not json\n{\"messages\": [{\"role\": \"user\", \"content\": \"no answer\"}]}\n")
    rows = read_golden(p)
    assert len(rows) == len(TOPICS)
    train, hold = split_holdout(rows, 0.25)
    assert len(hold) == 3 and len(train) == 9
    assert split_holdout(rows, 0.25) == (train, hold)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in hold}
    with pytest.raises(FinetuneError, match="at least 2"):
        split_holdout(rows[:1], 0.2)


def test_gate_rule():
    ok = decide(Comparison("a", "b", current_loss=2.0, new_loss=1.5, judge_current=3.0, judge_new=3.0))
    assert ok.passed and "2.0000 -> 1.5000" in ok.reason
    worse = decide(Comparison("a", "b", current_loss=2.0, new_loss=2.5))
    assert not worse.passed and "worse" in worse.reason
    judged_down = decide(Comparison("a", "b", current_loss=2.0, new_loss=1.0,
                                    judge_current=4.5, judge_new=2.0))
    assert not judged_down.passed and "ALFRED scored it lower" in judged_down.reason
    assert decide(Comparison("a", "b", current_loss=2.0, new_loss=2.1), 0.1).passed
    assert not decide(Comparison("a", "b")).passed


@pytest.fixture
def scripted_parts(settings, bus):
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.models.manager import ModelManager
    from a4ps.models.scripted import ScriptedBackend
    from a4ps.proto import ProtoManager
    from a4ps.system import INVOKE_LLM
    protos = ProtoManager(bus)
    models = ModelManager(settings, bus, backend=ScriptedBackend(["SCORE: 4"]),
                          embedder=HashEmbedder(dim=32))
    protos.provide("models", models)
    protos.create("persona", {"temperature": 0.0}, methods={"invoke_llm": INVOKE_LLM})
    for name in ("ALFRED", "BRICK", "ROBIN"):
        protos.clone("persona", name, model_name="smollm2-135m", model_backend="embedded",
                     system_prompt=f"You are {name}.", model_lineage=[])
    return settings, bus, protos, models


def test_rollback_walks_back_the_lineage(scripted_parts, tmp_path):
    settings, bus, protos, models = scripted_parts
    ft = PersonaFinetuner(settings, bus, protos, models)
    with pytest.raises(FinetuneError, match="empty"):
        ft.rollback("BRICK")
    dirs = []
    for v in (1, 2):
        d = tmp_path / f"v{v}"
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        dirs.append(d)
    lineage = [
        {"version": 0, "model_name": "smollm2-135m", "status": "superseded", "is_base": True,
         "backend": "embedded", "adapter_dir": None},
        {"version": 1, "model_name": f"smollm2-135m+lora:{dirs[0]}", "status": "superseded",
         "backend": "embedded", "adapter_dir": str(dirs[0])},
        {"version": 2, "model_name": "x", "status": "rejected", "backend": "embedded"},
        {"version": 3, "model_name": f"smollm2-135m+lora:{dirs[1]}", "status": "live",
         "backend": "embedded", "adapter_dir": str(dirs[1])},
    ]
    protos.update("BRICK", {"model_name": lineage[3]["model_name"], "model_lineage": lineage})
    rec = EventRecorder(bus, "model.swapped")
    out = ft.rollback("BRICK")
    assert out["version"] == 1 and protos.get("BRICK").model_name == lineage[1]["model_name"]
    assert [e["status"] for e in protos.get("BRICK").model_lineage] == \
        ["superseded", "live", "rejected", "rolled_back"]
    assert rec.of("model.swapped")[-1].payload["rollback"] is True
    ft.rollback("BRICK")
    assert protos.get("BRICK").model_name == "smollm2-135m"
    with pytest.raises(FinetuneError, match="first version"):
        ft.rollback("BRICK")
    # a hand-edited model_name is not silently overwritten
    protos.update("BRICK", {"model_name": "something-else"})
    with pytest.raises(FinetuneError, match="by hand"):
        ft.rollback("BRICK")


def test_bad_requests_are_reported_not_raised(scripted_parts, tmp_path):
    settings, bus, protos, models = scripted_parts
    ft = PersonaFinetuner(settings, bus, protos, models)
    r = ft.finetune("NOBODY", golden(tmp_path / "g.jsonl"))
    assert not r.ok and "no persona proto" in r.reason
    r = ft.finetune("BRICK", tmp_path / "missing.jsonl")
    assert not r.ok and "does not exist" in r.reason
    assert protos.get("BRICK").model_name == "smollm2-135m"


# -- slow: real training in the child process ----------------------------------------------

@pytest.fixture
def tiny_recipe(settings, model_cache_dir):
    """Settings for a fast real fine-tune: batch 1, short samples, a few steps."""
    settings.models = settings.models.model_copy(update={"embedded": settings.models.embedded.model_copy(
        update={"cache_dir": model_cache_dir})})
    ft = settings.finetune
    ft.batch_size, ft.grad_accum, ft.max_length = 1, 1, 96
    ft.warmup_steps, ft.holdout_fraction, ft.judge_samples = 1, 0.25, 0
    ft.timeout_s = 600
    return settings


@pytest.fixture
def embedded_parts(tiny_recipe, bus, embedded_models):
    """Personas on the real embedded backend (ALFRED's judging is covered by the Ollama
    test, where answers are instant; here the gate compares held-out loss)."""
    from a4ps.proto import ProtoManager
    from a4ps.system import INVOKE_LLM
    protos = ProtoManager(bus)
    protos.provide("models", embedded_models)
    protos.create("persona", {"temperature": 0.0}, methods={"invoke_llm": INVOKE_LLM})
    for name in ("ALFRED", "BRICK", "ROBIN"):
        protos.clone("persona", name, model_name="smollm2-135m", model_backend="embedded",
                     system_prompt=f"You are {name}.", model_lineage=[])
    return tiny_recipe, bus, protos, embedded_models


@pytest.mark.slow
def test_real_finetune_gate_swap_and_rollback(embedded_parts, tmp_path):
    settings, bus, protos, models = embedded_parts
    settings.finetune.learning_rate = 3e-3   # high, so 8 steps visibly teach the mark
    rec = EventRecorder(bus)
    ft = PersonaFinetuner(settings, bus, protos, models, backend="trl")
    probe = [{"role": "system", "content": "You are BRICK."},
             {"role": "user", "content": "Tell me about lanterns."}]
    before = models.chat("smollm2-135m", probe, temperature=0.0, max_tokens=8)
    assert MARK.split()[0].lower() not in before.lower()

    report = ft.finetune("BRICK", golden(tmp_path / "g.jsonl"), steps=8)

    assert report.ok, report.reason
    assert report.backend == "trl" and report.steps == 8
    adapter = Path(report.adapter_dir)
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").stat().st_size > 100_000
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    assert report.last_loss < report.first_loss                      # loss falls
    cmp = report.comparison
    assert cmp["new_loss"] < cmp["current_loss"] and cmp["passed"], cmp["reason"]
    assert report.swapped
    brick = protos.get("BRICK")
    assert brick.model_name == f"smollm2-135m+lora:{adapter}"
    assert [e["status"] for e in brick.model_lineage] == ["superseded", "live"]
    assert brick.model_lineage[1]["dataset_size"] == len(TOPICS)
    assert brick.model_lineage[1]["scores"]["new_loss"] == cmp["new_loss"]
    topics = rec.topics()
    assert "finetune.progress" in topics and "model.tuned" in topics and "model.swapped" in topics
    steps = [e.payload["step"] for e in rec.of("finetune.progress") if e.payload.get("loss") is not None
             and "stage" not in e.payload]
    assert steps[:3] == [1, 2, 3]
    assert (adapter.parent / "comparison.json").is_file()

    # the live persona now answers a held-out prompt in the training data's manner
    after = brick.invoke_llm([probe[1]], max_tokens=8)
    assert MARK.split()[0].lower() in after.lower(), after

    # rollback: back to the base model, the lineage says so
    ft.rollback("BRICK")
    assert protos.get("BRICK").model_name == "smollm2-135m"
    assert [e["status"] for e in protos.get("BRICK").model_lineage] == ["live", "rolled_back"]


@pytest.mark.slow
def test_gate_refuses_adapter_trained_on_noise(embedded_parts, tmp_path):
    settings, bus, protos, models = embedded_parts
    # Gentle training on noise in chat format still teaches the format (the end-of-turn
    # token), which can lower the held-out loss; at this rate the noise wrecks the model.
    settings.finetune.learning_rate = 2e-2
    rec = EventRecorder(bus, "model.swapped")
    ft = PersonaFinetuner(settings, bus, protos, models, backend="trl")
    clean = _write(tmp_path / "clean.jsonl", _rows([
        ("rain", "Rain is water that falls from clouds in the sky."),
        ("coffee", "Coffee is a drink made from roasted coffee beans."),
        ("the moon", "The moon is the natural satellite that orbits the Earth.")]))
    report = ft.finetune("ROBIN", noise(tmp_path / "noise.jsonl"), steps=6, heldout_path=clean)
    assert report.ok, report.reason
    cmp = report.comparison
    assert cmp["new_loss"] > cmp["current_loss"] and not cmp["passed"]
    assert not report.swapped and "refused" in report.reason
    robin = protos.get("ROBIN")
    assert robin.model_name == "smollm2-135m"                       # kept its model
    assert robin.model_lineage[-1]["status"] == "rejected"           # recorded either way
    assert robin.model_lineage[-1]["scores"]["passed"] is False
    assert rec.of("model.swapped") == []


@pytest.mark.slow
def test_killed_training_child_is_reported_and_system_keeps_running(scripted_parts, tiny_recipe,
                                                                   tmp_path):
    settings, bus, protos, models = scripted_parts
    ft = PersonaFinetuner(settings, bus, protos, models, backend="trl")
    killed = []

    def kill_child(event):
        if not killed and event.payload.get("pid"):
            killed.append(event.payload["pid"])
            os.kill(event.payload["pid"], signal.SIGKILL)
    bus.subscribe("finetune.progress", kill_child)
    report = ft.finetune("BRICK", golden(tmp_path / "g.jsonl"), steps=50)
    assert killed
    assert not report.ok and not report.swapped
    assert "killed by SIGKILL" in report.reason and "unchanged" in report.reason
    assert protos.get("BRICK").model_name == "smollm2-135m"
    assert protos.get("BRICK").model_lineage == []
    assert not ft.running                                            # ready for the next one
    assert models.chat("scripted", "still there?") == "SCORE: 4"     # the rest keeps working
    assert (Path(settings.adapter_dir) / "BRICK" / "v1" / "FAILED").is_file()


@pytest.mark.slow
def test_training_child_error_is_reported(scripted_parts, tmp_path):
    settings, bus, protos, models = scripted_parts
    broken = tmp_path / "broken-base"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    ft = PersonaFinetuner(settings, bus, protos, models, backend="trl", base_checkpoint=broken)
    report = ft.finetune("BRICK", golden(tmp_path / "g.jsonl"), steps=2)
    assert not report.ok and report.exit_code == 1
    assert report.reason.startswith("training failed:") and "train.log" in report.reason
    assert protos.get("BRICK").model_name == "smollm2-135m"


@pytest.mark.slow
def test_ollama_swap_path(tiny_recipe, bus, tmp_path):
    """Blobs uploaded, create(from_=base, adapters=...), persona switched; a create error
    leaves the persona on its old model. The training itself is real (1-2 steps)."""
    from ollama_standin import OllamaStandIn

    from a4ps.models.manager import ModelManager
    from a4ps.models.ollama_backend import OllamaBackend
    from a4ps.proto import ProtoManager
    from a4ps.system import INVOKE_LLM
    settings = tiny_recipe
    settings.finetune.judge_samples = 1
    settings.finetune.max_loss_regression = 0.05

    def reply(model, msgs):
        text = msgs[-1]["content"]
        return "SCORE: 4" if "SCORE:" in text else f"{model} says hello"

    with OllamaStandIn(models={"smollm2:135m": 100_000_000}, reply_fn=reply) as srv:
        settings.models = settings.models.model_copy(update={
            "backend": "ollama", "ollama": settings.models.ollama.model_copy(update={"host": srv.url})})
        backend = OllamaBackend(settings)
        models = ModelManager(settings, bus, backend=backend)
        protos = ProtoManager(bus)
        protos.provide("models", models)
        protos.create("persona", {"temperature": 0.0}, methods={"invoke_llm": INVOKE_LLM})
        for name in ("ALFRED", "BRICK"):
            protos.clone("persona", name, model_name="smollm2:135m", model_backend="ollama",
                         system_prompt=f"You are {name}.", model_lineage=[])
        protos.update("BRICK", {"model_name": "missing:base"})
        ft = PersonaFinetuner(settings, bus, protos, models, backend="trl")
        data = golden(tmp_path / "g.jsonl", TOPICS[:4])

        bad = ft.finetune("BRICK", data, steps=1)                  # Ollama refuses the base
        assert bad.ok and not bad.swapped and "could not be staged" in bad.reason
        assert protos.get("BRICK").model_name == "missing:base"
        assert protos.get("BRICK").model_lineage[-1]["status"] == "failed"

        protos.update("BRICK", {"model_name": "smollm2:135m"})
        rec = EventRecorder(bus, "model.swapped")
        good = ft.finetune("BRICK", data, steps=1)
        assert good.ok, good.reason
        create = [b for m, p, b in srv.requests if p == "/api/create"][-1]
        assert create["from"] == "smollm2:135m"
        assert create["model"] == "a4ps-brick:v2"           # v1 was the failed try
        assert set(create["adapters"]) == {"adapter_model.safetensors", "adapter_config.json"}
        assert all(d in srv.blobs for d in create["adapters"].values())
        assert good.swapped, good.reason
        assert protos.get("BRICK").model_name == "a4ps-brick:v2"
        assert rec.of("model.swapped")[-1].payload["new"] == "a4ps-brick:v2"
        # the judge's answers came from both models through Ollama
        judged = good.comparison["judge_samples"][0]
        assert judged["current_answer"].startswith("smollm2:135m")
        assert judged["new_answer"].startswith("a4ps-brick:v2")
        # and the persona talks through the new tag
        assert protos.get("BRICK").invoke_llm("hi").startswith("a4ps-brick:v2")


def test_swap_is_atomic_for_running_tasks(scripted_parts):
    """A call already running keeps the model it started with; the next uses the new."""
    settings, bus, protos, models = scripted_parts
    backend = models.backend
    backend.latency_s = 0.3
    backend.models = None
    brick = protos.get("BRICK")
    t = threading.Thread(target=lambda: brick.invoke_llm("slow question"))
    t.start()
    import time
    time.sleep(0.1)
    protos.update("BRICK", {"model_name": "smollm2-135m+lora:/tmp/x"})   # what the swap does
    t.join()
    brick.invoke_llm("next question")
    assert [c[0] for c in backend.calls][-2:] == ["smollm2-135m", "smollm2-135m+lora:/tmp/x"]
