"""ALFRED as judge, asked in a form the machine can read.

The judge used to answer in free text ("SCORE: <n>") and a lenient parser took the
first number it saw: ``-1`` became 1.0, ``4/10`` 4.0, an echo of the rubric 1.0 and
"The final answer is 4." a score of 4. With the embedded model, most replies held no
score at all. Now both decisions go through the model seam's constrained path:

* the score is ``ModelManager.choose`` over ``"1".."5"`` (scored/constrained by the
  backend: the model cannot answer outside the scale);
* the persona vote is ``choose`` over ``["BRICK", "ROBIN"]``.

A decision that fails (:class:`~a4ps.models.errors.DecisionError`, a model error) is
*no evidence*: ``score`` is None and callers must never read that as a pass.

A constrained judge can still be a blind one. On SmolLM2-135M the 1..5 choice scored
5 for nearly everything (tests/judge_cases.py: pairwise accuracy 0.52, AUROC 0.52
between right answers and wrong, off-topic, empty, looping, refusing or echoing
ones). So the score is now built from what such a model *can* tell:

1. cheap checks first (:mod:`.judge_checks`): empty, repetition loop, task echo,
   refusal, a wrongly stated sum (``arithmetic``) and off topic by MiniLM similarity
   cap it at 1; one word (``terse``) and prose cut off mid-sentence (``unfinished``)
   at 2. A failed check caps the score and says why (``Verdict.flags`` /
   ``Verdict.reason``); a hard failure (cap 1) is decided without asking the model
   at all;
2. on a backend that *scores* options (the embedded one), the **grounding**: how much
   more likely the judge model finds the answer as a reply to the task than as a reply
   to nothing (``choose`` over the single option ``answer``, whose calibrated score is
   log P(answer | task) - log P(answer | "N/A"), in nats). Off-topic and refusing
   answers score below 0; right answers above wrong ones for the same task in 83%
   of pairs. Mapped to 1..5 by :func:`grounding_score` (about 12 nats scores 4);
3. on a backend that only *picks* (Ollama, OpenAI-compatible: ``Choice.scores`` is
   empty), the rubric's 1..5 choice as before: a large model can read a rubric.

The score is capped by the checks in every case. ``Verdict.method`` says which
evidence gave it (``checks``, ``grounding``, ``choose:<method>``).

What grounding cannot do: tell a wrong fact from a right one in absolute terms (the
threshold keeps most fluent wrong answers), or doubt the model's *own* answers (a
greedy answer is the likeliest reply by construction: SmolLM2's "7 * 8 = 54" grounds
at 5.0, which is why the checks read sums). bench/bench_selfimprove.py --only judge
prints both sides.

:func:`parse_score` / :func:`parse_vote` stay for the free text that still reaches us
(a backend reply read by hand, the bench's "before" column); they are strict: one
score in the stated scale or nothing.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..models.base import Choice
from ..models.errors import DecisionError, GenerationCancelled
from . import judge_checks

if TYPE_CHECKING:
    from ..models.base import CancelToken
    from ..models.embeddings import Embedder
    from ..models.manager import ModelManager
    from ..proto import ProtoManager

log = logging.getLogger(__name__)

SCORE_MIN, SCORE_MAX = 1.0, 5.0
SCORE_OPTIONS = ("1", "2", "3", "4", "5")
CANDIDATES = ("BRICK", "ROBIN")
JUDGE = "ALFRED"

RUBRIC = """You are judging one past interaction of a team of assistants.
Rate the final answer on this fixed rubric:
- logical rigour: is the reasoning sound and free of errors?
- creative synthesis: does it join the analytical and the human view into something new?
- task efficacy: does it actually accomplish what the task asked?"""

SCORE_QUESTION = ("How good is the final answer? Answer with one digit: 1 (useless), "
                  "2 (poor), 3 (fair), 4 (good) or 5 (excellent).")
VOTE_QUESTION = ("Whose contribution mattered more to the final answer: BRICK (the logical "
                 "view) or ROBIN (the empathetic view)? Answer with one name.")

# The free-text form of the rubric (what the judge was asked before; the bench's
# "before" column asks it again to measure how often such replies can be read).
FREE_TEXT_FORM = """Reply in exactly this form:
SCORE: <a number from 1.0 to 5.0>
CRITICAL: <BRICK or ROBIN, whichever persona's contribution mattered more>"""


