"""Self-improvement on the CPU: one full unattended cycle per persona, and the judge's
parse rate before and after constrained decoding.

Part 1, for each of BRICK and ROBIN, on a fresh data directory with the real parts
(SmolLM2-135M embedded, MiniLM embeddings, LanceDB memory, the training child):

    interactions -> judged -> golden/eval -> LoRA -> gate -> swap or refuse

* interactions: user tasks answered in the persona's manner, written to memory as the
  graph's remember node writes them, plus goals and reflections (which must not be
  trained on) and near-duplicates (which must collapse);
* judged: one curator pass, ALFRED scoring through ModelManager.choose;
* golden/eval: what was kept, and the share held out by content hash;
* LoRA + gate: PersonaFinetuner on the golden set, gated on the held-out rows (paired
  bootstrap), the capability suite and ALFRED's judgement; swap or refuse.

The table gives the held-out loss before/after with the gain's 95% interval, the suite,
the decision, and the wall time of every stage.

Part 2: ALFRED judges the same interactions twice: in free text with the old rubric
form (read by the strict parser; the share that gives a score is the "parse rate"),
and through ``choose`` (a decision every time unless the model errs). The score
distribution is printed too: a constrained judge can still be a poor one.

    .venv/bin/python bench/bench_selfimprove.py                 # all parts, 20 steps
    .venv/bin/python bench/bench_selfimprove.py --steps 60      # the default max_steps
    .venv/bin/python bench/bench_selfimprove.py --only judge --replies 50
    .venv/bin/python bench/bench_selfimprove.py --score-threshold 1   # keep all ALFRED scored

Part 2 also measures whether the judge can tell good answers from bad ones, on the
labelled set tests/judge_cases.py (a right answer per task, and wrong, off-topic,
empty/one-word, looping, refusing and echoing ones): pairwise accuracy (the right
answer scored above the bad one of the same task), AUROC, per bad kind and the share
of each kind the curator's threshold would keep; "before" is the bare 1..5 choice
(the judge as it was), "after" the judge with its cheap checks and grounding score.

Part 3 prints the philosopher's similarity distribution (see a4ps/services/similarity.py).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPICS = ["a bridge", "a clock", "a garden", "a library", "a river", "a train", "a market",
          "a lighthouse", "a bakery", "a school", "a harbour", "a forest", "a museum",
          "a kitchen", "a farm", "a theatre", "an airport", "a hospital", "a factory",
          "a castle", "a park", "a mine", "a dam", "a zoo", "a bank", "a ferry", "a stadium",
          "a windmill", "a greenhouse", "an observatory", "a post office", "a fire station",
          "a vineyard", "a canal", "a glacier", "a volcano"]
STYLE = {
    # a fixed, learnable manner per persona: what "improvement" means in this bench
    "BRICK": ("How does {t} work?",
              "ANALYSIS: {T} has three parts: inputs, a process and outputs. Each part "
              "depends on the one before. CONCLUSION: {t} works when all three hold."),
    "ROBIN": ("I feel worried about visiting {t}.",
              "I hear you: feeling worried about {t} is natural. Take a slow breath, go with "
              "someone you trust, and be gentle with yourself."),
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _settings(data: Path, steps: int):
    from a4ps.config import load_settings
    s = load_settings(data_dir=data)
    cache = os.environ.get("A4PS_TEST_MODEL_CACHE")
    if cache and not os.environ.get("A4PS_MODELS__EMBEDDED__CACHE_DIR"):
        s.models.embedded.cache_dir = Path(cache)
    s.finetune.max_steps = steps
    return s


def interactions(memory, persona: str, n_user: int) -> dict[str, int]:
    """What the graph's remember node would have stored for a day of use."""
    q, a = STYLE[persona]
    n = 0
    for t in TOPICS[:n_user]:
        memory.add(f"Task: {q.format(t=t)}\nAnswer: {a.format(t=t, T=t[0].upper() + t[1:])}",
                   kind="interaction", persona="ALFRED", task_id=f"user-{n}",
                   meta={"origin": "user", "brick": "", "robin": ""})
        n += 1
    for i, t in enumerate(TOPICS[:2]):      # the same tasks asked again (near-duplicates)
        memory.add(f"Task: {q.format(t=t).lower()}\nAnswer: {a.format(t=t, T=t[0].upper() + t[1:])}",
                   kind="interaction", persona="ALFRED", task_id=f"dup-{i}",
                   meta={"origin": "user"})
    for i in range(2):                      # the system's own work
        memory.add(f"Task: Practise summarising topic {i} in two sentences.\nAnswer: Done {i}.",
                   kind="interaction", persona="ALFRED", task_id=f"goal-{i}",
                   meta={"origin": "motivator", "kind": "goal"})
        memory.add(f"Task: Reflect on task {i}.\nAnswer: We diverged on {i}.",
                   kind="interaction", persona="ALFRED", task_id=f"refl-{i}",
                   meta={"origin": "reflection", "kind": "reflection"})
    return {"user": n, "duplicates": 2, "self": 4}


