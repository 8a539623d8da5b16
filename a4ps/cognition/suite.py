"""The task suite: tasks with machine-checkable answers, and the runner that puts the
contrapunto and its baselines through them.

The suite lives in ``config/suite/tasks.jsonl``: one task a line, ``{"id", "kind",
"split", "text", "check"}``. ``kind`` is factual | arithmetic | conversion | reasoning |
empathy | format; ``split`` is ``tune`` (what generation settings and prompts may be
tuned on) or ``heldout`` (never used for tuning: every third task of each kind, 19 of
64). A ``check`` is one of:

* ``{"type": "regex", "pattern"}`` — the pattern is found in the answer;
* ``{"type": "numeric", "value", "tol"}`` — the answer's first number that is not in
  the task (number words count) is within ``tol`` (relative; 0 = exact);
* ``{"type": "words" | "sentences", "min", "max"}`` — length of the answer;
* ``{"type": "list", "min", "max"}`` — comma-separated items on the first line;
* ``{"type": "json", "schema", "pattern"}`` — the first ``{...}`` in the answer parses,
  conforms to the schema (:mod:`a4ps.models.schema`) and matches ``pattern``;
* ``{"type": "rubric", "items": [{"name", "pattern", "absent"}], "pass": n}`` — at least
  ``n`` rubric items hold (a pattern found, or for ``absent`` items not found);
* ``{"type": "all", "checks": [...]}`` — every sub-check passes.

:class:`SuiteRunner` runs one task in one *mode*: ``contrapunto`` (the whole graph,
ALFRED's route included, as a user gets it), ``single`` (one plain call of the same
model: ALFRED's system prompt and the task as given) or ``brick`` (BRICK's first turn
alone), each with the persona's own generation settings.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from a4ps.cognition import generation, prompts
from a4ps.cognition.answers import claims, repetition_cut, strip_repeats
from a4ps.config import PROJECT_ROOT
from a4ps.models.errors import DecisionError
from a4ps.models.schema import validate

if TYPE_CHECKING:
    from a4ps.cognition.graph import CognitiveGraph
    from a4ps.models.manager import ModelManager
    from a4ps.proto import ProtoManager

SUITE_PATH = PROJECT_ROOT / "config" / "suite" / "tasks.jsonl"
MODES = ("contrapunto", "single", "brick")
KINDS = ("factual", "arithmetic", "conversion", "reasoning", "empathy", "format")
SPLITS = ("tune", "heldout")
CHECKS = ("regex", "numeric", "words", "sentences", "list", "json", "rubric", "all")


class SuiteError(ValueError):
    """A suite file or task that cannot be used; the message names the line and the fix."""


@dataclass(frozen=True)
class SuiteTask:
    id: str
    kind: str
    split: str
    text: str
    check: dict[str, Any]


@dataclass
class Verdict:
    passed: bool
    score: float            # 1.0/0.0, or the fraction of rubric items that hold
    detail: str


def load_suite(path: Path | str | None = None, *, split: str | None = None,
               kinds: list[str] | None = None) -> list[SuiteTask]:
    """The suite's tasks (optionally one split, some kinds), every check validated."""
    path = Path(path or SUITE_PATH)
    tasks, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            task = SuiteTask(str(raw["id"]), raw["kind"], raw["split"], raw["text"],
                             raw["check"])
        except (ValueError, KeyError, TypeError) as e:
            raise SuiteError(f"{path}:{n}: not a task ({e}); each line is a JSON object "
                             "with id, kind, split, text and check") from None
        if task.kind not in KINDS or task.split not in SPLITS or task.id in seen:
            raise SuiteError(f"{path}:{n}: kind must be one of {KINDS}, split one of "
                             f"{SPLITS}, and ids unique (got {task.kind!r}, {task.split!r}, "
                             f"{task.id!r})")
        _check_check(task.check, f"{path}:{n}")
        seen.add(task.id)
        if (split is None or task.split == split) and (not kinds or task.kind in kinds):
            tasks.append(task)
    return tasks


def _check_check(check: Any, where: str) -> None:
    if not isinstance(check, dict) or check.get("type") not in CHECKS:
        raise SuiteError(f"{where}: check type must be one of {CHECKS}, got {check!r}")
    if check["type"] == "all":
        for sub in check.get("checks") or []:
            _check_check(sub, where)
    for key in ("pattern",):
        if key in check:
            re.compile(check[key])
    for item in check.get("items") or []:
        re.compile(item["pattern"])


# -- checks ---------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}


def numbers_in(text: str) -> list[float]:
    """Numbers in reading order, digits and the words zero..twenty."""
    out: list[tuple[int, float]] = []
    for m in _NUMBER.finditer(text):
        out.append((m.start(), float(m.group(0).replace(",", ""))))
    for m in re.finditer(r"(?i)\b(" + "|".join(_NUMBER_WORDS) + r")\b", text):
        out.append((m.start(), float(_NUMBER_WORDS[m.group(1).lower()])))
    return [v for _, v in sorted(out)]


def check_answer(task: SuiteTask, answer: str) -> Verdict:
    """Whether ``answer`` passes ``task``'s check. A repeat at the end is ignored, and
    so is the task's own text echoed back (it must not earn rubric or regex credit)."""
    text = strip_repeats(answer or "")
    text = re.sub(re.escape(task.text.strip()), " ", text, flags=re.I).strip()
    return _check(task.check, text, task.text)


