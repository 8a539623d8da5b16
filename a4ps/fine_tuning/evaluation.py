"""ALFRED as judge, and the evaluation gate a new adapter must pass before a swap.

The seed swapped a freshly tuned model in blindly. Here a candidate replaces the
live model only if it is not worse on held-out golden samples: by answer loss
(computed in the training child, where the weights are) and, where ALFRED gives
parseable scores, by ALFRED's judgement of both models' answers to a few held-out
tasks. Both numbers are recorded either way.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

SCORE_MIN, SCORE_MAX = 1.0, 5.0
CANDIDATES = ("BRICK", "ROBIN")
# A candidate may score this much lower than the live model with ALFRED and still
# pass: a 135M judge is noisy, the loss on held-out answers is the primary criterion.
JUDGE_TOLERANCE = 0.5

RUBRIC = """You are ALFRED, steward of this system, judging one past interaction.
Rate the final answer from 1.0 to 5.0 on this fixed rubric:
- logical rigour: is the reasoning sound and free of errors?
- creative synthesis: does it join the analytical and the human view into something new?
- task efficacy: does it actually accomplish what the task asked?
Reply in exactly this form:
SCORE: <a number from 1.0 to 5.0>
CRITICAL: <BRICK or ROBIN, whichever persona's contribution mattered more>"""

ANSWER_RUBRIC = """You are ALFRED, judging an answer to a task.
Rate it from 1.0 to 5.0 for logical rigour, creative synthesis and task efficacy.
Reply in exactly this form:
SCORE: <a number from 1.0 to 5.0>"""

_NUM = r"(\d+(?:[.,]\d+)?)"
_LABELLED = re.compile(r"\b(?:score|rating|rated|grade)\b\s*(?:is|of|=|:)?\s*[:=]?\s*\**\s*" + _NUM,
                       re.IGNORECASE)
_ANY_NUM = re.compile(r"(?<![\w.])" + _NUM)
_CRITICAL = re.compile(r"\bcritical\b\W{0,10}(BRICK|ROBIN)\b", re.IGNORECASE)


def parse_score(reply: Any) -> float | None:
    """The judge's score in [1, 5], or None when the reply holds none.

    A labelled number (``Score: 4``) wins; otherwise the first number in the reply.
    A number outside 1..5 (``7``, ``8/10``) scores nothing: guessing a scale would
    let a confused judge push noise into the golden set.
    """
    if not isinstance(reply, str) or not reply.strip():
        return None
    m = _LABELLED.search(reply) or _ANY_NUM.search(reply)
    if m is None:
        return None
    try:
        value = float(m.group(1).replace(",", "."))
    except ValueError:
        return None
    if math.isnan(value) or not SCORE_MIN <= value <= SCORE_MAX:
        return None
    return value


def parse_vote(reply: Any) -> str | None:
    """Which persona ALFRED named as more critical (BRICK/ROBIN), or None."""
    if not isinstance(reply, str):
        return None
    m = _CRITICAL.search(reply)
    if m:
        return m.group(1).upper()
    named = {c for c in CANDIDATES if re.search(rf"\b{c}\b", reply, re.IGNORECASE)}
    return named.pop() if len(named) == 1 else None


def interaction_prompt(task: str, answer: str, turns: dict[str, str] | None = None,
                       limit: int = 1500) -> str:
    """The judge prompt for one interaction (long texts are cut to keep it small)."""
    parts = [RUBRIC, "", f"TASK:\n{_cut(task, limit)}"]
    for who, text in (turns or {}).items():
        if text:
            parts.append(f"{who.upper()} SAID:\n{_cut(text, limit)}")
    parts.append(f"FINAL ANSWER:\n{_cut(answer, limit)}")
    return "\n\n".join(parts)


def answer_prompt(task: str, answer: str, limit: int = 1500) -> str:
    return f"{ANSWER_RUBRIC}\n\nTASK:\n{_cut(task, limit)}\n\nANSWER:\n{_cut(answer, limit)}"


def _cut(text: Any, limit: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + " [...]"


@dataclass
class Comparison:
    """The gate's numbers for one candidate against the live model."""

    current_model: str
    candidate_model: str
    current_loss: float | None = None
    new_loss: float | None = None
    current_ppl: float | None = None
    new_ppl: float | None = None
    heldout_size: int = 0
    judge_current: float | None = None      # mean ALFRED score, None = no parseable score
    judge_new: float | None = None
    judge_samples: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(cmp: Comparison, max_loss_regression: float = 0.0,
           judge_tolerance: float = JUDGE_TOLERANCE) -> Comparison:
    """Fill ``passed``/``reason``: the candidate must not be worse than the live model."""
    reasons = []
    ok = True
    if cmp.new_loss is None or cmp.current_loss is None or _nan(cmp.new_loss) or _nan(cmp.current_loss):
        ok = False
        reasons.append("no held-out loss to compare")
    else:
        limit = cmp.current_loss * (1.0 + max_loss_regression)
        if cmp.new_loss > limit + 1e-9:
            ok = False
            reasons.append(f"held-out loss got worse ({cmp.current_loss:.4f} -> {cmp.new_loss:.4f})")
        else:
            reasons.append(f"held-out loss {cmp.current_loss:.4f} -> {cmp.new_loss:.4f}")
    if cmp.judge_current is not None and cmp.judge_new is not None:
        if cmp.judge_new < cmp.judge_current - judge_tolerance:
            ok = False
            reasons.append(f"ALFRED scored it lower ({cmp.judge_current:.2f} -> {cmp.judge_new:.2f})")
        else:
            reasons.append(f"ALFRED {cmp.judge_current:.2f} -> {cmp.judge_new:.2f}")
    else:
        reasons.append("ALFRED's judgement inconclusive (no parseable scores for both)")
    cmp.passed = ok
    cmp.reason = "; ".join(reasons)
    return cmp


def judge_answers(judge: Callable[[str], str], chat: Callable[[str, list[dict[str, str]]], str],
                  samples: list[dict[str, str]], current_model: str, candidate_model: str,
                  system_prompt: str | None) -> tuple[float | None, float | None, list[dict[str, Any]]]:
    """Both models answer each held-out task; ALFRED scores every answer.

    Returns (mean current score, mean candidate score, details). A model or judge
    error on one sample is recorded and skipped.
    """
    cur_scores: list[float] = []
    new_scores: list[float] = []
    details: list[dict[str, Any]] = []
    for s in samples:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": s["user"]}]
        row: dict[str, Any] = {"task": s["user"]}
        try:
            row["current_answer"] = chat(current_model, msgs)
            row["new_answer"] = chat(candidate_model, msgs)
            row["current_score"] = parse_score(judge(answer_prompt(s["user"], row["current_answer"])))
            row["new_score"] = parse_score(judge(answer_prompt(s["user"], row["new_answer"])))
        except Exception as e:  # one bad sample does not sink the gate
            row["error"] = f"{type(e).__name__}: {e}"
            details.append(row)
            continue
        if row["current_score"] is not None and row["new_score"] is not None:
            cur_scores.append(row["current_score"])
            new_scores.append(row["new_score"])
        details.append(row)
    mean = (lambda xs: round(sum(xs) / len(xs), 3) if xs else None)
    return mean(cur_scores), mean(new_scores), details


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)