def cycle(persona: str, steps: int, models, n_user: int, threshold: float | None) -> dict:
    """One unattended cycle on a fresh data dir; returns the table row."""
    from a4ps.system import System
    row: dict = {"persona": persona}
    with tempfile.TemporaryDirectory() as d:
        settings = _settings(Path(d) / "data", steps)
        settings.curator.batch_size = 100
        settings.curator.trigger_size = 10 ** 6          # the bench triggers by hand
        row["default_threshold"] = settings.curator.score_threshold
        if threshold is not None:
            settings.curator.score_threshold = threshold
        row["threshold"] = settings.curator.score_threshold
        system = System(settings, chat_backend=models.backend, embedder=models.embedder)
        system.start(services=False)
        try:
            t0 = time.monotonic()
            made = interactions(system.memory, persona, n_user)
            row["t_interactions"] = time.monotonic() - t0
            row["made"] = made
            _say(f"[{persona}] judging {sum(made.values())} interactions ...")
            t0 = time.monotonic()
            rep = system.curator.run_once(finetune=False)
            row["t_judge"] = time.monotonic() - t0
            row["judged"] = sum(1 for s in rep.scored if not s.skipped)
            row["skipped"] = dict(rep.skipped)
            row["scores"] = collections.Counter(s.score for s in rep.scored if s.score is not None)
            row["kept_at_default"] = sum(n for sc, n in row["scores"].items()
                                         if sc >= row["default_threshold"])
            row["golden"], row["eval"] = rep.dataset_size, rep.eval_size
            row["votes"] = rep.votes
            if rep.dataset_size == 0:
                row["decision"] = "no golden rows (the judge kept nothing)"
                return row
            _say(f"[{persona}] fine-tuning on {rep.dataset_size} rows, {rep.eval_size} held out, "
                 f"{steps} steps ...")
            t0 = time.monotonic()
            ft = system.finetuner.finetune(persona, system.curator.golden_path, steps=steps)
            row["t_finetune"] = time.monotonic() - t0
            row["stages"] = ft.stages
            row["ok"], row["reason"] = ft.ok, ft.reason
            c = ft.comparison or {}
            row["heldout"], row["suite"], row["judge"] = c.get("heldout"), c.get("suite"), c.get("judge")
            row["decision"] = "SWAP" if ft.swapped else ("refuse" if ft.ok else "failed")
        finally:
            system.stop()
    return row


