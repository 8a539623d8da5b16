"""Embedders: the real MiniLM (384-d, semantic) and the HashEmbedder stand-in."""
from __future__ import annotations

import numpy as np
import pytest

from a4ps.models.embeddings import HashEmbedder, MiniLMEmbedder, make_embedder


def test_hash_embedder_is_deterministic_normalised_and_lexical():
    e = HashEmbedder(dim=384)
    v = e.embed(["the cat sat on the mat", "the cat sat on a mat", "quarterly tax filing"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert v[0] @ v[1] > v[0] @ v[2]
    assert np.array_equal(e.embed(["the cat sat on the mat"])[0], v[0])
    assert HashEmbedder(dim=64).embed(["x"]).shape == (1, 64)


def test_make_embedder_default_is_minilm(settings):
    emb = make_embedder(settings)
    assert isinstance(emb, MiniLMEmbedder) and emb.dim == 384


@pytest.mark.slow
def test_minilm_384d_and_semantic():
    e = MiniLMEmbedder(batch_size=16)
    v = e.embed(["A man is playing a guitar.",
                 "Someone strums a guitar on stage.",
                 "The central bank raised interest rates."])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim_close, sim_far = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert sim_close > sim_far + 0.3, (sim_close, sim_far)
    assert e.embed([]).shape == (0, 384)
