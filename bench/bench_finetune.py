"""Fine-tune cost on the CPU path (TRL+PEFT, LoRA r=16 on the seven projections).

Runs the forge's real training child (a4ps.fine_tuning.train_worker) on a synthetic
golden set for N steps and prints one table: wall time of the child (imports, load,
held-out evals and training), the training part alone, peak RSS of the child, and the
adapter's size on disk.

    .venv/bin/python bench/bench_finetune.py                 # 5 and 20 steps, batch 1
    .venv/bin/python bench/bench_finetune.py --steps 10 --batch 2 --accum 4 --max-length 512
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPICS = ["rain", "coffee", "chess", "the moon", "bridges", "music", "gardens", "trains",
          "clocks", "maps", "owls", "bread", "rivers", "kites", "books", "stars", "tea",
          "snow", "cats", "boats", "lamps", "glass", "honey", "wolves"]


def dataset(d: Path) -> tuple[Path, Path]:
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {t}."},
                          {"role": "assistant", "content": f"{t.title()} is a system with parts, "
                           f"rules and purposes; consider each in turn, then the whole."}]}
            for t in TOPICS]
    tr, ho = d / "train.jsonl", d / "heldout.jsonl"
    tr.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    ho.write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    return tr, ho


def run(base: Path, work: Path, steps: int, args) -> dict:
    tr, ho = dataset(work)
    out = work / f"s{steps}"
    job = {"base_dir": str(base), "train_path": str(tr), "heldout_path": str(ho),
           "out_dir": str(out), "system_prompt": "You are BRICK, the logical one.",
           "steps": steps, "learning_rate": 2e-4, "lora_r": 16, "lora_alpha": 16,
           "warmup_steps": min(5, steps - 1), "batch_size": args.batch, "grad_accum": args.accum,
           "max_length": args.max_length, "backend": "trl", "threads": args.threads}
    jp = work / f"job{steps}.json"
    jp.write_text(json.dumps(job))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "a4ps.fine_tuning.train_worker", str(jp)],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    events = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    done = next((e for e in events if e["event"] == "done"), None)
    if done is None:
        err = next((e for e in events if e["event"] == "error"), {})
        raise SystemExit(f"training failed: {err.get('message')}\n{p.stderr[-2000:]}")
    start = next(e for e in events if e["event"] == "start")
    return {"steps": steps, "wall": wall, "train": done["seconds"], "rss": done["peak_rss_mb"],
            "adapter": done["adapter_bytes"], "first": done["first_loss"], "last": done["last_loss"],
            "threads": start.get("threads")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="0 = the idle cores")
    args = ap.parse_args()
    from a4ps.config import load_settings
    from a4ps.models.embedded import ensure_base_checkpoint
    settings = load_settings()
    cache = os.environ.get("A4PS_TEST_MODEL_CACHE") or ROOT / ".pytest_cache" / "a4ps-model-cache"
    if Path(cache).is_dir() and not os.environ.get("A4PS_MODELS__EMBEDDED__CACHE_DIR"):
        settings.models.embedded.cache_dir = Path(cache)
    base = ensure_base_checkpoint(settings)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in args.steps:
            rows.append(run(base, Path(d), n, args))
    print(f"CPU fine-tune, TRL+PEFT, SmolLM2-135M, LoRA r=16 x 7 projections, batch "
          f"{args.batch} x accum {args.accum}, max_length {args.max_length}, "
          f"{os.cpu_count()} cores (load {os.getloadavg()[0]:.1f})")
    print(f"{'steps':>5} {'threads':>7} {'wall s':>8} {'train s':>8} {'s/step':>7} "
          f"{'peak RSS MB':>11} {'adapter MB':>10} {'loss first->last':>18}")
    for r in rows:
        print(f"{r['steps']:>5} {r['threads']:>7} {r['wall']:>8.1f} {r['train']:>8.1f} "
              f"{r['train'] / r['steps']:>7.2f} {r['rss']:>11.0f} {r['adapter'] / 1e6:>10.1f} "
              f"{r['first']:>8.3f} -> {r['last']:.3f}")


if __name__ == "__main__":
    main()
