"""The evaluation gate a new adapter must pass before it is swapped in.

A candidate replaces the live model only on evidence:

1. **Better beyond its noise on held-out data.** Both models' loss on each held-out
   item's reference answer (content tokens; computed in the training child, where the
   weights are) is compared item by item. The improvement is the relative drop of
   the mean loss, and a paired bootstrap over the items gives its confidence
   interval: the *lower* bound must clear ``finetune.gate_min_gain``. The held-out
   items are the curator's eval rows (never trained on, see :mod:`.eval_set`) and an
   optional held-out file. Without enough of them there is no evidence, so no swap.
   Why a margin and not just "above zero": training on *anything* in chat format
   (ten rows of random words) lowers every answer's loss a little through the format
   alone: 1% after 5 steps, 4% after 20 (SmolLM2-135M, default recipe, measured).
2. **Not worse on the capability suite** (``config/eval/<PERSONA>.jsonl``) than
   ``finetune.suite_tolerance``.
3. **ALFRED does not judge it surely worse**, when ``finetune.judge_samples`` > 0: both
   models answer a few held-out tasks and ALFRED scores every answer through the
   constrained judge; a drop beyond ``finetune.judge_tolerance`` whose whole bootstrap
   interval is below zero refuses. A judgement that could not be made is *no
   evidence*: with too few scored pairs the gate refuses, it never counts that as a
   pass. (ALFRED is asked only when the losses already passed: it costs minutes.)

Every number (per item too) goes into the report and the persona's lineage.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, TypeGuard

import numpy as np

from .judge import Judge

CONFIDENCE = 0.95


@dataclass
class SetEvidence:
    """Both models' per-item losses on one evaluation set, and the paired comparison."""

    name: str                                     # "heldout" | "suite"
    n: int = 0
    current_mean: float | None = None
    new_mean: float | None = None
    gain: float | None = None                     # relative drop of the mean loss
    ci_low: float | None = None
    ci_high: float | None = None
    items: list[dict[str, Any]] = field(default_factory=list)   # {id, current, new}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k != "items"}


def paired_bootstrap(current: Sequence[float], new: Sequence[float], *, rounds: int = 2000,
                     seed: int = 0, confidence: float = CONFIDENCE
                     ) -> tuple[float, float, float]:
    """(gain, low, high): the relative drop of the mean loss and its bootstrap interval.

    Items are resampled with replacement, *pairs kept together*, so what one item
    costs both models cancels out and only the difference between them varies.
    """
    cur = np.asarray(current, dtype=np.float64)
    nw = np.asarray(new, dtype=np.float64)
    if cur.shape != nw.shape or cur.size == 0:
        raise ValueError("paired_bootstrap needs two equally long, non-empty sequences")
    gain = float((cur.mean() - nw.mean()) / cur.mean())
    if cur.size == 1:
        return gain, gain, gain
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cur.size, size=(int(rounds), cur.size))
    c, w = cur[idx].mean(axis=1), nw[idx].mean(axis=1)
    gains = (c - w) / c
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(gains, [tail, 1.0 - tail])
    return gain, float(lo), float(hi)


def compare_set(name: str, current: list[dict[str, Any]], new: list[dict[str, Any]],
                *, rounds: int = 2000, seed: int = 0) -> SetEvidence:
    """Pair the two models' item losses of one set (items either model could not score
    are left out) and bootstrap the difference."""
    new_by_id = {(r["set"], r["id"]): r for r in new}
    items = []
    for r in current:
        if r.get("set") != name:
            continue
        other = new_by_id.get((r["set"], r["id"]))
        a, b = r.get("loss"), (other or {}).get("loss")
        if _finite(a) and _finite(b):
            items.append({"id": r["id"], "current": round(float(a), 6), "new": round(float(b), 6)})
    ev = SetEvidence(name, n=len(items), items=items)
    if items:
        cur = [i["current"] for i in items]
        nw = [i["new"] for i in items]
        ev.current_mean = round(float(np.mean(cur)), 6)
        ev.new_mean = round(float(np.mean(nw)), 6)
        if ev.current_mean > 0:
            g, lo, hi = paired_bootstrap(cur, nw, rounds=rounds, seed=seed)
            ev.gain, ev.ci_low, ev.ci_high = round(g, 6), round(lo, 6), round(hi, 6)
    return ev