def _check(check: dict[str, Any], answer: str, task_text: str) -> Verdict:
    kind = check["type"]
    if not answer:
        return Verdict(False, 0.0, "no answer")
    if kind == "regex":
        ok = re.search(check["pattern"], answer) is not None
        return Verdict(ok, float(ok), f"/{check['pattern']}/ {'found' if ok else 'not found'}")
    if kind == "numeric":
        asked = set(numbers_in(task_text))
        head = " ".join(claims(answer, limit=2)) or answer
        found = [x for x in numbers_in(head) if x not in asked] or numbers_in(head)
        if not found:
            return Verdict(False, 0.0, "no number in the answer")
        want, tol = float(check["value"]), float(check.get("tol", 0.0))
        ok = abs(found[0] - want) <= tol * max(1.0, abs(want)) + 1e-9
        return Verdict(ok, float(ok), f"{found[0]:g} vs {want:g} (tol {tol:g})")
    if kind in ("words", "sentences"):
        n = len(re.findall(r"[\w'’-]+", answer)) if kind == "words" else len(
            [s for s in re.split(r"(?<=[.!?])\s+|\n+", answer) if s.strip()])
        ok = check.get("min", 0) <= n <= check.get("max", 10**9)
        return Verdict(ok, float(ok), f"{n} {kind}")
    if kind == "list":
        first = answer.strip().splitlines()[0]
        items = [x for x in re.split(r",|\band\b", first) if re.search(r"\w", x)]
        ok = check.get("min", 0) <= len(items) <= check.get("max", 10**9)
        return Verdict(ok, float(ok), f"{len(items)} items")
    if kind == "json":
        return _check_json(check, answer)
    if kind == "rubric":
        held = [it["name"] for it in check["items"]
                if (re.search(it["pattern"], answer) is None) == bool(it.get("absent"))]
        need = int(check.get("pass", len(check["items"])))
        return Verdict(len(held) >= need, len(held) / len(check["items"]),
                       f"{len(held)}/{len(check['items'])} rubric items: {', '.join(held)}")
    if kind == "all":
        verdicts = [_check(c, answer, task_text) for c in check["checks"]]
        ok = all(v.passed for v in verdicts)
        return Verdict(ok, float(ok), "; ".join(v.detail for v in verdicts))
    raise SuiteError(f"unknown check type {kind!r}")


def _check_json(check: dict[str, Any], answer: str) -> Verdict:
    m = re.search(r"\{.*?\}", answer, re.S)
    if not m:
        return Verdict(False, 0.0, "no JSON object in the answer")
    try:
        value = json.loads(m.group(0))
        validate(value, check["schema"])
    except (ValueError, DecisionError) as e:
        return Verdict(False, 0.0, f"JSON: {e}")
    if check.get("pattern") and not re.search(check["pattern"], m.group(0)):
        return Verdict(False, 0.0, f"JSON lacks /{check['pattern']}/")
    return Verdict(True, 1.0, "JSON conforms")


# -- running ----------------------------------------------------------------------------

class SuiteRunner:
    """Runs suite tasks in a mode over one graph, its models and its persona protos."""

    def __init__(self, graph: CognitiveGraph, models: ModelManager, protos: ProtoManager) -> None:
        self.graph = graph
        self.models = models
        self.protos = protos
        self._n = 0

    def run(self, task: SuiteTask, mode: str) -> dict[str, Any]:
        """One task in one mode: the answer, its verdict and what it cost."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self._n += 1
        t0 = time.perf_counter()
        if mode == "contrapunto":
            out = self._contrapunto(task)
        else:
            out = self._alone(task, "ALFRED" if mode == "single" else "BRICK")
        out["wall_s"] = time.perf_counter() - t0
        verdict = check_answer(task, out["answer"])
        out.update(id=task.id, kind=task.kind, split=task.split, mode=mode,
                   passed=verdict.passed, score=verdict.score, detail=verdict.detail)
        out["repetition_filled"] = [t["persona"] for t in out["turns"]
                                    if t.get("finish") == "length"
                                    and repetition_cut(t.get("text") or "") is not None]
        return out

    def _contrapunto(self, task: SuiteTask) -> dict[str, Any]:
        r = self.graph.run(f"suite-{self._n}-{task.id}", task.text)
        source = r.get("answer_source") or ""
        return {"answer": r.get("answer") or "", "status": r.get("status"),
                "tokens": r.get("tokens", 0), "turns": r.get("turns") or [],
                "decisions": r.get("decisions") or [], "route": r.get("route"),
                "source": source, "fallback": source.startswith("fallback"),
                "rounds": len(r.get("rounds") or []), "stop": r.get("stop"),
                "tool": r.get("tool"), "problems": r.get("problems") or []}

    def _alone(self, task: SuiteTask, persona: str) -> dict[str, Any]:
        proto = self.protos.get(persona)
        if persona == "ALFRED":       # one plain call: ALFRED's system prompt, the task
            messages = prompts.plain_messages(proto, task.text)
        else:
            messages = prompts.brick_messages(proto, task.text, memories=[], robin_said=None,
                                              tool_result=None)
        gen = generation.settings_of(proto, max_tokens=self.graph.turn_max_tokens)
        try:
            g = self.models.generate(proto.model_name, messages, **gen)
            text, tokens, finish, problem = g.text, g.tokens, g.finish, None
        except Exception as e:      # the baseline's failure is its own result
            text, tokens, finish, problem = "", 0, None, f"{type(e).__name__}: {e}"
        return {"answer": text, "status": "ok" if text.strip() else "failed",
                "tokens": tokens, "decisions": [], "route": None, "source": persona.lower(),
                "fallback": False, "rounds": 0, "stop": None, "tool": None,
                "turns": [{"persona": persona, "text": text, "finish": finish}],
                "problems": [problem] if problem else []}
