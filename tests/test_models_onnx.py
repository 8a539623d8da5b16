"""The ONNX Runtime GenAI engine (``models.embedded.engine = "onnxruntime"``): built once
by ORT GenAI's model builder, conforming to the TokenEngine seam (stream, score), so
streaming, stop strings, cancel, decisions and LoRA personas work as on CTranslate2."""
from __future__ import annotations

import threading

import pytest

from a4ps.events import EventRecorder
from a4ps.models.embedded import BASE_ID, EmbeddedBackend, adapter_model_id, ort_dir, stage_adapter
from a4ps.models.engine import Sampling, TokenEngine


def test_onnx_engine_is_a_setting_with_its_own_cache_per_precision(tmp_path):
    from a4ps.config import load_settings
    s = load_settings(data_dir=tmp_path)
    s.models.embedded.engine = "onnxruntime"
    int4 = ort_dir(s)
    s.models.embedded.onnx_precision = "int8"
    assert ort_dir(s) != int4 and ort_dir(s).name.endswith("-int8")
    assert EmbeddedBackend(s).estimate_bytes(BASE_ID) > 0


def test_converter_rejects_an_unknown_precision(tmp_path):
    from a4ps.models.errors import ModelLoadError
    from a4ps.models.ort_convert import convert_llama
    with pytest.raises(ModelLoadError, match="int4, int8 or fp32"):
        convert_llama(tmp_path, tmp_path / "out", precision="fp8")


def test_missing_optional_package_says_how_to_install_it(tmp_path, monkeypatch):
    """The engine is opt-in and its wheels are optional (requirements-onnx.txt): without
    them, choosing it fails at once with what to do, before any ~20 s build."""
    import sys
    from a4ps.config import load_settings
    from a4ps.models.embedded import ensure_ort_model
    from a4ps.models.errors import ModelLoadError
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)   # import now raises
    s = load_settings(data_dir=tmp_path)
    s.models.embedded.engine = "onnxruntime"
    with pytest.raises(ModelLoadError, match="requirements-onnx.txt.*ctranslate2"):
        ensure_ort_model(s)
    assert not ort_dir(s).exists()
    with pytest.raises(ModelLoadError, match="requirements-onnx.txt"):
        EmbeddedBackend(s).load(BASE_ID)


# --------------------------------------------------------------------------- real model

def _manager(embedded_models, **embedded):
    from a4ps.events import EventBus
    from a4ps.models.manager import ModelManager
    s = embedded_models.settings.model_copy(deep=True)
    s.models = s.models.model_copy(update={"embedded": s.models.embedded.model_copy(
        update=embedded)})
    return ModelManager(s, EventBus(), backend=EmbeddedBackend(s))


@pytest.fixture(scope="module")
def ort_models(embedded_models):
    # optional engine: its wheels come from requirements-onnx.txt, not requirements.txt
    pytest.importorskip("onnxruntime_genai", reason="optional: pip install -r requirements-onnx.txt")
    mm = _manager(embedded_models, engine="onnxruntime")
    yield mm
    mm.release()


@pytest.mark.slow
def test_answers_streams_and_stops(ort_models):
    pieces: list[str] = []
    reply = ort_models.chat(BASE_ID, "What is the capital of France? Answer in one sentence.",
                            max_tokens=24, on_token=pieces.append)
    assert "Paris" in reply and len(pieces) >= 3 and "".join(pieces).strip() == reply
    assert ort_models.backend.engine.name == "onnxruntime"
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    assert "5" not in ort_models.chat(BASE_ID, msgs, max_tokens=20, stop=["5"])


@pytest.mark.slow
def test_cancel_stops_within_a_token(ort_models):
    cancel = threading.Event()
    seen: list[str] = []

    def on_token(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            cancel.set()
    from a4ps.models.errors import GenerationCancelled
    with pytest.raises(GenerationCancelled):
        ort_models.generate(BASE_ID, "Write a long story about the sea.", max_tokens=100,
                            on_token=on_token, cancel=cancel)
    assert 3 <= len(seen) <= 4


@pytest.mark.slow
def test_score_agrees_with_greedy_stream(ort_models):
    """What the engine generates greedily scores higher than any other last token,
    and scoring a shared stem once gives the same numbers as scoring it alone."""
    ort_models.load(BASE_ID)
    engine: TokenEngine = ort_models.backend.engine
    tok = ort_models.backend.tok
    prefix = tok.chat_ids([{"role": "user", "content": "Name three colours."}])
    greedy = []
    for t in engine.stream(prefix, max_new=4, sampling=Sampling()):
        greedy.append(t)
    others = [greedy[:-1] + [t] for t in (13, 30, 216) if t != greedy[-1]]
    scores = engine.score(prefix, [greedy] + others)
    assert all(sum(scores[0]) > sum(s) for s in scores[1:])
    alone = engine.score(prefix, [greedy])[0]
    assert alone == pytest.approx(scores[0], abs=1e-3)


@pytest.mark.slow
def test_decisions_parse_and_validate(ort_models):
    c = ort_models.choose(BASE_ID, "Answer yes or no. Is Paris in France?", ["yes", "no"])
    assert c.value in ("yes", "no") and set(c.scores) == {"yes", "no"}
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sure": {"type": "boolean"}},
              "required": ["city", "sure"]}
    out = ort_models.structured(BASE_ID, "Which city is the capital of France?", schema)
    assert set(out) == {"city", "sure"} and isinstance(out["sure"], bool)