@dataclass
class JudgeEvidence:
    """ALFRED's paired scores of both models' answers to the same held-out tasks."""

    asked: int = 0
    scored: int = 0                               # pairs where both answers got a score
    current_mean: float | None = None
    new_mean: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GatePolicy:
    """The gate's thresholds (from ``settings.finetune``)."""

    min_items: int = 4
    min_gain: float = 0.10
    suite_tolerance: float = 0.02
    judge_samples: int = 3
    judge_tolerance: float = 0.5
    bootstrap_rounds: int = 2000

    @classmethod
    def from_settings(cls, ft: Any) -> "GatePolicy":
        return cls(min_items=int(ft.gate_min_items), min_gain=float(ft.gate_min_gain),
                   suite_tolerance=float(ft.suite_tolerance), judge_samples=int(ft.judge_samples),
                   judge_tolerance=float(ft.judge_tolerance),
                   bootstrap_rounds=int(ft.bootstrap_rounds))


@dataclass
class Comparison:
    """The gate's numbers for one candidate against the live model, and its decision."""

    current_model: str
    candidate_model: str
    heldout: SetEvidence | None = None
    suite: SetEvidence | None = None
    judge: JudgeEvidence | None = None
    current_loss: float | None = None             # token-weighted mean over all items
    new_loss: float | None = None
    current_ppl: float | None = None
    new_ppl: float | None = None
    heldout_size: int = 0
    judge_current: float | None = None
    judge_new: float | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def numbers(self) -> dict[str, Any]:
        """What the lineage keeps: every figure, without the per-item lists."""
        out = {k: getattr(self, k) for k in (
            "current_loss", "new_loss", "current_ppl", "new_ppl", "heldout_size",
            "judge_current", "judge_new", "passed", "reason")}
        out["heldout"] = self.heldout.summary() if self.heldout else None
        out["suite"] = self.suite.summary() if self.suite else None
        out["judge"] = ({k: v for k, v in self.judge.to_dict().items() if k != "samples"}
                        if self.judge else None)
        out["checks"] = [dict(c) for c in self.checks]
        return out


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:+.1f}%"


