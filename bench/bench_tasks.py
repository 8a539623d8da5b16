"""Task-suite benchmark: does the contrapunto earn its cost against one plain call?

    .venv/bin/python bench/bench_tasks.py [--per-kind N] [--split tune|heldout]
        [--modes contrapunto,single,brick] [--kinds factual,arithmetic,...] [--forge]
        [--backend embedded|scripted] [--out bench/results/bench_tasks.json]

Runs every suite task (config/suite/tasks.jsonl) in three modes *in the same run*,
interleaved task by task so machine load falls on all of them alike:

* ``contrapunto`` — the whole graph as a user gets it (ALFRED's route decision, BRICK
  and ROBIN, ALFRED's choice of answer), memory recall off so tasks cannot leak into
  each other;
* ``single`` — one plain call of the same model: ALFRED's system prompt and the task;
* ``brick`` — BRICK's first turn alone.

Each with the personas' generation slots as the System seeds them. Prints one table:
accuracy (all / tune / held-out), mean wall time and generated tokens per task per
mode, accuracy per kind, the decision parse rate (every route, tool-request and
answer-choice decision the graph asked), the share of answers that came from a
fallback, the routes taken, and the turns whose budget was filled by repetition;
then the line ``suite accuracy: contrapunto X.XX single Y.YY`` to compare runs.
The tool route finds and calls the registered tools (a new image has the seed tool
``calculate``) in the gVisor sandbox; ``--forge`` also lets it forge new ones (slow:
BRICK writes the code); without it a request for a tool that does not exist is
answered "no tool fits ... and no tool forge is configured".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from a4ps.cognition import suite  # noqa: E402
from a4ps.cognition.graph import CognitiveGraph  # noqa: E402
from a4ps.config import load_settings  # noqa: E402


# the route a careful steward would take for each kind of task (a measure of the
# route decision's sense, not a check any answer is graded on)
EXPECTED_ROUTE = {"factual": "direct", "arithmetic": "tool", "conversion": "tool",
                  "reasoning": "contrapunto", "empathy": "contrapunto", "format": "direct"}


def build(args: argparse.Namespace):
    """A System on a temp data dir (personas seeded as for a user), and a graph over it."""
    from a4ps.system import System
    data = Path(tempfile.mkdtemp(prefix="a4ps-bench-tasks-"))
    overrides: dict = {"data_dir": data}
    settings = load_settings(**overrides)
    models = settings.models.model_copy(update={"backend": args.backend})
    cache = os.environ.get("A4PS_TEST_MODEL_CACHE")
    if cache:
        models = models.model_copy(update={"embedded": models.embedded.model_copy(
            update={"cache_dir": Path(cache)})})
    if args.backend == "scripted":
        models = models.model_copy(update={"embedding_backend": "hash"})
    settings.models = models
    system = System(settings).start(services=False)
    graph = CognitiveGraph(system.protos, system.models, None, system.bus, settings,
                           forge=system.forge if args.forge else None,
                           registry=system.tools,
                           checkpointer_path=False, turn_max_tokens=args.max_tokens)
    return system, graph


def pick(args: argparse.Namespace) -> list[suite.SuiteTask]:
    tasks = suite.load_suite(split=args.split, kinds=args.kinds)
    if args.per_kind:
        seen: Counter = Counter()
        kept = []
        for t in tasks:
            if seen[t.kind] < args.per_kind:
                kept.append(t)
                seen[t.kind] += 1
        tasks = kept
    return tasks


def summarise(rows: list[dict], modes: list[str]) -> dict:
    out: dict = {"modes": {}}
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue

        def acc(sel):
            return sum(r["passed"] for r in sel) / len(sel) if sel else float("nan")
        out["modes"][mode] = {
            "n": len(rs), "accuracy": acc(rs),
            "tune": acc([r for r in rs if r["split"] == "tune"]),
            "heldout": acc([r for r in rs if r["split"] == "heldout"]),
            "wall_s": statistics.mean(r["wall_s"] for r in rs),
            "tokens": statistics.mean(r["tokens"] for r in rs),
            "kinds": {k: acc([r for r in rs if r["kind"] == k]) for k in suite.KINDS
                      if any(r["kind"] == k for r in rs)},
            "repetition_filled": sum(len(r["repetition_filled"]) for r in rs),
            "length_finishes": sum(t.get("finish") == "length" for r in rs for t in r["turns"]),
            "turns": sum(len(r["turns"]) for r in rs),
        }
    graph_rows = [r for r in rows if r["mode"] == "contrapunto"]
    decisions = [d for r in graph_rows for d in r["decisions"]]
    out["decisions"] = {k: (sum(d["parsed"] for d in decisions if d["kind"] == k),
                            sum(d["kind"] == k for d in decisions))
                        for k in ("route", "tool", "tool_request", "answer")}
    out["route_by"] = dict(Counter(("signal" if d.get("method") == "signal" else "model")
                                   for d in decisions if d["kind"] == "route"))
    out["parse_rate"] = (sum(d["parsed"] for d in decisions) / len(decisions)
                         if decisions else float("nan"))
    out["fallback_share"] = (sum(r["fallback"] for r in graph_rows) / len(graph_rows)
                             if graph_rows else float("nan"))
    out["routes"] = dict(Counter(r["route"] for r in graph_rows))
    fit = [(r["kind"], r["route"] == EXPECTED_ROUTE[r["kind"]]) for r in graph_rows
           if r["decisions"] and r["decisions"][0]["kind"] == "route"]
    out["route_fit"] = sum(ok for _, ok in fit) / len(fit) if fit else float("nan")
    out["route_fit_kinds"] = {k: sum(ok for kk, ok in fit if kk == k) / n
                              for k in suite.KINDS
                              if (n := sum(kk == k for kk, _ in fit))}
    tools = [r["tool"] for r in graph_rows if r.get("tool")]
    out["tool_calls"] = (sum(bool(t.get("ok")) and "output" in t for t in tools), len(tools))
    out["sources"] = dict(Counter(r["source"] for r in graph_rows))
    return out


def table(s: dict, modes: list[str]) -> str:
    lines = [f"{'mode':<12} {'n':>3} {'acc':>5} {'tune':>5} {'held':>5} {'wall_s':>7} "
             f"{'tokens':>6} {'x wall':>6}  per kind"]
    base = s["modes"].get("single", {}).get("wall_s")
    for mode in modes:
        m = s["modes"].get(mode)
        if not m:
            continue
        ratio = f"{m['wall_s'] / base:.2f}" if base else "-"
        kinds = " ".join(f"{k[:5]}={v:.2f}" for k, v in m["kinds"].items())
        lines.append(f"{mode:<12} {m['n']:>3} {m['accuracy']:>5.2f} {m['tune']:>5.2f} "
                     f"{m['heldout']:>5.2f} {m['wall_s']:>7.1f} {m['tokens']:>6.1f} "
                     f"{ratio:>6}  {kinds}")
    d = s["decisions"]
    lines.append("decision parse rate: "
                 + (f"{s['parse_rate']:.2f}" if s["parse_rate"] == s["parse_rate"] else "n/a")
                 + " (" + ", ".join(f"{k} {a}/{b}" for k, (a, b) in d.items()) + ")")
    lines.append(f"answers from a fallback: {s['fallback_share']:.2f}   "
                 f"sources: {s['sources']}")
    lines.append(f"routes: {s['routes']} decided by {s.get('route_by', {})}; fit the kind: "
                 f"{s['route_fit']:.2f} ("
                 + " ".join(f"{k[:5]}={v:.2f}" for k, v in s.get("route_fit_kinds", {}).items())
                 + f")   tool calls answered: {s['tool_calls'][0]}/{s['tool_calls'][1]}")
    lines.append("turns whose budget repetition filled: " + ", ".join(
        f"{mode} {m['repetition_filled']}/{m['turns']} (at budget {m['length_finishes']})"
        for mode, m in s["modes"].items()))
    c = s["modes"].get("contrapunto", {}).get("accuracy", float("nan"))
    g = s["modes"].get("single", {}).get("accuracy", float("nan"))
    lines.append(f"suite accuracy: contrapunto {c:.2f} single {g:.2f}")
    return "\n".join(lines)


def rescore(path: Path) -> int:
    """The table of a saved run, its answers checked again (a fixed check, same answers)."""
    saved = json.loads(path.read_text())     # a whole run, or one stopped part-way
    by_id = {t.id: t for t in suite.load_suite()}
    rows = saved["rows"]
    for r in rows:
        v = suite.check_answer(by_id[r["id"]], r["answer"])
        r.update(passed=v.passed, score=v.score, detail=v.detail)
    modes = [m for m in suite.MODES if any(r["mode"] == m for r in rows)]
    s = summarise(rows, modes)
    print(f"task suite (re-checked {path}): {len({r['id'] for r in rows})} tasks x "
          f"{len(modes)} modes")
    print(table(s, modes))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-kind", type=int, default=0, help="at most N tasks of each kind")
    ap.add_argument("--split", choices=suite.SPLITS, default=None)
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=None)
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(suite.MODES))
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="cap every turn (default: each persona's max_tokens slot)")
    ap.add_argument("--backend", choices=("embedded", "scripted"), default="embedded")
    ap.add_argument("--forge", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="a line per task and mode")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_tasks.json")
    ap.add_argument("--rescore", type=Path, default=None,
                    help="re-check the answers saved in a results file with the suite's "
                         "current checks (no model runs) and print the table again")
    args = ap.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore)
    tasks = pick(args)
    system, graph = build(args)
    runner = suite.SuiteRunner(graph, system.models, system.protos)
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks) * len(args.modes), unit="run", file=sys.stderr)
        for task in tasks:
            for mode in args.modes:
                bar.set_description(f"{task.id} {mode}")
                row = runner.run(task, mode)
                rows.append(row)
                bar.update(1)
                args.out.parent.mkdir(parents=True, exist_ok=True)     # kept as it goes
                args.out.write_text(json.dumps({"rows": rows}, indent=1, default=str))
                if args.verbose:
                    bar.write(f"{row['id']:<14} {mode:<12} {'PASS' if row['passed'] else 'fail'} "
                              f"{row['wall_s']:6.1f}s {row['tokens']:4d}tok "
                              f"route={row['route']} src={row['source']} "
                              f"{row['answer'][:90]!r} [{row['detail'][:50]}]")
        bar.close()
    finally:
        system.stop()
    s = summarise(rows, args.modes)
    s["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": s, "rows": rows}, indent=1, default=str))
    print(f"task suite: {len(tasks)} tasks x {len(args.modes)} modes on {args.backend} "
          f"({s['seconds']:.0f} s; rows in {args.out})")
    print(table(s, args.modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
