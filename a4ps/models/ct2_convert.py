"""Write a CTranslate2 model from the shipped GGUF (or the dequantized Llama
checkpoint), optionally with a LoRA adapter merged in, with numpy only.

CTranslate2's own converter goes through transformers and torch (importing them
alone takes most of the 20 s budget on 2 cores). A Llama decoder is a dozen tensors
per layer, so we fill the spec straight from the GGUF's dequantized tensors
(:mod:`a4ps.models.gguf_import`) or from a safetensors file. A LoRA adapter
(PEFT format, what a4ps.fine_tuning writes) is merged as ``W + scale * B @ A`` per
targeted linear layer before int8 quantization: CTranslate2 has no run-time LoRA, so
a fine-tuned persona is a model of its own.

Everything is written into a temp directory and renamed into place, so a reader never
sees half a model; a file lock keeps two processes from converting the same thing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from a4ps.models.errors import ModelLoadError
from a4ps.models.gguf_import import UnsupportedGGUF, llama_checkpoint

if TYPE_CHECKING:
    import numpy as np

Progress = Callable[[float, str], None]
COMPLETE = ".a4ps-complete"
FORMAT = "1"     # bump when the conversion changes, so old caches are rebuilt


def adapter_digest(adapter: Path) -> str:
    """Content hash of an adapter (config + weights): the cache key of its merged model."""
    h = hashlib.sha256(FORMAT.encode())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        p = adapter / name
        if not p.is_file():
            raise ModelLoadError(f"no {name} in {adapter}; is it a PEFT LoRA adapter directory?")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def convert_llama(source: Path, out_dir: Path, *, quantization: str = "int8",
                  adapter: Path | None = None, progress: Progress | None = None) -> Path:
    """Build ``out_dir`` (a CTranslate2 model) from ``source``: the GGUF itself (read
    with numpy, see :mod:`a4ps.models.gguf_import`) or a Hugging Face directory of
    safetensors (the dequantized checkpoint); atomic; returns ``out_dir``."""
    import numpy as np
    from ctranslate2.specs import common_spec, transformer_spec

    t0 = time.perf_counter()
    source = Path(source)
    _report(progress, 0.05, "reading weights")
    cfg, w, tokens, files = _read_source(source, progress)
    if cfg.get("model_type") != "llama":
        raise ModelLoadError(f"{source} holds a {cfg.get('model_type')!r} model; the "
                             f"CTranslate2 engine converts Llama-family models only: set "
                             f"models.embedded.engine = \"transformers\"")
    if adapter is not None:
        _report(progress, 0.4, "merging the LoRA adapter")
        merge_lora(w, adapter)

    _report(progress, 0.45, "building the model")
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelLoadError(f"RoPE scaling {rope!r} is not handled by the numpy converter; "
                             f"set models.embedded.engine = \"transformers\"")
    theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        int(cfg["num_hidden_layers"]), heads, activation=common_spec.Activation.SWISH,
        pre_norm=True, ffn_glu=True, rms_norm=True, rotary_dim=0, rotary_interleave=False,
        rotary_base=theta, num_heads_kv=None if kv == heads else kv)
    dec = spec.decoder
    dec.scale_embeddings = False

    def t(name: str) -> np.ndarray:
        try:
            return np.ascontiguousarray(w[name], dtype=np.float32)
        except KeyError:
            raise ModelLoadError(f"{source}: tensor {name} missing; delete the directory "
                                 f"and it will be rebuilt from the GGUF") from None

    dec.embeddings.weight = t("model.embed_tokens.weight")
    dec.layer_norm.gamma = t("model.norm.weight")
    for i, layer in enumerate(dec.layer):
        p = f"model.layers.{i}."
        layer.self_attention.layer_norm.gamma = t(p + "input_layernorm.weight")
        layer.ffn.layer_norm.gamma = t(p + "post_attention_layernorm.weight")
        layer.self_attention.linear[0].weight = np.concatenate(
            [t(p + f"self_attn.{x}_proj.weight") for x in "qkv"], axis=0)
        layer.self_attention.linear[1].weight = t(p + "self_attn.o_proj.weight")
        layer.ffn.linear_0.weight = t(p + "mlp.gate_proj.weight")
        layer.ffn.linear_0_noact.weight = t(p + "mlp.up_proj.weight")
        layer.ffn.linear_1.weight = t(p + "mlp.down_proj.weight")
    dec.projection.weight = t("lm_head.weight") if "lm_head.weight" in w \
        else dec.embeddings.weight

    vocab = {t_: i for i, t_ in enumerate(tokens)}
    tokens = tokens + [f"<extra_id_{i}>" for i in range(int(cfg["vocab_size"]) - len(tokens))]
    spec.register_vocabulary(tokens[: int(cfg["vocab_size"])])
    spec.config.bos_token = "<|im_start|>" if "<|im_start|>" in vocab else tokens[1]
    spec.config.eos_token = "<|im_end|>" if "<|im_end|>" in vocab else tokens[2]
    spec.config.unk_token = tokens[0]
    spec.config.layer_norm_epsilon = float(cfg.get("rms_norm_eps", 1e-5))

    _report(progress, 0.55, f"quantizing ({quantization})")
    spec.validate()
    spec.optimize(quantization=quantization)
    _report(progress, 0.8, "writing")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    spec.save(str(tmp))
    for name, text in files.items():      # what ChatTokenizer reads beside the model
        (tmp / name).write_text(text)
    (tmp / "hf_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / COMPLETE).write_text(json.dumps({
        "from": str(source), "adapter": str(adapter) if adapter else None,
        "quantization": quantization, "seconds": round(time.perf_counter() - t0, 2),
        "format": FORMAT}) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    _report(progress, 1.0, "converted")
    return out_dir


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _read_source(source: Path, progress: Progress | None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str], dict[str, str]]:
    """(HF config, HF-named float32 weights, vocabulary by id, tokenizer files)."""
    if source.is_file():
        ck = llama_checkpoint(source, lambda f, s: _report(progress, 0.05 + 0.35 * f, s))
        files = {k: v for k, v in ck.files.items() if k in _TOKENIZER_FILES}
        return ck.config, ck.weights, ck.tokens, files
    from safetensors.numpy import load_file
    cfg = json.loads((source / "config.json").read_text())
    w: dict[str, np.ndarray] = {}
    for f in sorted(source.glob("*.safetensors")):
        w.update(load_file(str(f)))
    files = {n: (source / n).read_text() for n in _TOKENIZER_FILES if (source / n).is_file()}
    tok = json.loads(files["tokenizer.json"])
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return cfg, w, tokens, files


def merge_lora(weights: dict[str, np.ndarray], adapter: Path) -> None:
    """Fold a PEFT LoRA adapter into ``weights`` (name -> float32 array) in place."""
    import numpy as np
    from safetensors.numpy import load_file
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise ModelLoadError(f"{adapter}: only plain LoRA adapters can be merged for the "
                             f"CTranslate2 engine; set models.embedded.engine = \"transformers\"")
    if cfg.get("fan_in_fan_out") or cfg.get("rank_pattern") or cfg.get("alpha_pattern") \
            or cfg.get("modules_to_save"):
        raise ModelLoadError(f"{adapter}: fan_in_fan_out / rank_pattern / alpha_pattern / "
                             f"modules_to_save are not merged by this converter; set "
                             f"models.embedded.engine = \"transformers\"")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    merged = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora.get(key.replace(".lora_A.", ".lora_B."))
        target = key.split(".lora_A.")[0]
        for prefix in ("base_model.model.", "base_model."):
            if target.startswith(prefix):
                target = target[len(prefix):]
                break
        name = target + ".weight"
        if b is None or name not in weights:
            raise ModelLoadError(f"{adapter}: cannot place LoRA tensor {key} on the base")
        base = np.asarray(weights[name], dtype=np.float32)
        weights[name] = base + scale * (b.astype(np.float32) @ a.astype(np.float32))
        merged += 1
    if not merged:
        raise ModelLoadError(f"{adapter}: no LoRA weights found in adapter_model.safetensors")


def _report(progress: Progress | None, fraction: float, stage: str) -> None:
    if progress is not None:
        try:
            progress(fraction, stage)
        except Exception:        # a broken progress callback must not break a conversion
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m a4ps.models.ct2_convert SOURCE OUT_DIR [--adapter DIR]`` (SOURCE: the
    GGUF or a Hugging Face directory): progress as JSON lines on stdout (the embedded
    backend runs this as a child process)."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("source", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--quantization", default="int8")
    args = ap.parse_args(argv)
    # CTranslate2's spec module imports torch only to accept torch tensors; we hand it
    # numpy arrays, and importing torch would cost seconds of the conversion budget.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]

    def progress(f: float, stage: str) -> None:
        print(json.dumps({"progress": round(f, 3), "stage": stage}), flush=True)
    try:
        convert_llama(args.source, args.out_dir, quantization=args.quantization,
                      adapter=args.adapter, progress=progress)
    except UnsupportedGGUF as e:
        print(str(e), file=sys.stderr)
        return 3            # the caller dequantizes with transformers and converts that
    except ModelLoadError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
