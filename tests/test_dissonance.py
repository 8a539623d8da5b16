"""Dissonance: 1 - cosine, clamped to [0, 1]; silence is never agreement."""
from __future__ import annotations

import numpy as np
import pytest

from a4ps.cognition.dissonance import DissonanceMeter, dissonance


class CountingEmbedder:
    """Tiny deterministic bag-of-words embedder that counts its calls."""

    dim = 16

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % self.dim] += 1.0
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(n > 0, n, 1.0)


def test_identical_orthogonal_opposite():
    a = np.array([1.0, 0.0, 0.0])
    assert dissonance(a, a) == pytest.approx(0.0, abs=1e-7)
    assert dissonance(a, [0.0, 1.0, 0.0]) == pytest.approx(1.0)
    assert dissonance(a, -a) == 1.0          # cosine -1 would give 2: clamped
    assert dissonance(a, [1.0, 1.0, 0.0]) == pytest.approx(1 - 1 / np.sqrt(2))


def test_scale_invariant_and_bounded():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.standard_normal(32), rng.standard_normal(32)
        d = dissonance(a, b)
        assert 0.0 <= d <= 1.0
        assert dissonance(3 * a, 0.5 * b) == pytest.approx(d, abs=1e-9)


def test_broken_vectors_are_maximal_not_nan():
    assert dissonance([0, 0, 0], [1, 0, 0]) == 1.0
    assert dissonance([np.nan, 1, 0], [1, 0, 0]) == 1.0
    assert dissonance([np.inf, 1, 0], [1, 0, 0]) == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        dissonance([1, 0], [1, 0, 0])


def test_meter_between_texts():
    emb = CountingEmbedder()
    m = DissonanceMeter(emb)
    same = m.between("logic demands rigor", "logic demands rigor")
    close = m.between("logic demands rigor", "logic demands care")
    far = m.between("logic demands rigor", "sunny meadow picnic")
    assert same == pytest.approx(0.0, abs=1e-6)
    assert same < close < far <= 1.0


def test_empty_text_is_maximal_without_embedding():
    emb = CountingEmbedder()
    m = DissonanceMeter(emb)
    assert m.between("", "anything") == 1.0
    assert m.between("anything", "   \n") == 1.0
    assert m.between("", "") == 1.0           # two silences have not converged
    assert m.between(None, "x") == 1.0        # type: ignore[arg-type]
    assert emb.calls == 0


def test_meter_rejects_bad_embedder_shape():
    class Bad:
        dim = 4

        def embed(self, texts):
            return np.zeros((1, 4), dtype=np.float32)

    with pytest.raises(ValueError, match="expected \\(2, dim\\)"):
        DissonanceMeter(Bad()).between("a", "b")


@pytest.mark.slow
def test_real_minilm_paraphrase_closer_than_unrelated(minilm):
    """The product's MiniLM embedder (the session's shared one: loaded once)."""
    m = DissonanceMeter(minilm)
    para = m.between("The cat sat on the mat.", "A cat was sitting on the mat.")
    unrelated = m.between("The cat sat on the mat.", "Quarterly tax filings are due in April.")
    assert 0.0 <= para < 0.3
    assert unrelated > 0.6
    assert unrelated <= 1.0
