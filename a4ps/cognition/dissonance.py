"""Dissonance: how far apart two utterances are, as a number in [0, 1].

The contrapunto loop (BRICK <-> ROBIN) stops once their latest contributions have
converged. We measure that as ``1 - cosine similarity`` of the two sentence
embeddings, clamped to [0, 1]: identical meaning -> 0, unrelated -> ~1. Opposed
vectors (cosine < 0) would give up to 2; we clamp because "more than unrelated" is not
a useful distinction for deciding whether to keep talking, and callers compare the
value against thresholds in [0, 1] (settings.cognition.dissonance_threshold/_high).

An empty (or whitespace-only) utterance counts as maximal dissonance 1.0: a persona
that said nothing has not agreed with anything, so the loop must not treat silence as
convergence and stop early on a model that returned nothing. The embedder is not even
asked in that case (an empty string embeds to some arbitrary vector).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from a4ps.models.embeddings import Embedder  # the seam, owned by the models part

MAX_DISSONANCE = 1.0


def dissonance(vec_a: Sequence[float] | np.ndarray, vec_b: Sequence[float] | np.ndarray) -> float:
    """``1 - cosine(vec_a, vec_b)`` clamped to [0, 1].

    The vectors need not be normalised. A zero vector or a non-finite value (a broken
    embedding) gives 1.0 rather than NaN, so a bad model cannot fake convergence.
    """
    a = np.asarray(vec_a, dtype=np.float64).ravel()
    b = np.asarray(vec_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"dissonance: vectors differ in size ({a.size} vs {b.size}); "
                         "both must come from the same embedder")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if not (np.isfinite(na) and np.isfinite(nb)) or na == 0.0 or nb == 0.0:
        return MAX_DISSONANCE
    cos = float(np.dot(a, b) / (na * nb))
    if not np.isfinite(cos):
        return MAX_DISSONANCE
    return float(min(MAX_DISSONANCE, max(0.0, 1.0 - cos)))


def _blank(text: Any) -> bool:
    return not isinstance(text, str) or not text.strip()


class DissonanceMeter:
    """Embeds two texts with the shared embedder and returns their dissonance."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    def between(self, text_a: str, text_b: str) -> float:
        """Dissonance of two utterances; 1.0 if either is empty (see module doc)."""
        if _blank(text_a) or _blank(text_b):
            return MAX_DISSONANCE
        vecs = np.asarray(self.embedder.embed([text_a, text_b]), dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != 2:
            raise ValueError(f"embedder returned shape {vecs.shape} for 2 texts; "
                             "expected (2, dim)")
        return dissonance(vecs[0], vecs[1])