# -- strict reading of free text ----------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])([+-]?)(\d+(?:\.\d+)?)(?![\w]|\.\d)")
_SCALE = re.compile(r"\b1(?:\.0)?\s*(?:-|–|to)\s*5(?:\.0)?\b", re.IGNORECASE)
_DENOMINATOR = re.compile(r"(?:/|\bout\s+of)\s*$", re.IGNORECASE)
_OUT_OF = re.compile(r"^\s*(?:/|out\s+of\b)\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_LABEL = re.compile(r"(?:\bscore[sd]?\b|\brating\b|\brated?\b(?:\s+it\b)?|\bgrade\b|"
                    r"\bgive\s+it\b|\bi\s+give\b)\s*(?:is|of|=|:|a|an|at)?\s*[:=]?\s*\**\s*$",
                    re.IGNORECASE)
_ECHO = re.compile(r"<[^>]*>|\ba number from\b", re.IGNORECASE)
_BARE = re.compile(r"[*_`#>\s\"']*\+?\d+(?:\.\d+)?[*_`\s\"'.]*")


def parse_score(reply: Any) -> float | None:
    """The one score in [1, 5] a free-text reply states, or None.

    Accepted: a bare number (``4``, ``**4.5**``), or a number labelled as the score
    (``SCORE: 4``, ``I rate it 4 out of 5``, ``4/5``). Nothing is read from a reply
    that echoes the rubric's template, holds a number out of the scale (``0``, ``7``,
    ``-1``), another scale (``4/10``), or any second number (``I give it 4. Actually
    2.``), or a number not given as the score ("The final answer is 4."): guessing
    would let a confused judge push noise into the golden set.
    """
    if not isinstance(reply, str) or not reply.strip() or _ECHO.search(reply):
        return None
    text = _SCALE.sub(" ", reply)                       # "on a 1-5 scale" is not a score
    values: set[float] = set()
    labelled = False
    for m in _NUMBER.finditer(text):
        before = text[:m.start()]
        if _DENOMINATOR.search(before):
            continue                                    # the "5" of "4/5", checked below
        if m.group(1) == "-":
            return None                                 # negative: never a score
        after = _OUT_OF.match(text[m.end():])
        if after and float(after.group(1)) != SCORE_MAX:
            return None                                 # 4/10: another scale
        labelled = labelled or bool(after) or bool(_LABEL.search(before[-40:]))
        values.add(float(m.group(2)))
    if len(values) != 1:
        return None                                     # none, or two different numbers
    value = values.pop()
    if not labelled and not _BARE.fullmatch(text):
        return None                                     # a number, but not given as the score
    if math.isnan(value) or not SCORE_MIN <= value <= SCORE_MAX:
        return None
    return value


_CRITICAL = re.compile(r"\bcritical\b\W{0,10}(BRICK|ROBIN)\b", re.IGNORECASE)


def parse_vote(reply: Any) -> str | None:
    """Which persona a free-text reply names as more critical (BRICK/ROBIN), or None.

    ``CRITICAL: ROBIN`` or a reply naming exactly one of them; a template echo
    (``<BRICK or ROBIN>``) or a reply naming both is no vote.
    """
    if not isinstance(reply, str) or _ECHO.search(reply):
        return None
    labelled = {m.group(1).upper() for m in _CRITICAL.finditer(reply)}
    if len(labelled) == 1:
        return labelled.pop()
    if labelled:
        return None
    named = {c for c in CANDIDATES if re.search(rf"\b{c}\b", reply, re.IGNORECASE)}
    return named.pop() if len(named) == 1 else None


# -- asking under constraint ----------------------------------------------------------------

@dataclass
class Verdict:
    """One judgement. ``score`` None means no evidence (``error`` says why)."""

    score: float | None = None
    vote: str | None = None
    method: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    flags: list[str] = field(default_factory=list)    # the cheap checks that failed
    reason: str | None = None                         # why the score was capped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cut(text: Any, limit: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[:limit] + " [...]"


def interaction_text(task: str, answer: str, turns: dict[str, str] | None = None,
                     limit: int = 1200) -> str:
    """The evidence the judge reads: the task, the persona turns, the final answer."""
    parts = [RUBRIC, f"TASK:\n{_cut(task, limit)}"]
    for who, text in (turns or {}).items():
        if text:
            parts.append(f"{who.upper()} SAID:\n{_cut(text, limit)}")
    parts.append(f"FINAL ANSWER:\n{_cut(answer, limit)}")
    return "\n\n".join(parts)


def score_messages(system_prompt: str | None, task: str, answer: str,
                   turns: dict[str, str] | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": interaction_text(task, answer, turns)
                 + "\n\n" + SCORE_QUESTION})
    return msgs


