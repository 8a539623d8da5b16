"""Cheap checks a 135M judge cannot be trusted with, run before ALFRED is asked.

Measured on tests/judge_cases.py, SmolLM2-135M asked "how good is this answer, 1-5"
scores an empty answer, a sentence repeated five times, the task given back and a
refusal as it scores a right answer (5, nearly always). These shapes are plain to
see without a model, so they are checked here and cap the score (with the reason
recorded) whatever the model says:

* ``empty``: no word at all;
* ``loop``: the same sentence three or more times, or mostly repeated word 4-grams
  (degenerate generation);
* ``echo``: the answer is the task's words in the task's order (the task given back,
  whole or in part, once or repeated); not "The sun is a star." for "Is the sun a
  star?", which has the task's words but answers it;
* ``refusal``: a short answer that declines ("I'm sorry, but I can't help...", "As an
  AI...", "I won't answer that"; curly apostrophes too); not "I'm sorry to hear that"
  or "I'm sorry you can't sleep", which are sympathy, nor "I don't think so" or "I
  can't recommend it enough", which are idioms;
* ``terse``: a single bare word (too little to train a persona on, even when right;
  a number or a code such as a hash is left to the model);
* ``arithmetic``: a sum stated wrongly ("7 * 8 = 54"; a chain such as "2 + 3 * 4 = 14"
  is read whole, with * and / first): a small model's own answers hold many, and it
  scores them as right (it wrote them);
* ``unfinished``: prose cut off mid-sentence (a generation stopped at its token limit);
  a markdown list's items need no full stop;
* ``off_topic``: the answer's meaning is far from the task's (cosine of the
  embeddings under a floor); only with an embedder whose floor was measured
  (:data:`RELEVANCE_FLOOR`), and only for answers long enough to have a topic.

Each check returns a :class:`Flag` (name, cap, reason) or None.
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection

import numpy as np

if TYPE_CHECKING:
    from ..models.embeddings import Embedder

#: cosine(task, answer) under which an answer is off topic, per embedder class name.
#: MiniLM on tests/judge_cases.py: right answers 0.58..0.88, off-topic ones -0.04..0.18;
#: but a right answer can share no words or topic with its task (a joke for "Tell me a
#: joke." scores 0.07, a hash for "Compute the SHA-256 of banana" 0.18), so the floor
#: only catches the clearly unrelated (8 of the 12 off-topic answers); the grounding
#: score (judge.py) catches the rest. An embedder not listed here is not used.
RELEVANCE_FLOOR = {"MiniLMEmbedder": 0.05}
#: answers shorter than this (words) are not checked for topic: too little meaning
RELEVANCE_MIN_WORDS = 4

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
#: curly apostrophes (Ollama/OpenAI models write "I\u2019m sorry, I can\u2019t")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_NEGATED = (r"\bi\s*(?:'m\s+|am\s+)?(?:can'?t|cannot|can not|won'?t|will not|unable to|"
            r"not able to|don'?t|do not)\s+")
_REFUSAL = re.compile(
    _NEGATED + r"(?:help|assist|answer|provide|do|give|explain|describe|discuss|translate|"
    r"comply|respond|know|suggest|share|offer|say|tell|write|talk)\b"
    r"|\bas an ai\b",
    re.IGNORECASE)
# "I can't <any verb>" in a short answer declines too ("I'm sorry, I can't suggest
# names."), when it opens the answer (within its first words: not a quoted line further
# on) and is not an idiom of sympathy ("I can't imagine how hard that is") or of opinion
# ("I don't think so", "I can't recommend it enough", "I don't mind")
_IDIOMS = (r"imagine|believe|wait|stop|help\s+but|think|agree|disagree|recommend|stress|"
           r"emphasi[sz]e|overstate|thank|praise|mind|doubt|blame|deny|see\s+why\s+not|"
           r"care\s+(?:which|either)|remember\s+a\s+time|get\s+enough|wait")
_DECLINES = re.compile(r"^\W*(?:[\w']+[\s,;:!-]+){0,4}?" + _NEGATED
                       + r"(?!(?:" + _IDIOMS + r")\b)[a-z]+", re.IGNORECASE)
REFUSAL_MAX_WORDS = 40
DECLINE_MAX_WORDS = 15


@dataclass(frozen=True)
class Flag:
    """A check that failed: ``name``, the score it caps at, and why (for the log/UI)."""

    name: str
    cap: float
    reason: str


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall((text or "").translate(_APOSTROPHES))]


def empty(answer: str) -> Flag | None:
    if not words(answer):
        return Flag("empty", 1.0, "the answer is empty")
    return None


def loop(answer: str) -> Flag | None:
    sentences = [" ".join(words(s)) for s in _SENTENCE.split(answer or "")]
    counts = Counter(s for s in sentences if s)
    if counts:
        text, n = counts.most_common(1)[0]
        if n >= 3:
            return Flag("loop", 1.0, f"a sentence repeated {n} times: {text[:60]!r}")
    ws = words(answer)
    if len(ws) >= 16:
        grams = [tuple(ws[i:i + 4]) for i in range(len(ws) - 3)]
        distinct = len(set(grams)) / len(grams)
        if distinct < 0.5:
            return Flag("loop", 1.0, f"repetitive: only {100 * distinct:.0f}% of its word "
                                     "4-grams are distinct")
    return None


def _is_run(part: list[str], whole: list[str]) -> bool:
    """``part`` is a contiguous run of ``whole``'s words."""
    n = len(part)
    return any(whole[i:i + n] == part for i in range(len(whole) - n + 1))


