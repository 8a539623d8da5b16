"""Typed model errors, so callers can branch on what went wrong.

Every message says what to do next. ``ModelError`` is the root; the cognitive graph
catches it per node and records the failure instead of crashing the daemon.
"""
from __future__ import annotations


class ModelError(RuntimeError):
    """Anything that stopped a model from loading, answering or embedding."""


class BackendUnavailable(ModelError):
    """The backend cannot be reached (e.g. Ollama is not running)."""


class ModelNotFound(ModelError):
    """The backend does not know the model id (e.g. not pulled into Ollama)."""


class ModelTimeout(ModelError):
    """The backend did not answer within the configured timeout."""


class ModelTooLarge(ModelError):
    """The model would not fit in the configured memory budget."""


class ModelLoadError(ModelError):
    """The model files exist but could not be loaded (corrupt cache, bad adapter)."""


class InvalidRequest(ModelError, ValueError):
    """The caller passed something unusable (empty messages, unknown role, ...)."""


class GenerationCancelled(ModelError):
    """The caller's cancel token was set while the model was generating."""


class DecisionError(ModelError):
    """A decision (choose/structured) produced nothing valid: treat it as no decision."""