@pytest.mark.slow
def test_ngram_ban_holds_when_greedy_and_when_sampled(ort_models):
    """The ban is applied to the logits ORT then picks from (set_logits), for greedy
    turns and for sampled ones (ROBIN's temperature 0.3, top_p 0.9): no n-gram of the
    generated tokens repeats, while the prompt's own n-grams stay allowed."""
    ort_models.load(BASE_ID)
    engine: TokenEngine = ort_models.backend.engine
    ids = ort_models.backend.tok.chat_ids(
        [{"role": "user", "content": "Write a long story about the sea."}])
    for s in (Sampling(no_repeat_ngram_size=2),
              Sampling(temperature=0.3, top_p=0.9, repetition_penalty=1.15,
                       no_repeat_ngram_size=3)):
        it = engine.stream(ids, max_new=80, sampling=s)
        out = [t for _, t in zip(range(80), it)]
        it.close()
        n = s.no_repeat_ngram_size
        grams = [tuple(out[i:i + n]) for i in range(len(out) - n + 1)]
        assert len(out) >= 40 and len(grams) == len(set(grams)), s


# suite tasks where ORT GenAI's own penalty (which counts the prompt) parted from the
# reference within a few tokens: "The largest of the seven seas that make up ..."
_PERSONA_TASKS = ("What is the chemical symbol for water?", "Which ocean is the largest?",
                  "What is the opposite of hot?")


@pytest.fixture(scope="module")
def ort_fp32(embedded_models):
    pytest.importorskip("onnxruntime_genai", reason="optional: pip install -r requirements-onnx.txt")
    mm = _manager(embedded_models, engine="onnxruntime", onnx_precision="fp32")
    yield mm
    mm.release()


@pytest.mark.slow
def test_persona_answers_equal_the_float32_reference(ort_fp32, embedded_models):
    """Where ORT's text departed was not its graph but its repetition penalty / n-gram
    ban, which count the prompt: built from the same float32 numbers, ORT now gives
    CTranslate2 float32's exact tokens under ALFRED's seeded settings (and the int4/int8
    builds differ from it only by their rounding)."""
    from a4ps.codex import Codex
    from a4ps.cognition import generation
    from a4ps.config import CODEX_PATH
    ct2 = _manager(embedded_models, engine="ctranslate2", compute_type="float32")
    system = Codex.from_toml(CODEX_PATH).system_prompt("ALFRED")
    gen = generation.defaults_for("ALFRED")
    assert gen["repetition_penalty"] > 1 and gen["no_repeat_ngram_size"] > 0
    try:
        for task in _PERSONA_TASKS:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": task}]
            a = ct2.generate(BASE_ID, msgs, **gen)
            b = ort_fp32.generate(BASE_ID, msgs, **gen)
            assert (b.text, b.tokens) == (a.text, a.tokens), task
        plain = [{"role": "user", "content": "Name three colours."}]
        assert (ort_fp32.generate(BASE_ID, plain, max_tokens=24).text
                == ct2.generate(BASE_ID, plain, max_tokens=24).text)
    finally:
        ct2.release()


@pytest.fixture(scope="module")
def lora_adapter(embedded_models, tmp_path_factory):
    """A tiny LoRA adapter with random (non-zero) weights, saved like the fine-tuner does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from a4ps.models.embedded import ensure_base_checkpoint
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        str(ensure_base_checkpoint(embedded_models.settings)), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    out = tmp_path_factory.mktemp("adapter") / "robin" / "v1"
    get_peft_model(base, cfg).save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_lora_persona_is_staged_merged_and_rolled_back(ort_models, lora_adapter):
    """The fine-tuner's staging hook builds base+adapter ahead of the turn; the persona
    then answers differently from the base, and the base (a rollback) answers as before."""
    msgs = [{"role": "user", "content": "Name three colours."}]
    base = ort_models.generate(BASE_ID, msgs, max_tokens=12).text
    stage_adapter(ort_models.settings, lora_adapter)
    assert (ort_dir(ort_models.settings, lora_adapter) / "genai_config.json").is_file()
    rec = EventRecorder(ort_models.bus)
    tuned = adapter_model_id(lora_adapter)
    assert ort_models.generate(tuned, msgs, max_tokens=12).text != base
    stages = [e.payload.get("stage") or "" for e in rec.of("model.loading")]
    assert not any("build" in s or "merg" in s for s in stages), stages
    assert ort_models.generate(BASE_ID, msgs, max_tokens=12).text == base
