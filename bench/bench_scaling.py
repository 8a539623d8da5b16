"""Scaling benchmark: task throughput with 1 vs 2 daemons on one PostgreSQL queue, and
graph checkpoint write latency on SQLite vs PostgreSQL.

    .venv/bin/python bench/bench_scaling.py [--tasks 12] [--latency-ms 250] [--nodes 200]

Throughput: real ``a4ps daemon`` processes (tests/deployment.py) share a throwaway
PostgreSQL cluster (queue + checkpoints) and one inference server, the OpenAI-protocol
STAND-IN (tests/openai_standin.py: a fake model answering each call after a fixed
latency, any number of calls at once, as a batching GPU server would). The clock runs
from the first submission until every task is done; daemon start-up is not counted.

Checkpoint latency: the real graph on a scripted model with no latency, its saver's
``put``/``put_writes`` timed per call: SQLite as the daemon configures it (WAL,
synchronous=NORMAL: survives a killed process) and PostgreSQL on localhost with
fsync and synchronous_commit on (survives a crashed machine). A network hop to a
remote database adds its round trip to every write.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from a4ps.config import load_settings  # noqa: E402
from a4ps.events import EventBus  # noqa: E402

import graph_parts  # noqa: E402
from deployment import MODEL, Deployment, standin_reply  # noqa: E402
from openai_standin import OpenAIStandIn  # noqa: E402
from pg_cluster import PostgresCluster  # noqa: E402


def run_batch(submitter, n: int, label: str) -> float:
    """Submit ``n`` tasks and wait until all are done; the seconds it took."""
    t0 = time.perf_counter()
    ids = [submitter.submit(f"job-{label}-{i}: share {i + 2} apples among friends").id
           for i in range(n)]
    while True:
        tasks = [submitter.get(i) for i in ids]
        if all(t.status in ("done", "failed", "cancelled") for t in tasks):
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    bad = [t for t in tasks if t.status != "done"]
    if bad:
        raise SystemExit(f"{len(bad)} task(s) did not finish: {bad[0].error}")
    return seconds


def throughput(pg: PostgresCluster, tasks: int, latency_s: float) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="a4ps-bench-scaling-") as root, \
            OpenAIStandIn(models=[MODEL], reply_fn=standin_reply,
                          chat_delay_s=latency_s) as server:
        dep = Deployment(Path(root), pg.create_database("bench_queue"), server.url)
        submitter = dep.queue("bench")
        try:
            a = dep.start_daemon("daemon-a")
            a.wait_ready(180)
            run_batch(submitter, 2, "warm-a")            # first-task costs
            calls0 = len(server.calls)
            one = run_batch(submitter, tasks, "one")
            per_task = (len(server.calls) - calls0) / tasks
            b = dep.start_daemon("daemon-b")
            b.wait_ready(180)
            run_batch(submitter, 2, "warm-b")
            two = run_batch(submitter, tasks, "two")
            floor = per_task * latency_s
            rows.append(("throughput, 1 daemon", f"{tasks / one:.2f} tasks/s",
                         f"{one / tasks * 1000:.0f} ms/task (model floor {floor * 1000:.0f})",
                         "1.00x"))
            rows.append(("throughput, 2 daemons", f"{tasks / two:.2f} tasks/s",
                         f"{two / tasks * 1000:.0f} ms/task", f"{one / two:.2f}x"))
        finally:
            submitter.close()
            for d in dep.daemons:
                d.stop(30)
            dep.close()
    return rows


def checkpoint_latency(pg: PostgresCluster, nodes: int) -> list[tuple]:
    results = {}
    for kind in ("sqlite", "postgres"):
        with tempfile.TemporaryDirectory(prefix="a4ps-bench-ckpt-") as d:
            target = "sqlite" if kind == "sqlite" else pg.create_database("bench_ckpt")
            settings = load_settings(data_dir=Path(d), cognition={"checkpointer": target})
            parts = graph_parts.build(settings, EventBus(), graph_parts.script(),
                                      memory=False, max_rounds=1)
            graph = parts.graph
            graph.graph                                     # compile, open the saver
            saver = graph._saver
            times: list[float] = []
            for name in ("put", "put_writes"):
                inner = getattr(saver, name)

                def timed(*a, _inner=inner, **kw):
                    t0 = time.perf_counter()
                    try:
                        return _inner(*a, **kw)
                    finally:
                        times.append(time.perf_counter() - t0)
                setattr(saver, name, timed)
            graph.run("warm", "warm up")
            times.clear()
            i = 0
            while len(times) < nodes:
                graph.run(f"t{i}", f"task {i}")
                i += 1
            graph.close()
            results[kind] = sorted(times)
    base = statistics.median(results["sqlite"])
    rows = []
    for kind, label in (("sqlite", "checkpoint write, SQLite (WAL)"),
                        ("postgres", "checkpoint write, PostgreSQL (localhost, fsync)")):
        t = results[kind]
        med, p95 = statistics.median(t), t[int(0.95 * (len(t) - 1))]
        rows.append((label, f"{med * 1000:.2f} ms median", f"p95 {p95 * 1000:.2f} ms, "
                     f"n={len(t)}", f"{med / base:.2f}x"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=12, help="tasks per throughput batch")
    ap.add_argument("--latency-ms", type=float, default=250.0,
                    help="the fake model's fixed latency per call")
    ap.add_argument("--nodes", type=int, default=200, help="checkpoint writes to time")
    args = ap.parse_args()
    with PostgresCluster(fsync=True) as pg:
        rows = checkpoint_latency(pg, args.nodes)
        rows += throughput(pg, args.tasks, args.latency_ms / 1000)
    head = ("what", "figure", "detail", "vs peer")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
