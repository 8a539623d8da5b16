"""The fine-tune errors, apart from the trainer, so the daemon and CLI can catch them
without importing the fine-tune machinery (tests/test_import_cost.py)."""
from __future__ import annotations


class FinetuneError(RuntimeError):
    """A fine-tune request that cannot run as asked; the message says what to do."""
