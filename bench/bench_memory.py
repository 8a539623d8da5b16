"""Memory search latency and recall@10 at 10k and 100k rows, without and with the index.

Vectors are random but clustered (unit vectors around 2,000 random centres), standing
in for sentence embeddings, which are far from uniform; queries are stored vectors
with a small perturbation (a paraphrase). Uniform random 384-d vectors are a
worst case no ANN index handles well and no embedder produces. Ground truth is exact
numpy cosine top-10. Latency is MemoryManager.search(vector, k=10) end to end
(LanceDB query + row conversion), single thread, after one warm-up query.

    .venv/bin/python bench/bench_memory.py [--sizes 10000 100000] [--queries 200]
        [--index-type ivf_hnsw_sq|ivf_pq]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RUST_LOG", "error")

DIM = 384


class _NoEmbedder:
    """Vectors are given directly; searching by text is not part of this bench."""

    dim = DIM

    def embed(self, texts):  # pragma: no cover - never called
        raise RuntimeError("bench passes vectors")


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    c = centres[rng.integers(0, len(centres), n)]
    v = c + 0.08 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def measure(mem, queries: np.ndarray, truth: list[set[str]]) -> tuple[float, float, float, float]:
    """Wall p50/p99, CPU-time p50 (all threads; shows the work when the machine is
    busy and wall time mostly measures waiting for a core), recall@10."""
    mem.search(queries[0], k=10)  # warm-up
    lat, cpu, hits = [], [], 0
    for q, t in zip(queries, truth):
        t0, c0 = time.perf_counter(), time.process_time()
        res = mem.search(q, k=10)
        lat.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
        hits += len({r.id for r in res} & t)
    return (float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
            float(np.percentile(cpu, 50)), hits / (10 * len(queries)))


def run(n: int, n_queries: int, index_type: str, rng: np.random.Generator,
        centres: np.ndarray) -> list[tuple]:
    from a4ps.config import load_settings
    from a4ps.memory import MemoryManager

    rows = []
    with tempfile.TemporaryDirectory(prefix="a4ps-bench-mem-") as d:
        s = load_settings(data_dir=Path(d), memory={"index_min_rows": 256,
                                                    "index_type": index_type})
        mem = MemoryManager(s, _NoEmbedder(), auto_maintain=False)
        vecs = clustered(n, rng, centres)
        t0 = time.perf_counter()
        ids: list[str] = []
        step = 10_000
        for i in range(0, n, step):
            chunk = vecs[i:i + step]
            ids += mem.add_many([{"text": f"memory {j}", "kind": "note"}
                                 for j in range(i, i + len(chunk))], vectors=chunk)
        load_s = time.perf_counter() - t0
        pick = rng.choice(n, n_queries, replace=False)
        q = vecs[pick] + 0.02 * rng.standard_normal((n_queries, DIM)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        top = np.argsort(-(q @ vecs.T), axis=1)[:, :10]
        id_arr = np.asarray(ids)
        truth = [set(id_arr[row]) for row in top]
        rows.append((n, "none (exact)", "-", f"{load_s:.1f}", *measure(mem, q, truth)))
        rep = mem.ensure_index(force=True)
        rows.append((n, index_type, f"{rep.nprobes}/{rep.ef or '-'}/{rep.refine_factor or '-'}",
                     f"{rep.seconds:.1f}", *measure(mem, q, truth)))
        mem.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--index-type", default="ivf_hnsw_sq", choices=["ivf_hnsw_sq", "ivf_pq"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((2000, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows = []
    for n in args.sizes:
        rows += run(n, args.queries, args.index_type, rng, centres)
    print(f"memory search, k=10, dim={DIM}, {args.queries} queries, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'rows':>7} | {'index':<13} | {'nprobes/ef/rf':>14} | {'load|build s':>12} | "
          f"{'p50 ms':>7} | {'p99 ms':>7} | {'cpu p50':>7} | {'recall@10':>9}")
    print("-" * 98)
    for n, kind, npr, secs, p50, p99, cpu, rec in rows:
        print(f"{n:>7} | {kind:<13} | {npr:>14} | {secs:>12} | {p50:>7.2f} | {p99:>7.2f} | "
              f"{cpu:>7.2f} | {rec:>9.3f}")
    print("target: p50 < 5 ms at 100k rows with recall@10 >= 0.95")


if __name__ == "__main__":
    main()