def echo(task: str, answer: str) -> Flag | None:
    """The task given back: every sentence of the answer is the task's words in its
    order (a contiguous run of them, or nearly all of them: SequenceMatcher ratio 0.9+),
    and the longest is most of the task. Word order counts: "The sun is a star." for
    "Is the sun a star?" uses the task's words but answers it."""
    t = words(task)
    parts = {tuple(words(s)) for s in _SENTENCE.split(answer or "")} - {()}
    if not t or not parts:
        return None
    if max(len(p) for p in parts) < 0.6 * len(t):
        return None
    if all(_is_run(list(p), t) or difflib.SequenceMatcher(None, list(p), t,
                                                          autojunk=False).ratio() >= 0.9
           for p in parts):
        return Flag("echo", 1.0, "the answer gives the task back")
    return None


def refusal(answer: str) -> Flag | None:
    answer = (answer or "").translate(_APOSTROPHES)
    first = _SENTENCE.split(answer.strip(), maxsplit=1)[0]
    n = len(words(answer))
    if (n <= REFUSAL_MAX_WORDS and _REFUSAL.search(first)) or \
            (n <= DECLINE_MAX_WORDS and _DECLINES.match(first)):
        return Flag("refusal", 1.0, f"the answer declines: {first[:60]!r}")
    return None


def terse(answer: str) -> Flag | None:
    """One bare word ("Maybe.", "Legs."); a number or a code (a hash) may be the whole
    right answer, so those go to the model."""
    ws = words(answer)
    if len(ws) == 1 and ws[0].replace("'", "").isalpha() and len(ws[0]) <= 15:
        return Flag("terse", 2.0, "a one-word answer: too little to learn from")
    return None


_NUM = r"(-?\d[\d,]*(?:\.\d+)?)"
_OP = r"(?:\+|-|\*|×|x|/|÷|plus|minus|times|multiplied by|divided by)"
# a chain "a op b [op c ...] = result", read whole (its tail alone, "2 + 3 = 6" of
# "1 + 2 + 3 = 6", would be wrong)
_ARITH = re.compile(
    r"(" + _NUM.replace("(", "(?:", 1) + r"(?:\s+" + _OP + r"\s+" + _NUM.replace("(", "(?:", 1)
    + r")+)" + r"\s*(?:=|\bis\b|\bequals\b|\bmakes\b|\bgives\b)\s*" + _NUM, re.IGNORECASE)
_TERM = re.compile(r"\s+(" + _OP + r")\s+", re.IGNORECASE)
# what before a chain's first number, or after its result, makes it part of a longer
# expression the regex did not read ("2^3 + 1 = 9", "(1 + 2) * 3", "= 3 + 4")
# (markdown's "**7 * 8 = 54**" is not an operator: one needs an operand before it)
_OPERAND_BEFORE = re.compile(r"(?:[\d)]\s*(?:\*\*|[-+*/×÷^])|\^|\b(?:plus|minus|times|by|x))"
                             r"\s*$", re.IGNORECASE)
_OPERAND_AFTER = re.compile(r"^(?:\s*(?:\*\*|[-+*/×÷])\s*\(?\d|\s*[\^%]|\s+(?:plus|minus|"
                            r"times|multiplied|divided|x)\s+\(?\d)", re.IGNORECASE)
_OPS = {"+": "+", "plus": "+", "-": "-", "minus": "-", "*": "*", "×": "*", "x": "*",
        "times": "*", "multiplied by": "*", "/": "/", "÷": "/", "divided by": "/"}


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _evaluate(chain: str) -> float | None:
    """``chain`` ("2 + 3 * 4") with * and / before + and -; None where it cannot be read
    or divides by zero. Numbers and the four operators only (no eval)."""
    parts = _TERM.split(chain.strip())
    read = [_number(p) for p in parts[0::2]]
    numbers = [n for n in read if n is not None]
    ops = [_OPS[" ".join(p.lower().split())] for p in parts[1::2]]
    if len(numbers) != len(read) or len(numbers) != len(ops) + 1:
        return None
    terms, signs = [numbers[0]], []
    for op, n in zip(ops, numbers[1:]):
        if op == "*":
            terms[-1] *= n
        elif op == "/":
            if n == 0:
                return None
            terms[-1] /= n
        else:
            terms.append(n)
            signs.append(op)
    value = terms[0]
    for sign, term in zip(signs, terms[1:]):
        value = value + term if sign == "+" else value - term
    return value


