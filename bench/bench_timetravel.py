"""Time travel and persona files: snapshot list / diff / restore with 1,000 protos, and
export / import time and file size for a persona with 10,000 memories and an adapter.

Each time is a median, set against a peer measured in the same run: snapshots against
loading the image (what a restart would cost), export against a plain zip of the same
data, import against writing the same rows straight into LanceDB. Uses a real System
(ProtoManager, Codex, LanceDB, image files) on the scripted stand-in chat backend and the
hash stand-in embedder (384-d, like MiniLM), so no model loads.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from a4ps.config import load_settings  # noqa: E402
from a4ps.system import System  # noqa: E402

PROTOS = 1_000
MEMORIES = 10_000
# the size of a SmolLM2-135M LoRA adapter as the fine-tuner trains it (r=16 on all
# seven projections of 30 layers, float32): 4.88M parameters
ADAPTER_BYTES = 4_884_480 * 4
REPEAT = 5


def timed(fn, n=REPEAT):
    out, times = None, []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def zip_dir(src: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src.parent))


def system_on(d: Path) -> System:
    s = load_settings(data_dir=d, models={"backend": "scripted", "embedding_backend": "hash"},
                      curator={"enabled": False}, motivator={"enabled": False},
                      philosopher={"enabled": False}, image={"autosave_interval_s": 3600},
                      # no ANN index build in the background while timing (the imports
                      # add 40,000 rows): it would slow whatever runs beside it
                      memory={"index_min_rows": 10_000_000})
    return System(s).start(services=False)


def snapshots(root: Path) -> list[tuple]:
    s = system_on(root / "snap")
    try:
        for i in range(PROTOS - len(s.protos)):
            s.protos.clone("persona", f"p{i}", role=f"role {i}", last_utterance="x" * 200,
                           morph_pos=[i % 800, i // 800],
                           history=[{"round": r, "d": r / 10} for r in range(5)])
        s.save(trigger="manual")
        base = s.timemachine.snapshot("base")["id"]
        for k in range(4):                                   # a ring of real saves
            s.protos.update(f"p{k}", {"temperature": 0.1 * k})
            s.save(trigger="autosave")
        n_snaps = len(s.timemachine.list())
        list_s, _ = timed(s.timemachine.list)
        load_s, _ = timed(lambda: s.image.load())
        diff_live_s, d = timed(lambda: s.timemachine.diff(base))
        assert len(d["protos"]["changed"]) == 4
        clones = [n for n in s.protos.names() if n[0] == "p" and n[1:].isdigit()]
        for name in clones:                                   # every clone edited
            s.protos.update(name, {"temperature": 0.9})
        all_id = s.timemachine.snapshot("all-edited")["id"]
        diff_all_s, d = timed(lambda: s.timemachine.diff(base, all_id))
        assert len(d["protos"]["changed"]) == len(clones)
        save_s, _ = timed(lambda: s.save(trigger="manual"))
        targets = [base, all_id] * REPEAT
        restore_s, _ = timed(lambda: s.timemachine.restore(targets.pop()))
        assert s.protos.get("p10").temperature in (0.7, 0.9)
    finally:
        s.stop()
    return [
        (f"snapshot list ({n_snaps} snapshots, {PROTOS} protos)", list_s, "image load", load_s, None),
        ("diff snapshot vs live (4 protos edited)", diff_live_s, "image load", load_s, None),
        (f"diff snapshot vs snapshot ({len(clones)} edited)", diff_all_s, "image load", load_s,
         None),
        (f"restore ({PROTOS} protos, pre-restore + save)", restore_s, "save + load",
         save_s + load_s, None),
    ]


def personas(root: Path) -> list[tuple]:
    src = system_on(root / "src")
    dst = system_on(root / "dst")
    rng = np.random.default_rng(0)
    try:
        adapter = src.settings.adapter_dir / "BRICK" / "v1" / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text('{"r": 16, "peft_type": "LORA"}')
        (adapter / "adapter_model.safetensors").write_bytes(rng.bytes(ADAPTER_BYTES))
        src.protos.update("BRICK", {"model_name": f"smollm2-135m+lora:{adapter}", "model_lineage": [
            {"version": 1, "model_name": f"smollm2-135m+lora:{adapter}", "status": "live",
             "backend": "scripted", "adapter_dir": str(adapter)}]})
        texts = [f"Memory {i}: BRICK noted that item {i} of the inventory weighs {i % 97} kg "
                 f"and belongs to shelf {i % 13}." for i in range(MEMORIES)]
        vecs = rng.standard_normal((MEMORIES, 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        rows = [{"text": t, "kind": "note", "persona": "BRICK"} for t in texts]
        src.memory.add_many(rows, vectors=vecs)
        f = root / "brick.a4persona"
        n = 3
        exports, imports = [], []
        for i in range(n):
            t0 = time.perf_counter()
            src.personas.export("BRICK", f, overwrite=True)
            exports.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            report = dst.personas.import_(f, as_name=f"BRICK{i}")
            imports.append(time.perf_counter() - t0)
            assert report["memories"] == MEMORIES
        size = f.stat().st_size
        plain = root / "plain.zip"
        t0 = time.perf_counter()
        zip_dir(src.settings.memory_dir, plain)
        with zipfile.ZipFile(plain, "a") as zf:
            zf.write(adapter / "adapter_model.safetensors", "adapter_model.safetensors")
        zip_s = time.perf_counter() - t0
        peer_rows = [{**r, "persona": "PEER"} for r in rows]
        t0 = time.perf_counter()
        dst.memory.add_many(peer_rows, vectors=vecs)
        shutil.copytree(adapter, root / "adapter-copy")
        add_s = time.perf_counter() - t0
    finally:
        src.stop()
        dst.stop()
    return [
        (f"persona export ({MEMORIES:,} memories, {ADAPTER_BYTES / 1e6:.1f} MB adapter)",
         statistics.median(exports), "plain zip of memory_db + adapter", zip_s,
         (size, plain.stat().st_size)),
        ("persona import (checked, same embedder)", statistics.median(imports),
         "LanceDB add_many + copy adapter", add_s, None),
    ]


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        rows = snapshots(Path(d)) + personas(Path(d))
    print(f"{'operation':<58} {'time':>9} {'peer':<34} {'peer time':>9} {'ratio':>6}  size")
    for what, t, peer, pt, size in rows:
        sz = f"{size[0] / 1e6:.1f} MB (plain zip {size[1] / 1e6:.1f} MB)" if size else ""
        print(f"{what:<58} {t * 1e3:>7.1f}ms {peer:<34} {pt * 1e3:>7.1f}ms {t / pt:>6.2f}  {sz}")
    print(f"(cpus: {os.cpu_count()}; times are medians; the hash stand-in embedder, so "
          f"re-embedding is not measured here)")


if __name__ == "__main__":
    main()
