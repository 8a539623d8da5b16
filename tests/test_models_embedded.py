"""The real embedded backend (SmolLM2-135M on CTranslate2, the default engine, and on
the transformers fallback), shared per session."""
from __future__ import annotations

import pytest

from a4ps.events import EventRecorder
from a4ps.models.embedded import (BASE_ID, EmbeddedBackend, adapter_model_id,
                                  checkpoint_dir, ct2_dir, ensure_base_checkpoint,
                                  parse_model_id, stage_adapter)
from a4ps.models.errors import InvalidRequest, ModelNotFound

pytestmark = pytest.mark.slow


def test_answers_a_factual_question_and_streams(embedded_models):
    pieces: list[str] = []
    reply = embedded_models.chat(BASE_ID, [
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=24, on_token=pieces.append)
    assert "Paris" in reply
    assert len(pieces) >= 3 and "".join(pieces).strip() == reply
    s = embedded_models.stats()
    assert s["resident"] == BASE_ID and s["tokens"] > 0 and s["tokens_per_s"] > 0
    assert s["last_ttft_s"] is not None and s["last_ttft_s"] > 0


def test_stop_strings_and_max_tokens(embedded_models):
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    reply = embedded_models.chat(BASE_ID, msgs, max_tokens=20, stop=["5"])
    assert "5" not in reply and "4" in reply
    before = embedded_models.stats()["tokens"]
    embedded_models.chat(BASE_ID, msgs, max_tokens=3)
    assert embedded_models.stats()["tokens"] - before <= 3


def test_cache_is_reused(embedded_models):
    s = embedded_models.settings
    d = ensure_base_checkpoint(s)
    assert d == checkpoint_dir(s) and (d / "model.safetensors").is_file()
    assert (d / "tokenizer.json").is_file() and (d / "config.json").is_file()
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(str(d)).model_type == "llama"


@pytest.fixture(scope="module")
def random_adapter(embedded_models, tmp_path_factory):
    """A tiny LoRA adapter with random (non-zero) weights, saved like the fine-tuner does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        str(ensure_base_checkpoint(embedded_models.settings)), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    out = tmp_path_factory.mktemp("adapter") / "brick" / "v1"
    peft_model.save_pretrained(str(out))
    del peft_model, base
    return out


def _manager(embedded_models, tmp_path_factory, **embedded):
    from a4ps.events import EventBus
    from a4ps.models.manager import ModelManager
    s = embedded_models.settings.model_copy(deep=True)
    s.models = s.models.model_copy(update={"embedded": s.models.embedded.model_copy(
        update=embedded)})
    return ModelManager(s, EventBus(), backend=EmbeddedBackend(s))


@pytest.fixture(scope="module")
def torch_models(embedded_models, tmp_path_factory):
    """The transformers fallback engine on the same cache."""
    mm = _manager(embedded_models, tmp_path_factory, engine="transformers")
    yield mm
    mm.release()


def test_default_engine_is_ctranslate2_converted_once(embedded_models):
    """(Load and conversion times are measured in bench/bench_models.py.)"""
    mm = embedded_models
    mm.load(BASE_ID)
    assert mm.backend.engine.name == "ctranslate2" and mm.backend.threads >= 1
    d = ct2_dir(mm.settings)
    assert (d / "model.bin").is_file() and (d / "tokenizer.json").is_file()
    built = (d / ".a4ps-complete").stat().st_mtime
    mm.release()
    rec = EventRecorder(mm.bus)
    mm.load(BASE_ID)
    stages = [e.payload.get("stage") for e in rec.of("model.loading")]
    assert not any("convert" in (s or "") for s in stages), stages
    assert (d / ".a4ps-complete").stat().st_mtime == built


def test_fallback_engine_answers_streams_and_decides(torch_models):
    pieces: list[str] = []
    reply = torch_models.chat(BASE_ID, "What is the capital of France? Answer in one sentence.",
                              max_tokens=24, on_token=pieces.append)
    assert "Paris" in reply and "".join(pieces).strip() == reply
    assert torch_models.backend.engine.name == "transformers"
    c = torch_models.choose(BASE_ID, "Answer yes or no. Is Paris in France?", ["yes", "no"])
    assert c.value in ("yes", "no")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sure": {"type": "boolean"}}}
    out = torch_models.structured(BASE_ID, "Which city is the capital of France?", schema)
    assert set(out) == {"city", "sure"} and len(out["city"]) <= 20


@pytest.fixture(scope="module")
def ct2_float32(embedded_models, tmp_path_factory):
    """CTranslate2 without quantization: the same numbers as transformers float32."""
    mm = _manager(embedded_models, tmp_path_factory, compute_type="float32")
    yield mm
    mm.release()


def test_both_engines_agree_greedily_on_the_base(ct2_float32, torch_models):
    """The converter is exact: float32 CTranslate2 and transformers answer alike. (int8,
    the default, is another rounding of the Q4_1 weights and may part from them.)"""
    msgs = [{"role": "user", "content": "Name three colours."}]
    a = ct2_float32.generate(BASE_ID, msgs, max_tokens=12)
    b = torch_models.generate(BASE_ID, msgs, max_tokens=12)
    assert a.text == b.text


# tasks from config/suite where the engines parted before they counted the same tokens
_PERSONA_TASKS = ("What is the chemical symbol for water?", "Which ocean is the largest?",
                  "What is the opposite of hot?")


def test_persona_settings_mean_the_same_on_both_engines(ct2_float32, torch_models):
    """ALFRED's seeded settings (repetition_penalty 1.15, no_repeat_ngram_size 4) count
    the generated tokens only, on transformers as on CTranslate2: same weights, same
    answer. (transformers' own processors count the prompt too; with them these answers
    rambled: "The largest of the seven seas that make up our planet Earth...")"""
    from a4ps.codex import Codex
    from a4ps.cognition import generation
    from a4ps.config import CODEX_PATH
    system = Codex.from_toml(CODEX_PATH).system_prompt("ALFRED")
    gen = generation.defaults_for("ALFRED")
    assert gen["repetition_penalty"] > 1 and gen["no_repeat_ngram_size"] > 0
    for task in _PERSONA_TASKS:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": task}]
        a = ct2_float32.generate(BASE_ID, msgs, **gen)
        b = torch_models.generate(BASE_ID, msgs, **gen)
        assert (a.text, a.tokens) == (b.text, b.tokens), task


def test_lora_persona_on_ctranslate2_equals_transformers_plus_peft(
        embedded_models, ct2_float32, torch_models, random_adapter):
    """The adapter is merged and converted once (staged like the fine-tuner does);
    the persona's greedy answer equals transformers+PEFT's exactly (float32; int8 is
    another rounding, checked only to differ from the base), and switching back to
    the base (a rollback) answers as the base again."""
    tuned = adapter_model_id(random_adapter)
    msgs = [{"role": "user", "content": "Name three colours."}]
    want = torch_models.generate(tuned, msgs, max_tokens=16).text
    assert want != torch_models.generate(BASE_ID, msgs, max_tokens=16).text
    stage_adapter(ct2_float32.settings, random_adapter)          # the fine-tuner's hook
    assert (ct2_dir(ct2_float32.settings, random_adapter) / "model.bin").is_file()
    rec = EventRecorder(ct2_float32.bus)
    assert ct2_float32.generate(tuned, msgs, max_tokens=16).text == want
    stages = [e.payload.get("stage") or "" for e in rec.of("model.loading")]
    assert not any("convert" in s for s in stages), stages   # no conversion at the turn
    base = ct2_float32.generate(BASE_ID, msgs, max_tokens=16).text
    assert base == torch_models.generate(BASE_ID, msgs, max_tokens=16).text
    int8_tuned = embedded_models.generate(tuned, msgs, max_tokens=16).text
    assert int8_tuned != embedded_models.generate(BASE_ID, msgs, max_tokens=16).text


def test_adapter_changes_output_and_unload_restores_it(torch_models, random_adapter):
    mm = torch_models
    rec = EventRecorder(mm.bus)
    msgs = [{"role": "user", "content": "Name three colours."}]
    base_reply = mm.chat(BASE_ID, msgs, max_tokens=6)
    loads0, unloads0 = mm.stats()["loads"], mm.stats()["unloads"]
    tuned = adapter_model_id(random_adapter)
    tuned_reply = mm.chat(tuned, msgs, max_tokens=6)
    assert tuned_reply != base_reply
    assert mm.resident() == tuned
    loaded = rec.wait_for("model.loaded", where=lambda e: e.payload["model"] == tuned)
    assert loaded.payload["reused_base"] is True        # base weights stayed resident
    assert rec.of("model.unloaded")[0].payload["model"] == BASE_ID
    assert mm.chat(BASE_ID, msgs, max_tokens=6) == base_reply
    s = mm.stats()
    assert s["loads"] - loads0 == 2 and s["unloads"] - unloads0 == 2
    assert s["loads"] - s["unloads"] == 1
    # release drops everything; the next call reloads the base from the cache
    mm.release()
    assert mm.resident() is None
    assert mm.chat(BASE_ID, msgs, max_tokens=6) == base_reply


def test_bad_model_ids_fail_clearly(embedded_models, tmp_path):
    assert isinstance(embedded_models.backend, EmbeddedBackend)
    with pytest.raises(ModelNotFound, match='models.backend = "ollama"'):
        embedded_models.chat("llama3:8b", "hi")
    with pytest.raises(ModelNotFound, match="no PEFT adapter"):
        embedded_models.chat(adapter_model_id(tmp_path), "hi", max_tokens=2)
    with pytest.raises(InvalidRequest, match="absolute"):
        parse_model_id(BASE_ID + "+lora:relative/dir")
    # the manager still works after the failures
    assert embedded_models.chat(BASE_ID, "Say hi.", max_tokens=4)


def test_embed_through_manager(embedded_models):
    v = embedded_models.embed(["The cat sleeps.", "A kitten is napping.", "Stock prices fell."])
    assert v.shape == (3, 384) and embedded_models.embedding_dim == 384
    assert v[0] @ v[1] > v[0] @ v[2]
