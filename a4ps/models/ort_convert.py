"""Build the ONNX Runtime GenAI model (int4 or int8 weights) from the dequantized
checkpoint, optionally with a LoRA adapter merged in.

The build is ONNX Runtime GenAI's own model builder (``python -m
onnxruntime_genai.models.builder -p int4 -e cpu``): it knows the contrib operators
(MatMulNBits, GroupQueryAttention, fused rotary and norms) that make the model fast,
and is maintained with the runtime. It reads a Hugging Face directory through
transformers, so a merged adapter is written as one first (numpy merge, shared with
the CTranslate2 path). Output is built in a temp directory and renamed into place;
the tokenizer files are ours (the same ids on every engine). The builder runs in a
child (:func:`run_builder`) that hides scikit-learn and scipy, which transformers
would import for nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from a4ps.models.ct2_convert import Progress, _report, merge_lora
from a4ps.models.errors import ModelLoadError

COMPLETE = ".a4ps-complete"
PRECISIONS = ("int4", "int8", "fp32")
_OURS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def convert_llama(hf_dir: Path, out_dir: Path, *, precision: str = "int4",
                  adapter: Path | None = None, progress: Progress | None = None) -> Path:
    """Build ``out_dir`` (an ONNX Runtime GenAI model, ``precision`` int4 or int8
    weights in blocks of 32, or fp32: the checkpoint's own numbers) from ``hf_dir``;
    atomic."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"onnx precision {precision!r}: use int4, int8 or fp32")
    t0 = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        src = hf_dir
        if adapter is not None:
            _report(progress, 0.05, "merging the LoRA adapter")
            src = tmp / "merged"
            _write_merged(hf_dir, adapter, src)
        _report(progress, 0.15, f"building the {precision} ONNX model")
        model = tmp / "model"
        root = str(Path(__file__).resolve().parent.parent.parent)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                              if p))
        r = subprocess.run([sys.executable, "-c", _RUN_BUILDER,
                            *builder_args(src, model, precision, tmp / "builder-cache")],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0 or not (model / "genai_config.json").is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise ModelLoadError(f"the ONNX Runtime GenAI model builder failed on {src}: "
                                 f"{' | '.join(tail)}; set models.embedded.engine = "
                                 f"\"ctranslate2\" to run without it")
        _report(progress, 0.9, "writing")
        for name in _OURS:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, model / name)
        (model / COMPLETE).write_text(json.dumps({
            "from": str(hf_dir), "adapter": str(adapter) if adapter else None,
            "precision": precision, "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(model, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(progress, 1.0, "converted")
    return out_dir


_RUN_BUILDER = "import sys; from a4ps.models.ort_convert import run_builder; run_builder(sys.argv[1:])"


def builder_args(src: Path, out: Path, precision: str, cache: Path) -> list[str]:
    """The model builder's command line for ``precision``."""
    return ["-i", str(src), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache)]


# transformers imports these only because they are installed (scikit-learn for
# assisted decoding, scipy for object-detection losses), neither of which the builder
# runs; each costs about what importing torch does (measured: ~10-17 s apiece on two
# busy cores), so the builder child sees them as absent
_UNUSED = ("sklearn", "scipy")


def run_builder(argv: list[str]) -> None:
    """ONNX Runtime GenAI's model builder CLI, in this (child) process, without the
    packages it never uses (:data:`_UNUSED`)."""
    import runpy
    for unused in _UNUSED:
        sys.modules.setdefault(unused, None)  # type: ignore[arg-type]  # find_spec -> None
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


def _write_merged(hf_dir: Path, adapter: Path, out: Path) -> None:
    """``hf_dir`` with the adapter folded into its weights, as a Hugging Face directory."""
    from safetensors.numpy import load_file, save_file
    out.mkdir(parents=True)
    w: dict[str, Any] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        w.update(load_file(str(f)))
    merge_lora(w, adapter)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in hf_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)


def main(argv: list[str] | None = None) -> int:
    """``python -m a4ps.models.ort_convert HF_DIR OUT_DIR [--adapter DIR]``: progress as
    JSON lines on stdout (the embedded backend runs this as a child process)."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--precision", default="int4", choices=PRECISIONS)
    args = ap.parse_args(argv)

    def progress(f: float, stage: str) -> None:
        print(json.dumps({"progress": round(f, 3), "stage": stage}), flush=True)
    try:
        convert_llama(args.hf_dir, args.out_dir, precision=args.precision,
                      adapter=args.adapter, progress=progress)
    except ModelLoadError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
