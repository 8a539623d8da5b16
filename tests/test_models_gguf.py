"""The numpy GGUF reader: the shipped SmolLM2 GGUF into Hugging Face tensors, tokenizer
and config without transformers, equal to what transformers' GGUF path produces."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from a4ps.models.gguf_import import (UnsupportedGGUF, _hf_name, _llama_config,
                                     _tokenizer_files, _unpermute, llama_checkpoint, read_gguf)

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["Hello world!", "In 2024 I had 35 apples.", "What's 2+2? I'll say 4.",
         "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
         "  leading  spaces\n\n\ttabs", "naïve café 日本語 🙂", "def f(x):\n    return x**2  # sq",
         "<repo_name>a4ps<file_sep>README.md"]


@pytest.fixture(scope="module")
def gguf_file():
    from a4ps.config import load_settings
    from a4ps.models.embedded import gguf_path
    return gguf_path(load_settings())


@pytest.fixture(scope="module")
def checkpoint(gguf_file):
    return llama_checkpoint(gguf_file)


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (the forward direction)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_rotary_permutation():
    rng = np.random.default_rng(0)
    for heads in (9, 3):
        w = rng.standard_normal((heads * 64, 576)).astype(np.float32)
        assert np.array_equal(_unpermute(_permute(w, heads), heads), w)
        assert not np.array_equal(_permute(w, heads), w)


def test_names_map_to_hugging_face_llama():
    assert _hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert _hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert _hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert _hf_name("blk.0.attn_q.bias") is None


def test_reads_the_shipped_gguf_header_quickly(gguf_file):
    import time
    t0 = time.perf_counter()
    f = read_gguf(gguf_file)
    took = time.perf_counter() - t0
    assert f.metadata["general.architecture"] == "llama"
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(f.tensors) == 272 and f.tensors["blk.0.attn_q.weight"].shape == (576, 576)
    assert took < 5, f"header parse took {took:.1f}s (gguf.GGUFReader takes ~10 s)"


def test_rejects_what_it_does_not_convert(tmp_path, gguf_file):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(Exception, match="not a GGUF"):
        read_gguf(bad)
    f = read_gguf(gguf_file)
    f.metadata["general.architecture"] = "gemma"
    with pytest.raises(UnsupportedGGUF, match="Llama models only"):
        llama_checkpoint(f)


def test_tokenizer_and_config_from_the_gguf(gguf_file):
    from tokenizers import Tokenizer
    f = read_gguf(gguf_file)
    files = _tokenizer_files(f)
    tok = Tokenizer.from_str(files["tokenizer.json"])
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2                  # special tokens stay whole
    assert tok.decode(tok.encode("naïve café 🙂", add_special_tokens=False).ids) == "naïve café 🙂"
    assert [tok.id_to_token(i) for i in tok.encode("2024", add_special_tokens=False).ids] \
        == ["2", "0", "2", "4"]
    cfg = _llama_config(f)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]) \
        == (9, 3, 30)
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 100000.0
    assert "{% for message in messages %}" in files["chat_template.jinja"]
    assert json.loads(files["tokenizer_config.json"])["eos_token"] == "<|im_end|>"


# --------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def transformers_reference(gguf_file):
    """transformers' own GGUF path (what ensure_base_checkpoint used before): the
    reference the numpy reader must equal."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name,
        quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    return tok, model.eval()


@pytest.mark.slow
def test_weights_are_bit_identical_to_transformers_dequantization(checkpoint,
                                                                  transformers_reference):
    _, model = transformers_reference
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ref.pop("lm_head.weight", None)                        # tied to the embeddings
    assert set(ref) == set(checkpoint.weights)
    for name, w in checkpoint.weights.items():
        assert w.dtype == np.float32 and np.array_equal(w, ref[name]), name


@pytest.mark.slow
def test_tokenizer_encodes_and_decodes_like_transformers(checkpoint, transformers_reference):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(checkpoint.files["tokenizer.json"])
    ref = transformers_reference[0]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


