"""The one normaliser of a task's text, apart from the eval data, so the motivator (in
the daemon) can key goals without importing settings (tests/test_import_cost.py)."""
from __future__ import annotations

import hashlib
import re
from typing import Any


def content_key(text: Any) -> str:
    """A stable key for a task's text: case, spacing and punctuation do not matter."""
    norm = " ".join(re.sub(r"[^\w\s]", " ", str(text or "").lower()).split())
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()