def judge_parse_rate(models, n: int) -> dict:
    """The same n interactions judged in free text (strict parser) and via choose."""
    from a4ps.codex import Codex
    from a4ps.events import EventBus
    from a4ps.fine_tuning.judge import Judge, free_text_prompt, parse_score, parse_vote
    from a4ps.proto import ProtoManager
    from a4ps.system import CODEX_PATH
    codex = Codex.from_toml(CODEX_PATH)
    protos = ProtoManager(EventBus())
    protos.create("ALFRED", {"model_name": "smollm2-135m",
                             "system_prompt": codex.system_prompt("ALFRED")})
    judge = Judge(models, protos, embedder=models.embedder)
    cases = []
    for persona, (q, a) in STYLE.items():
        for t in TOPICS:
            cases.append((q.format(t=t), a.format(t=t, T=t[0].upper() + t[1:])))
    cases = cases[::max(1, len(cases) // n)][:n]
    free_scores, free_votes, free_s = [], [], 0.0
    con_scores, con_votes, con_s = [], [], 0.0
    for i, (task, answer) in enumerate(cases, 1):
        msgs = [{"role": "system", "content": codex.system_prompt("ALFRED")},
                {"role": "user", "content": free_text_prompt(task, answer)}]
        t0 = time.monotonic()
        reply = models.chat("smollm2-135m", msgs, temperature=0.0, max_tokens=24)
        free_s += time.monotonic() - t0
        free_scores.append(parse_score(reply))
        free_votes.append(parse_vote(reply))
        t0 = time.monotonic()
        v = judge.assess(task, answer)
        con_s += time.monotonic() - t0
        con_scores.append(v.score)
        con_votes.append(v.vote)
        if i % 10 == 0:
            _say(f"judge: {i}/{len(cases)}")
    rate = lambda xs: sum(x is not None for x in xs) / len(xs)
    return {"n": len(cases), "free_score": rate(free_scores), "free_vote": rate(free_votes),
            "con_score": rate(con_scores), "con_vote": rate(con_votes),
            "free_dist": collections.Counter(x for x in free_scores if x is not None),
            "con_dist": collections.Counter(x for x in con_scores if x is not None),
            "free_s": free_s / len(cases), "con_s": con_s / len(cases)}


def judge_discrimination(models, threshold: float) -> dict:
    """The judge before (bare 1..5 choice) and after (checks + grounding) on the
    labelled set tests/judge_cases.py, with the seconds each took per case."""
    sys.path.insert(0, str(ROOT / "tests"))
    import judge_cases
    from a4ps.events import EventBus
    from a4ps.fine_tuning.judge import Judge
    from a4ps.proto import ProtoManager
    protos = ProtoManager(EventBus())
    protos.create("ALFRED", {"model_name": "smollm2-135m",
                             "system_prompt": _alfred_prompt()})
    out = {}
    judges = {"before": Judge(models, protos, method="rubric", checks=False),
              "after": Judge(models, protos, embedder=models.embedder)}
    for held_out in (False, True):
        cases = judge_cases.cases(held_out=held_out)
        for name, judge in judges.items():
            t0 = time.monotonic()
            scored = []
            for i, c in enumerate(cases, 1):
                scored.append((c, judge.score(c.task, c.answer).score))
                if i % 20 == 0:
                    _say(f"judge {name}: {i}/{len(cases)}")
            res = judge_cases.discrimination(scored, threshold)
            res["s"] = (time.monotonic() - t0) / len(cases)
            out[(name, "held-out" if held_out else "set")] = res
    # the model's own answers (greedy, 48 tokens, as the gate asks): unlabelled, so only
    # what the judge keeps and which checks fail; printed for a person to read
    own = []
    for c in judge_cases.cases() + judge_cases.cases(held_out=True):
        if c.kind == "good":
            a = models.chat("smollm2-135m", [{"role": "user", "content": c.task}],
                            temperature=0.0, max_tokens=48)
            v = judges["after"].score(c.task, a)
            own.append({"task": c.task, "answer": a, "score": v.score, "flags": v.flags,
                        "before": judges["before"].score(c.task, a).score})
    out[("own", "answers")] = own
    return out


def _alfred_prompt() -> str:
    from a4ps.codex import Codex
    from a4ps.system import CODEX_PATH
    return Codex.from_toml(CODEX_PATH).system_prompt("ALFRED")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _loss(e) -> str:
    if not e:
        return "-"
    return (f"{e['current_mean']:.3f} -> {e['new_mean']:.3f} ({_pct(e['gain'])}, CI "
            f"{_pct(e['ci_low'])}..{_pct(e['ci_high'])}, n={e['n']})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--replies", type=int, default=50)
    ap.add_argument("--personas", nargs="+", default=["BRICK", "ROBIN"])
    ap.add_argument("--interactions", type=int, default=24, help="user interactions per persona")
    ap.add_argument("--score-threshold", type=float, default=None,
                    help="the curator's keep threshold for the cycle (default: the setting). "
                         "The table also says how many the default threshold would keep.")
    ap.add_argument("--only", choices=["cycle", "judge", "threshold"])
    args = ap.parse_args()
    from a4ps.config import load_settings
    from a4ps.events import EventBus
    from a4ps.models.embedded import EmbeddedBackend
    from a4ps.models.embeddings import MiniLMEmbedder
    from a4ps.models.manager import ModelManager
    base = _settings(Path(tempfile.mkdtemp()) / "data", args.steps)
    models = ModelManager(base, EventBus(), backend=EmbeddedBackend(base),
                          embedder=MiniLMEmbedder())
    load = os.getloadavg()[0]
    out: list[str] = []
    if args.only in (None, "cycle"):
        rows = [cycle(p, args.steps, models, args.interactions, args.score_threshold)
                for p in args.personas]
        ft = base.finetune
        out.append(f"Self-improvement cycle, SmolLM2-135M on the CPU ({os.cpu_count()} cores, "
                   f"load {load:.1f}): {args.steps} steps, lr {ft.learning_rate}, batch "
                   f"{ft.batch_size}x{ft.grad_accum}; gate: held-out CI lower bound > "
                   f"{_pct(ft.gate_min_gain)}, suite >= {_pct(-ft.suite_tolerance)}, judge on "
                   f"{ft.judge_samples} tasks")
        out.append(f"{'persona':8} {'judged':>6} {'skipped':>22} {'golden':>6} {'eval':>4}  "
                   f"{'decision':8}  held-out loss before -> after (gain, 95% CI)")
        for r in rows:
            sk = ",".join(f"{k}:{v}" for k, v in sorted(r.get("skipped", {}).items())) or "-"
            out.append(f"{r['persona']:8} {r.get('judged', 0):>6} {sk:>22} {r.get('golden', 0):>6} "
                       f"{r.get('eval', 0):>4}  {r['decision']:8}  {_loss(r.get('heldout'))}")
            out.append(f"{'':8} suite: {_loss(r.get('suite'))}")
            j = r.get("judge")
            if j:
                out.append(f"{'':8} ALFRED: {j.get('current_mean')} -> {j.get('new_mean')} "
                           f"({j.get('scored')}/{j.get('asked')} pairs)")
            out.append(f"{'':8} scores given: {dict(sorted(r.get('scores', {}).items()))}; kept at "
                       f"threshold {r.get('threshold')}; the default {r.get('default_threshold')} "
                       f"would keep {r.get('kept_at_default')}; votes {r.get('votes')}")
            st = r.get("stages") or {}
            times = {"interactions": r.get("t_interactions"), "judge": r.get("t_judge"),
                     "train": st.get("train"), "eval loss": st.get("eval_loss"),
                     "train child total": st.get("train_child"), "gate (+ALFRED)": st.get("gate"),
                     "swap": st.get("swap")}
            out.append(f"{'':8} wall s: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()
                                                      if v is not None))
            if r.get("reason"):
                out.append(f"{'':8} why: {r['reason'][:400]}")
    if args.only in (None, "judge"):
        _say(f"judge parse rate on {args.replies} replies ...")
        j = judge_parse_rate(models, args.replies)
        out.append(f"\nALFRED's judgement of {j['n']} interactions (SmolLM2-135M embedded)")
        out.append(f"{'asked as':28} {'score rate':>10} {'vote rate':>9} {'s/reply':>8}  scores given")
        out.append(f"{'free text + strict parser':28} {100 * j['free_score']:>9.0f}% "
                   f"{100 * j['free_vote']:>8.0f}% {j['free_s']:>8.2f}  {dict(sorted(j['free_dist'].items()))}")
        out.append(f"{'judge (checks + grounding)':28} {100 * j['con_score']:>9.0f}% "
                   f"{100 * j['con_vote']:>8.0f}% {j['con_s']:>8.2f}  {dict(sorted(j['con_dist'].items()))}")
        thr = base.curator.score_threshold
        d = judge_discrimination(models, thr)
        first = d[("before", "set")]
        kinds = list(first["per_kind"])
        out.append(f"\nCan the judge tell good from bad? tests/judge_cases.py: the set "
                   f"({first['n']} answers) and the held-out set ({d[('before', 'held-out')]['n']}), "
                   f"1 good + {len(kinds)} bad per task; before = the bare 1..5 choice, "
                   f"after = checks + grounding")
        out.append(f"{'judge':17} {'pairwise':>8} {'AUROC':>6} {'s/case':>6}  per bad kind "
                   f"(pairwise): " + " ".join(f"{k:>9}" for k in kinds))
        own = d.pop(("own", "answers"))
        for (name, subset), r in d.items():
            out.append(f"{name + ' ' + subset:17} {r['pairwise']:>8.3f} {r['auroc']:>6.3f} "
                       f"{r['s']:>6.2f}  {'':21}"
                       + " ".join(f"{r['per_kind'][k]:>9.2f}" for k in kinds))
        for (name, subset), r in d.items():
            kept = " ".join(f"{k} {100 * v:.0f}%" for k, v in r["kept"].items())
            out.append(f"{name + ' ' + subset:17} kept at {thr:g}: {kept}; "
                       f"scores per unit {r['distribution']}")
        flagged = collections.Counter(f for o in own for f in o["flags"])
        out.append(f"SmolLM2's own answers to the {len(own)} tasks (unlabelled; read them): kept "
                   f"before {sum((o['before'] or 0) >= thr for o in own)}, after "
                   f"{sum((o['score'] or 0) >= thr for o in own)}; flagged {dict(flagged)}")
        for o in own:
            out.append(f"  {o['score'] if o['score'] is not None else '-':>6} "
                       f"{','.join(o['flags']) or '-':>12}  {o['task'][:40]!r} -> "
                       f"{' '.join(o['answer'].split())[:110]!r}")
    if args.only in (None, "threshold"):
        from a4ps.services.similarity import choose_threshold, load_calibration, similarity_report
        rep = similarity_report(models.embedder, *load_calibration())
        t = choose_threshold(rep)
        out.append(f"\nPhilosopher threshold from data (MiniLM cosine): chosen {t} "
                   f"(shipped {load_settings().philosopher.similarity})")
        out.append(f"{'pairs':14} {'n':>5} {'min':>6} {'p5':>6} {'median':>6} {'p95':>6} {'max':>6}")
        for name, s in rep.summary().items():
            out.append(f"{name:14} {s['n']:>5} {s['min']:>6.2f} {s['p5']:>6.2f} {s['median']:>6.2f} "
                       f"{s['p95']:>6.2f} {s['max']:>6.2f}")
        for th in (0.75, t):
            rec, fm = rep.rates(th)
            out.append(f"at {th}: {100 * rec:.0f}% of paraphrase pairs merged, "
                       f"{100 * fm:.2f}% of other pairs")
    models.release()
    print("\n".join(out))


if __name__ == "__main__":
    main()
