"""The philosopher's clustering threshold, chosen from data rather than guessed.

Two tasks are "the same kind of question" when their embeddings' cosine reaches
``philosopher.similarity``. The old 0.75 missed close paraphrases (0.72-0.80 with
MiniLM). :func:`similarity_report` measures, with the embedder the system ships, the
cosine of

* paraphrase pairs: the same dilemma reworded (``config/eval/paraphrases.jsonl``),
* different dilemmas of the same genre (pairs across those groups),
* unrelated tasks (``config/eval/unrelated.jsonl`` against everything),

and :func:`choose_threshold` picks the lowest threshold at which at most
``max_false_merge`` of the non-paraphrase pairs would be merged (a false merge makes
the philosopher draft an amendment from unrelated evidence, which a human then has to
read and reject; a missed paraphrase only delays a proposal). ``bench/bench_selfimprove.py``
prints the report; the shipped default is what it chose.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fine_tuning.eval_set import SUITE_DIR
from ..models.embeddings import Embedder

MAX_FALSE_MERGE = 0.001


def load_calibration(root: Path | str | None = None) -> tuple[list[list[str]], list[str]]:
    """(paraphrase groups, unrelated tasks) shipped in ``config/eval``."""
    root = Path(root or SUITE_DIR)
    groups = [json.loads(l)["tasks"] for l in
              (root / "paraphrases.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    unrelated = [json.loads(l)["task"] for l in
                 (root / "unrelated.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    return groups, unrelated


@dataclass
class SimilarityReport:
    paraphrase: list[float] = field(default_factory=list)
    other_dilemma: list[float] = field(default_factory=list)
    unrelated: list[float] = field(default_factory=list)

    @property
    def negatives(self) -> list[float]:
        return self.other_dilemma + self.unrelated

    def summary(self) -> dict[str, dict[str, float]]:
        """min / p5 / p25 / median / p75 / p95 / max of each kind of pair."""
        out = {}
        for name in ("paraphrase", "other_dilemma", "unrelated"):
            x = np.asarray(getattr(self, name))
            q = np.percentile(x, [5, 25, 50, 75, 95])
            out[name] = {"n": int(x.size), "min": float(x.min()), "p5": float(q[0]),
                         "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
                         "p95": float(q[4]), "max": float(x.max())}
        return out

    def rates(self, threshold: float) -> tuple[float, float]:
        """(share of paraphrase pairs merged, share of other pairs merged) at a threshold."""
        pos, neg = np.asarray(self.paraphrase), np.asarray(self.negatives)
        return float((pos >= threshold).mean()), float((neg >= threshold).mean())


def similarity_report(embedder: Embedder, groups: list[list[str]], unrelated: list[str]
                      ) -> SimilarityReport:
    texts = [t for g in groups for t in g] + list(unrelated)
    vecs = np.asarray(embedder.embed(texts), dtype=np.float64)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    at = {t: vecs[i] for i, t in enumerate(texts)}

    def cos(a: str, b: str) -> float:
        return float(at[a] @ at[b])

    rep = SimilarityReport()
    rep.paraphrase = [cos(a, b) for g in groups for a, b in itertools.combinations(g, 2)]
    rep.other_dilemma = [cos(a, b) for g1, g2 in itertools.combinations(groups, 2)
                         for a in g1 for b in g2]
    dilemmas = [t for g in groups for t in g]
    rep.unrelated = ([cos(a, b) for a in dilemmas for b in unrelated]
                     + [cos(a, b) for a, b in itertools.combinations(unrelated, 2)])
    return rep


def choose_threshold(report: SimilarityReport, max_false_merge: float = MAX_FALSE_MERGE,
                     step: float = 0.01) -> float:
    """The lowest threshold (on a ``step`` grid) merging at most ``max_false_merge``."""
    for t in np.arange(0.0, 1.0 + step / 2, step):
        if report.rates(float(t))[1] <= max_false_merge:
            return round(float(t), 2)
    return 1.0