@pytest.mark.slow
def test_cold_conversion_without_transformers_answers_like_transformers(
        tmp_path, transformers_reference):
    """The whole first run (GGUF -> float32 CTranslate2, then the HF checkpoint the
    fine-tuner reads) in a process where transformers and torch cannot be imported;
    its greedy answer equals transformers' on the model it dequantized itself."""
    import torch
    blocker = tmp_path / "blocked"
    for mod in ("transformers", "torch"):
        (blocker / mod).mkdir(parents=True)
        (blocker / mod / "__init__.py").write_text(
            f"raise ImportError('{mod} is blocked: the cold path must not need it')\n")
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from a4ps.config import load_settings
        from a4ps.models.ct2_engine import CT2Engine
        from a4ps.models.embedded import ensure_base_checkpoint, ensure_ct2_model
        from a4ps.models.engine import Sampling
        from a4ps.models.tokens import ChatTokenizer
        s = load_settings(data_dir=Path({str(tmp_path / 'data')!r}))
        s.models.embedded.cache_dir = Path({str(cache)!r})
        s.models.embedded.compute_type = "float32"
        stages = []
        d = ensure_ct2_model(s, progress=lambda f, st: stages.append(st))
        tok = ChatTokenizer(d)
        ids = tok.chat_ids([{{"role": "user", "content": "Name three colours."}}])
        out = list(CT2Engine(d, tok, compute_type="float32").stream(
            ids, max_new=16, sampling=Sampling()))
        hf = ensure_base_checkpoint(s)
        print(json.dumps({{"ids": ids, "out": out, "stages": stages, "hf": str(hf),
                          "blocked": "transformers" not in sys.modules or
                                     sys.modules["transformers"] is None}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(ROOT)]))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert any("dequantizing" in s for s in res["stages"]), res["stages"]
    hf = Path(res["hf"])
    assert (hf / "model.safetensors").is_file() and (hf / "tokenizer.json").is_file()

    _, model = transformers_reference
    with torch.inference_mode():
        want = model.generate(torch.tensor([res["ids"]]), max_new_tokens=16, do_sample=False)
    want = want[0, len(res["ids"]):].tolist()
    got = res["out"]
    # the engine stops at the end of turn; compare up to it
    assert got == want[:len(got)] and len(got) >= 4, (got, want)

    # the fine-tuner's stack loads the numpy-built checkpoint and tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t = AutoTokenizer.from_pretrained(str(hf))
    ids = t.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                add_generation_prompt=True)
    assert list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys")
                else ids) == res["ids"]
    m = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    with torch.inference_mode():
        again = m.generate(torch.tensor([res["ids"]]), max_new_tokens=16, do_sample=False)
    assert again[0, len(res["ids"]):].tolist() == want


# the decoder transformers writes for the same vocabulary (caches made before the
# numpy reader hold it)
_HF_DECODER = {"type": "Sequence", "decoders": [
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}


@pytest.mark.parametrize("decoder", ["ours", "transformers'"])
def test_text_stream_decodes_incrementally_exactly_like_a_full_decode(tmp_path, gguf_file, decoder):
    """The shared loop decodes only the ids after the last settled token boundary; on
    SmolLM2's byte-level tokenizer (ours from the GGUF, and the one transformers wrote)
    every delta and the final text equal decoding all ids each time, also where a
    token splits a multi-byte character and where a stop string straddles tokens."""
    from a4ps.models.tokens import ChatTokenizer, TextStream
    for name, text in _tokenizer_files(read_gguf(gguf_file)).items():
        if name == "tokenizer.json" and decoder != "ours":
            text = json.dumps(dict(json.loads(text), decoder=_HF_DECODER))
        (tmp_path / name).write_text(text)
    model_dir = tmp_path
    tok = ChatTokenizer(model_dir)
    assert tok.concatenates_decodes
    long = " ".join(TEXTS * 2) + " 🙂🙂 日本語の文章です。" * 2
    for text in TEXTS + [long]:
        ids = tok.encode(text)
        for stop in ((), ("2+2", "日本", "\n\n")):
            runs = []
            for incremental in (True, False):
                deltas: list[str] = []
                ts = TextStream(tok, stop, deltas.append)
                ts._incremental = incremental
                for i in ids:
                    ts.push(i)
                    if ts.stopped:
                        break
                ts.end()
                runs.append((deltas, ts.text, ts.stopped))
            assert runs[0] == runs[1], (text, stop)
            assert "".join(runs[0][0]) == runs[0][1]


def test_decoders_that_rewrite_across_pieces_decode_in_full(tmp_path):
    from tokenizers import Tokenizer, decoders, models
    from a4ps.models.tokens import ChatTokenizer
    t = Tokenizer(models.WordLevel({"<unk>": 0, "▁a": 1}, unk_token="<unk>"))
    t.decoder = decoders.Metaspace()           # strips the first piece's leading space
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert not ChatTokenizer(tmp_path).concatenates_decodes