def arithmetic(answer: str) -> Flag | None:
    """A sum the answer states wrongly ("7 * 8 = 54", "7 multiplied by 8 is 54",
    "2 + 3 * 4 = 20"): the model that wrote it believes it, so only arithmetic can tell.
    A chain is read whole; one that is part of a longer expression the regex cannot read
    (brackets, powers, a result followed by more operators) is left alone."""
    text = answer or ""
    for m in _ARITH.finditer(text):
        if _OPERAND_BEFORE.search(text[:m.start()]) or _OPERAND_AFTER.match(text[m.end():]):
            continue
        value, said = _evaluate(m.group(1)), _number(m.group(2))
        if value is None or said is None:
            continue
        decimals = len(m.group(2).partition(".")[2])
        if round(value, decimals) != round(said, decimals) and abs(value - said) > 1e-9:
            shown = f"{value:.{decimals}f}" if decimals else f"{value:g}"
            return Flag("arithmetic", 1.0, f"states {m.group(0).strip()!r}, but it is {shown}")
    return None


_LIST_ITEM = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+")
_END = re.compile(r"[.!?)\]\"'`*:;…]\s*$")
_DANGLING = {"a", "an", "the", "of", "to", "in", "on", "at", "by", "for", "with", "from",
             "and", "or", "but", "is", "are", "was", "were", "which", "that", "who", "as",
             "into", "than", "their", "its", "his", "her", "our", "your", "my"}


def unfinished(answer: str) -> Flag | None:
    """Prose cut off mid-sentence (a generation stopped by its token limit): the last
    line has no closing punctuation and is either a long sentence (12+ words; a poem's
    lines are shorter) or ends on a word no sentence ends on ("of", "the", "which").
    A markdown list item ("- ...", "* ...", "2. ...") needs no full stop, however
    long: only the word it ends on can show it was cut."""
    text = (answer or "").strip()
    last = text.splitlines()[-1] if text else ""
    lw = words(last)
    long_prose = len(lw) >= 12 and not _LIST_ITEM.match(last)
    cut = long_prose or (len(lw) >= 6 and lw[-1] in _DANGLING)
    if len(words(text)) >= 12 and cut and not _END.search(last):
        return Flag("unfinished", 2.0, f"the answer stops mid-sentence: ...{last[-40:]!r}")
    return None


def relevance_floor(embedder: Embedder | None) -> float | None:
    """The measured off-topic floor for this embedder, or None (check not used)."""
    return None if embedder is None else RELEVANCE_FLOOR.get(type(embedder).__name__)


def similarity(embedder: Embedder, task: str, answer: str) -> float:
    v = np.asarray(embedder.embed([task, answer]), dtype=np.float64)
    n = np.linalg.norm(v, axis=1)
    return float(np.dot(v[0], v[1]) / max(float(n[0] * n[1]), 1e-12))


def off_topic(task: str, answer: str, embedder: Embedder | None,
              floor: float | None = None) -> Flag | None:
    floor = relevance_floor(embedder) if floor is None else floor
    if embedder is None or floor is None or len(words(answer)) < RELEVANCE_MIN_WORDS:
        return None
    sim = similarity(embedder, task, answer)
    if sim < floor:
        return Flag("off_topic", 1.0, f"the answer is not about the task (similarity "
                                      f"{sim:.2f} < {floor:.2f})")
    return None


CHECKS = ("empty", "loop", "echo", "refusal", "terse", "arithmetic", "unfinished", "off_topic")


def check(task: str, answer: str, embedder: Embedder | None = None, *,
          floor: float | None = None, ignore: Collection[str] = ()) -> list[Flag]:
    """Every check that fails for this answer (cheapest first; the embedder last),
    but those named in ``ignore`` (the gate cuts its answers at a token limit itself,
    so it ignores ``unfinished``)."""
    unknown = set(ignore) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown judge checks {sorted(unknown)}; they are {CHECKS}")
    found = (empty(answer), loop(answer), echo(task, answer), refusal(answer),
             terse(answer), arithmetic(answer), unfinished(answer))
    flags = [f for f in found if f is not None and f.name not in ignore]
    if not flags and "off_topic" not in ignore:
        f = off_topic(task, answer, embedder, floor)
        if f is not None:
            flags.append(f)
    return flags
