"""Read the shipped GGUF straight into a Hugging Face Llama checkpoint, with numpy only.

Transformers reads a GGUF through ``gguf.GGUFReader``, which parses every string of
the vocabulary (49k tokens, 49k merges) into its own numpy view: about 10 s of pure
Python on 2 cores, twice (tokenizer, then model), before any weight is touched. The
format is simple, so :func:`read_gguf` parses the header with :mod:`struct` (0.2 s)
and maps the tensors; the weights are dequantized by the ``gguf`` package's own numpy
dequantizers and renamed to the Hugging Face layout, undoing the rotary permutation
llama.cpp's converter applies to the q/k projections. The result is bit-for-bit what
``transformers`` produces with ``GgufConfig(dequantize=True)`` (tested), in a few
seconds. The tokenizer becomes a ``tokenizer.json`` for the ``tokenizers`` library
(byte-level BPE from the GGUF's vocabulary and merges), plus the chat template.

Only what the embedded default needs is handled: the ``llama`` architecture with a
``gpt2`` (byte-level BPE) tokenizer and no RoPE scaling. Anything else raises
:class:`UnsupportedGGUF`, and the caller falls back to transformers' general reader.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from a4ps.models.errors import ModelLoadError

if TYPE_CHECKING:
    import numpy as np

Progress = Callable[[float, str], None]

# GGUF metadata value types (gguf spec): scalar struct formats, 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_CONTROL, _USER_DEFINED = 3, 4          # tokenizer.ggml.token_type values

# llama.cpp tensor names (per block) -> Hugging Face Llama names
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


class UnsupportedGGUF(ModelLoadError):
    """A GGUF this numpy reader does not convert (another architecture, tokenizer, ...)."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]      # numpy order (the GGUF stores dims innermost first)
    qtype: int
    offset: int                 # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    """A parsed GGUF: its metadata and tensors (data read lazily from a memory map)."""
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    _data: Any = field(repr=False, default=None)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (uint8 rows of quantized blocks)."""
        import numpy as np
        t = self.tensors[name]
        if self._data is None:
            self._data = np.memmap(self.path, mode="r", dtype=np.uint8)
        return np.asarray(self._data[t.offset:t.offset + t.nbytes])

    def dequantized(self, name: str) -> np.ndarray:
        """The tensor as float32 in its numpy shape (``gguf.quants`` dequantizers)."""
        import numpy as np
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize
        t = self.tensors[name]
        qtype = GGMLQuantizationType(t.qtype)
        block, size = GGML_QUANT_SIZES[qtype]
        rows = self.raw(name).reshape(*t.shape[:-1], t.shape[-1] // block * size)
        try:
            out = dequantize(rows, qtype)
        except NotImplementedError as e:
            raise UnsupportedGGUF(f"{self.path.name}: tensor {name} is {qtype.name}, "
                                  f"which numpy cannot dequantize ({e})") from None
        return np.ascontiguousarray(out.reshape(t.shape), dtype=np.float32)


def read_gguf(path: Path) -> GGUFFile:
    """Parse the header, metadata and tensor table of a GGUF (version 2 or 3)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(24)
        if head[:4] != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic); reinstall the "
                                 f"model package")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version not in (2, 3):
            raise UnsupportedGGUF(f"{path.name}: GGUF version {version} is not read here")
    buf = np.memmap(path, mode="r", dtype=np.uint8)
    mv = buf.data              # a memoryview of the mapped bytes
    pos = 24

    def scalar(fmt: str) -> Any:
        nonlocal pos
        v = struct.unpack_from(fmt, mv, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = struct.unpack_from("<Q", mv, pos)[0]
        pos += 8
        s = bytes(mv[pos:pos + n]).decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            itype, count = scalar("<I"), scalar("<Q")
            if itype == _STRING:
                return [string() for _ in range(count)]
            if itype in _NUMPY:
                arr = np.frombuffer(mv, dtype=_NUMPY[itype], count=count, offset=pos).copy()
                pos += arr.nbytes
                return arr
            return [value(itype) for _ in range(count)]
        if vtype not in _SCALAR:
            raise ModelLoadError(f"{path.name}: unknown GGUF value type {vtype}; the file is "
                                 f"damaged or newer than this reader")
        return scalar(_SCALAR[vtype])

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [scalar("<Q") for _ in range(scalar("<I"))]
        infos.append((name, tuple(reversed(dims)), scalar("<I"), scalar("<Q")))
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, shape, qtype, off in infos:
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise UnsupportedGGUF(f"{path.name}: tensor {name} has unknown type {qtype}") from None
        count = 1
        for d in shape:
            count *= int(d)
        tensors[name] = GGUFTensor(name, shape, qtype, start + off, count // block * size)
    del mv
    return GGUFFile(path, meta, tensors, buf)


# --------------------------------------------------------------------------- llama

@dataclass
class LlamaCheckpoint:
    """What a Hugging Face Llama directory holds, in memory."""
    config: dict[str, Any]
    weights: dict[str, Any]              # HF name -> float32 numpy array
    tokens: list[str]                    # the vocabulary, by id
    files: dict[str, str]                # tokenizer.json, tokenizer_config.json, ... -> text

    def write(self, out_dir: Path) -> None:
        """Write safetensors + config + tokenizer into ``out_dir`` (not atomic: the
        caller writes into a temp directory and renames it)."""
        from safetensors.numpy import save_file
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(self.weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        (out_dir / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        for name, text in self.files.items():
            (out_dir / name).write_text(text)


def llama_checkpoint(gguf: Path | GGUFFile, progress: Progress | None = None) -> LlamaCheckpoint:
    """Dequantize a Llama GGUF into Hugging Face tensors, config and tokenizer files."""
    f = gguf if isinstance(gguf, GGUFFile) else read_gguf(gguf)
    m = f.metadata
    arch = m.get("general.architecture")
    if arch != "llama":
        raise UnsupportedGGUF(f"{f.path.name} is a {arch!r} model; the numpy reader converts "
                              f"Llama models only")
    scaling = m.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedGGUF(f"{f.path.name}: RoPE scaling {scaling!r} is not converted here")
    config = _llama_config(f)
    files = _tokenizer_files(f)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    weights = {}
    names = list(f.tensors)
    for i, name in enumerate(names):
        hf = _hf_name(name)
        if hf is None:
            raise UnsupportedGGUF(f"{f.path.name}: tensor {name} has no Hugging Face Llama name")
        w = f.dequantized(name)
        if name.endswith("attn_q.weight"):
            w = _unpermute(w, heads)
        elif name.endswith("attn_k.weight"):
            w = _unpermute(w, kv_heads)
        weights[hf] = w
        if progress is not None and i % 30 == 0:
            progress(i / len(names), f"dequantizing weights ({i}/{len(names)})")
    return LlamaCheckpoint(config, weights, list(m["tokenizer.ggml.tokens"]), files)


def _hf_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.weight"
    return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs adjacent rows; Hugging Face
    pairs row i with row i + head_dim/2): the inverse of ``convert_hf_to_gguf.permute``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_config(f: GGUFFile) -> dict[str, Any]:
    m = f.metadata
    a = "llama."

    def need(key: str) -> Any:
        if a + key not in m:
            raise UnsupportedGGUF(f"{f.path.name}: metadata {a + key} is missing")
        return m[a + key]
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv = int(m.get(a + "attention.head_count_kv", heads))
    vocab = int(m.get(a + "vocab_size", len(m.get("tokenizer.ggml.tokens", ()))))
    theta = float(m.get(a + "rope.freq_base", 10000.0))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": int(m.get(a + "attention.key_length", hidden // heads)),
        "hidden_act": "silu", "max_position_embeddings": int(m.get(a + "context_length", 2048)),
        "rms_norm_eps": float(m.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta, "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in f.tensors,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "dtype": "float32",
    }
    for key, hf in (("bos", "bos"), ("eos", "eos"), ("padding", "pad"), ("unknown", "unk")):
        tid = m.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None:
            cfg[f"{hf}_token_id"] = int(tid)
    return cfg


def _tokenizer_files(f: GGUFFile) -> dict[str, str]:
    """tokenizer.json (byte-level BPE), tokenizer_config.json, chat_template.jinja and
    generation_config.json, as transformers' GGUF reader would produce them."""
    m = f.metadata
    kind = m.get("tokenizer.ggml.model")
    if kind != "gpt2" or "tokenizer.ggml.merges" not in m:
        raise UnsupportedGGUF(f"{f.path.name}: tokenizer {kind!r} is not byte-level BPE")
    tokens: list[str] = list(m["tokenizer.ggml.tokens"])
    raw_types = m.get("tokenizer.ggml.token_type")
    types = list(raw_types) if raw_types is not None else []
    special = {i for i, t in enumerate(types) if int(t) in (_CONTROL, _USER_DEFINED)}
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False,
              "special": int(types[i]) == _CONTROL} for i in sorted(special)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    pre: dict[str, Any] = byte_level
    if m.get("tokenizer.ggml.pre") == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits digits one by one, as the original
        # tokenizer does (the vocabulary has no multi-digit tokens)
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [mg.split(" ", 1) for mg in m["tokenizer.ggml.merges"]]},
    }

    def tok(key: str) -> str | None:
        tid = m.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(tid)] if tid is not None and 0 <= int(tid) < len(tokens) else None
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
               "bos_token": tok("bos"), "eos_token": tok("eos"), "unk_token": tok("unknown"),
               "clean_up_tokenization_spaces": False,
               "model_max_length": int(m.get("llama.context_length", 2048))}
    gen = {k: v for k, v in (("bos_token_id", m.get("tokenizer.ggml.bos_token_id")),
                             ("eos_token_id", m.get("tokenizer.ggml.eos_token_id")),
                             ("pad_token_id", m.get("tokenizer.ggml.padding_token_id")))
           if v is not None}
    files = {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
             "tokenizer_config.json": json.dumps(
                 {k: v for k, v in tok_cfg.items() if v is not None}, indent=2) + "\n",
             "generation_config.json": json.dumps(
                 {k: int(v) for k, v in gen.items()}, indent=2) + "\n"}
    template = m.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        files["chat_template.jinja"] = template
    return files
