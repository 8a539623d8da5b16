"""The evaluation data training never sees: the shipped capability suites and the
curator's held-out rows.

Why two parts. The gate used to hold out a slice of the very file it trained on, so
it only asked "did the model fit this data better" (ten rows of random words passed).
Now a candidate is judged on:

* the **capability suite** of its persona, shipped in ``config/eval/<PERSONA>.jsonl``
  (prompts with reference answers covering the persona's role); it must not get
  worse on it;
* the **held-out rows**: interactions the curator admitted but routed to
  ``<golden_dir>/eval.jsonl`` instead of the golden (training) set. The route is
  decided at admission from a hash of the task's text, so it is deterministic, the
  same task can never land in both, and the file is never archived: it is frozen
  evidence that every later fine-tune is measured on.

:func:`content_key` (in keys.py) is the one normaliser both the router and the fine-tuner's
leakage guard use.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import PROJECT_ROOT
from .keys import content_key as content_key  # its home is keys.py

SUITE_DIR = PROJECT_ROOT / "config" / "eval"
EVAL_FILE = "eval.jsonl"


class SuiteError(ValueError):
    """A capability-suite file is malformed; the message names the file and line."""


class SuiteItem(BaseModel):
    """One capability check: a prompt and the answer a capable persona would give."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=80)
    skill: str = Field(min_length=1, max_length=80)
    prompt: str = Field(min_length=1)
    reference: str = Field(min_length=1)


def routes_to_eval(key: str, fraction: float) -> bool:
    """Whether the row with this content key is held out (deterministic, ~``fraction``)."""
    if fraction <= 0:
        return False
    return int(key[:12], 16) / float(16 ** 12) < fraction


def load_suite(persona: str, root: Path | str | None = None) -> list[SuiteItem]:
    """The persona's capability suite (empty when the persona has none)."""
    path = Path(root or SUITE_DIR) / f"{persona.upper()}.jsonl"
    if not path.is_file():
        return []
    items: list[SuiteItem] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = SuiteItem.model_validate(json.loads(line))
        except (ValueError, ValidationError) as e:
            raise SuiteError(f"{path}:{n}: not a capability item ({e}); each line needs "
                             f"id, skill, prompt and reference") from None
        if item.id in seen:
            raise SuiteError(f"{path}:{n}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    return items


def row_task(row: dict[str, Any]) -> str:
    """The first user turn of a golden/eval row (what its content key is made from)."""
    for m in row.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def row_answer(row: dict[str, Any]) -> str:
    for m in reversed(row.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "assistant":
            return str(m.get("content") or "")
    return ""


class EvalSet:
    """The curator's held-out rows, append-only (``<golden_dir>/eval.jsonl``)."""

    def __init__(self, golden_dir: Path | str) -> None:
        self.path = Path(golden_dir) / EVAL_FILE
        self._lock = threading.Lock()

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row_task(row) and row_answer(row):
                out.append(row)
        return out

    def keys(self) -> set[str]:
        return {content_key(row_task(r)) for r in self.rows()}

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        rows = list(rows)
        if not rows:
            return 0
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
                fh.flush()
        return len(rows)

    def __len__(self) -> int:
        return len(self.rows())