def vote_messages(system_prompt: str | None, task: str, answer: str,
                  turns: dict[str, str] | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": interaction_text(task, answer, turns)
                 + "\n\n" + VOTE_QUESTION})
    return msgs


#: grounding (nats) -> score: 1 + 4 * sigmoid((g - CENTER) / SCALE). A grounding of 0
#: (the task makes the answer no likelier) scores 1.5; about 12.4 nats scores 4.0 (the
#: curator's default threshold); measured on tests/judge_cases.py, where right answers
#: ground 9.7..44 nats, wrong ones 8.4..34 and off-topic ones -14..-2.
GROUNDING_CENTER, GROUNDING_SCALE = 8.0, 4.0
JUDGE_METHODS = ("auto", "grounding", "rubric")


def grounding_score(nats: float) -> float:
    """The 1..5 score of an answer grounded ``nats`` in its task (monotone, no ties)."""
    z = (nats - GROUNDING_CENTER) / GROUNDING_SCALE
    sig = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return round(SCORE_MIN + (SCORE_MAX - SCORE_MIN) * sig, 4)


def grounding_messages(task: str, limit: int = 1200) -> list[dict[str, str]]:
    """The task alone, as the user's message the answer would reply to."""
    return [{"role": "user", "content": _cut(task, limit)}]


def free_text_prompt(task: str, answer: str, turns: dict[str, str] | None = None) -> str:
    """The judge prompt in its old free-text form (for measuring parse rates)."""
    return interaction_text(task, answer, turns) + "\n\n" + FREE_TEXT_FORM