def decide(cmp: Comparison, policy: GatePolicy) -> Comparison:
    """Fill ``checks``, ``passed`` and ``reason``. Every check must pass."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    target = cmp.heldout
    if target is None or target.n < policy.min_items or target.gain is None:
        have = 0 if target is None else target.n
        check("evidence", False,
              f"only {have} held-out item(s) could be scored; the gate needs at least "
              f"{policy.min_items} that training never saw (the curator holds out a share of "
              f"what it admits; or pass a held-out file)")
    else:
        ok = target.ci_low is not None and target.ci_low > policy.min_gain
        verdict = "better beyond its noise" if ok else "not better beyond its noise"
        check("improvement", ok,
              f"{verdict} on {target.n} held-out rows: loss {target.current_mean:.4f} -> "
              f"{target.new_mean:.4f} ({_pct(target.gain)}, {int(CONFIDENCE * 100)}% CI "
              f"{_pct(target.ci_low)}..{_pct(target.ci_high)}; the lower bound must exceed "
              f"{_pct(policy.min_gain)})")
    suite = cmp.suite
    if suite is not None and suite.n and suite.gain is not None:
        regression = -suite.gain
        ok = regression <= policy.suite_tolerance
        check("capability suite", ok,
              f"capability suite ({suite.n} items) loss {suite.current_mean:.4f} -> "
              f"{suite.new_mean:.4f} ({_pct(suite.gain)}; at most "
              f"{_pct(-policy.suite_tolerance)} allowed)")
    else:
        check("capability suite", True, "no capability suite for this persona")
    if policy.judge_samples > 0 and cmp.judge is None and not all(c["passed"] for c in checks):
        pass        # refused on the losses already: ALFRED was not asked (it costs minutes)
    elif policy.judge_samples > 0:
        j = cmp.judge or JudgeEvidence()
        needed = max(1, math.ceil(j.asked / 2)) if j.asked else 1
        if j.scored < needed:
            check("judge", False, f"ALFRED's judgement gave no evidence ({j.scored} of "
                                  f"{j.asked} answer pairs scored); no evidence is not a pass")
        else:
            assert j.new_mean is not None and j.current_mean is not None  # scored >= 1 sets both
            diff = j.new_mean - j.current_mean
            pairs = [(r["current_score"], r["new_score"]) for r in j.samples
                     if r.get("current_score") is not None and r.get("new_score") is not None]
            worse_surely = _upper_diff(pairs, policy.bootstrap_rounds) < 0
            ok = not (diff < -policy.judge_tolerance and worse_surely)
            check("judge", ok, f"ALFRED {j.current_mean:.2f} -> {j.new_mean:.2f} on {j.scored} "
                               f"pairs ({diff:+.2f}; refused only when it drops by more than "
                               f"{policy.judge_tolerance} and surely, i.e. the whole "
                               f"{int(CONFIDENCE * 100)}% interval is below 0)")
    cmp.checks = checks
    cmp.passed = bool(checks) and all(c["passed"] for c in checks)
    failed = [c["detail"] for c in checks if not c["passed"]]
    cmp.reason = "; ".join(failed) if failed else "; ".join(c["detail"] for c in checks)
    return cmp


def judge_answers(judge: Judge, chat: Callable[[str, list[dict[str, str]]], str],
                  samples: list[dict[str, str]], current_model: str, candidate_model: str,
                  system_prompt: str | None) -> JudgeEvidence:
    """Both models answer each held-out task; ALFRED scores every answer.

    In phases, not sample by sample: with one model resident, every change of model is
    a load, so the current model answers all tasks (and ALFRED scores them) before the
    candidate answers any: two model changes in all instead of two per sample.
    A model error on one sample is recorded and the sample skipped; a score ALFRED
    could not give leaves that pair unscored (no evidence).
    """
    ev = JudgeEvidence(asked=len(samples))
    rows: list[dict[str, Any]] = [{"task": s["user"]} for s in samples]
    verdicts: list[dict[str, Any]] = [{} for _ in samples]

    def msgs(row: dict[str, Any]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": row["task"]}]

    def phase(fn: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
        for row, verdict in zip(rows, verdicts):
            if "error" in row:
                continue
            try:
                fn(row, verdict)
            except Exception as e:  # one bad sample does not sink the gate; it is no evidence
                row["error"] = f"{type(e).__name__}: {e}"

    phase(lambda r, v: r.__setitem__("current_answer", chat(current_model, msgs(r))))
    phase(lambda r, v: v.__setitem__("a", judge.score(r["task"], r["current_answer"])))
    phase(lambda r, v: r.__setitem__("new_answer", chat(candidate_model, msgs(r))))
    phase(lambda r, v: v.__setitem__("b", judge.score(r["task"], r["new_answer"])))
    cur_scores: list[float] = []
    new_scores: list[float] = []
    for row, verdict in zip(rows, verdicts):
        if "error" not in row:
            a, b = verdict["a"], verdict["b"]
            row["current_score"], row["new_score"] = a.score, b.score
            row["errors"] = [x for x in (a.error, b.error) if x] or None
            if a.score is not None and b.score is not None:
                cur_scores.append(a.score)
                new_scores.append(b.score)
        ev.samples.append(row)
    ev.scored = len(cur_scores)
    if cur_scores:
        ev.current_mean = round(sum(cur_scores) / len(cur_scores), 3)
        ev.new_mean = round(sum(new_scores) / len(new_scores), 3)
    return ev


def _upper_diff(pairs: list[tuple[float, float]], rounds: int, seed: int = 0) -> float:
    """Upper confidence bound of the mean (new - current) judge score over the pairs."""
    d = np.asarray([b - a for a, b in pairs], dtype=np.float64)
    if d.size == 0:
        return 0.0
    if d.size == 1:
        return float(d[0])
    idx = np.random.default_rng(seed).integers(0, d.size, size=(int(rounds), d.size))
    return float(np.quantile(d[idx].mean(axis=1), 1.0 - (1.0 - CONFIDENCE) / 2.0))


def _finite(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