class Judge:
    """ALFRED's judgement through ``ModelManager.choose``.

    ``models``: the ModelManager. ``protos``: where the judge persona's live model
    and system prompt are read at every call (a fine-tuned ALFRED judges with its
    new model). A model that cannot be reached raises (the caller retries later); a
    decision the model could not make returns a Verdict with ``score=None``.
    """

    def __init__(self, models: ModelManager, protos: ProtoManager, persona: str = JUDGE, *,
                 embedder: Embedder | None = None, method: str = "auto",
                 checks: bool = True, ignore: Sequence[str] = ()) -> None:
        if method not in JUDGE_METHODS:
            raise ValueError(f"judge method must be one of {JUDGE_METHODS}, not {method!r}")
        self.models = models
        self.protos = protos
        self.persona = persona
        self.embedder = embedder          # for the off-topic check (None: not checked)
        self.method = method              # auto: grounding where the backend scores options
        self.checks = checks              # False: the bare model (the bench's "before")
        self.ignore = tuple(ignore)       # checks not to apply (judge_checks.CHECKS)
        unknown = set(self.ignore) - set(judge_checks.CHECKS)
        if unknown:
            raise ValueError(f"unknown judge checks {sorted(unknown)}; "
                             f"they are {judge_checks.CHECKS}")

    def _judge(self) -> tuple[str, str | None]:
        proto = self.protos.get(self.persona)
        return str(proto.get("model_name")), proto.get("system_prompt") or None

    def score(self, task: str, answer: str, turns: dict[str, str] | None = None, *,
              cancel: CancelToken | None = None) -> Verdict:
        """The checks, then the model's evidence, capped by the checks."""
        flags = (judge_checks.check(task, answer, self.embedder, ignore=self.ignore)
                 if self.checks else [])
        cap = min((f.cap for f in flags), default=SCORE_MAX)
        reason = "; ".join(f.reason for f in flags) or None
        names = [f.name for f in flags]
        if cap <= SCORE_MIN:                # nothing the model says could lift it
            return Verdict(score=cap, method="checks", flags=names, reason=reason)
        model, system = self._judge()
        try:
            if self._grounded():
                verdict = self._grounding(model, task, answer, cancel)
            else:
                verdict = self._rubric(model, system, task, answer, turns, cancel)
        except (DecisionError, GenerationCancelled) as e:
            return Verdict(error=f"no score: {type(e).__name__}: {e}", flags=names, reason=reason)
        verdict.flags, verdict.reason = names, reason
        if verdict.score is not None and verdict.score > cap:
            verdict.score = cap
        return verdict

    def _grounded(self) -> bool:
        """Whether to score by grounding: asked, or (auto) the backend scores options.

        A backend declares it (``scores_options``, the embedded one): a server backend
        only picks (Ollama's enum format returns no scores), and asking it to "choose"
        a whole answer would make it write the answer out."""
        if self.method != "auto":
            return self.method == "grounding"
        return bool(getattr(self.models.backend, "scores_options", False))

    def _grounding(self, model: str, task: str, answer: str,
                   cancel: CancelToken | None) -> Verdict:
        option = answer[:1200]
        if not option.strip():
            return Verdict(error="no score: there is no answer to ground")
        choice = self.models.choose(model, grounding_messages(task), [option], cancel=cancel)
        nats = choice.scores.get(option)
        if nats is None or not math.isfinite(nats):
            return Verdict(error=f"no score: the backend gave no grounding score "
                                 f"({choice.method}); use the rubric judge (method='rubric')")
        return Verdict(score=grounding_score(nats), method=f"grounding:{choice.method}",
                       scores={"grounding_nats": round(float(nats), 4)})

    def _rubric(self, model: str, system: str | None, task: str, answer: str,
                turns: dict[str, str] | None, cancel: CancelToken | None) -> Verdict:
        choice = self.models.choose(model, score_messages(system, task, answer, turns),
                                    SCORE_OPTIONS, cancel=cancel)
        return Verdict(score=float(choice.value), method=f"choose:{choice.method}",
                       scores=dict(choice.scores))

    def vote(self, task: str, answer: str, turns: dict[str, str] | None = None, *,
             cancel: CancelToken | None = None) -> str | None:
        model, system = self._judge()
        try:
            vote: Choice = self.models.choose(model, vote_messages(system, task, answer, turns),
                                              CANDIDATES, cancel=cancel)
            return vote.value
        except (DecisionError, GenerationCancelled) as e:
            log.info("judge: no persona vote (%s)", e)
            return None

    def assess(self, task: str, answer: str, turns: dict[str, str] | None = None, *,
               cancel: CancelToken | None = None) -> Verdict:
        """Score and vote for one interaction. Raises ModelError if the model is down."""
        verdict = self.score(task, answer, turns, cancel=cancel)
        if verdict.score is not None:
            verdict.vote = self.vote(task, answer, turns, cancel=cancel)
        return verdict
