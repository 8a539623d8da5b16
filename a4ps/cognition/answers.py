"""What a persona's reply *claims*, read the way a 135M model writes.

Small models pad a reply with boilerplate ("Sure!", "I hope this helps") and loop on
a sentence until the token budget runs out. Three readers, pure functions of text:

* :func:`claims` — the distinct, non-boilerplate sentences of a reply, in order (what
  dissonance compares, so two replies that share only padding do not look alike and
  a loop does not look like an argument);
* :func:`final_answer` — the answer line (``Answer: ...`` if the reply has one, else
  its first claim), normalised by :func:`answer_key` for agreement tests;
* :func:`repetition_cut` — where a reply starts repeating itself, so a streaming turn
  can stop there instead of at the budget.
"""
from __future__ import annotations

import re

# sentences that carry no claim about the task (lower case, matched at the start)
_BOILERPLATE = (
    "sure", "certainly", "of course", "absolutely", "great question", "good question",
    "i hope this helps", "hope this helps", "let me know", "feel free", "as an ai",
    "i'm happy to help", "i am happy to help", "happy to help", "here is", "here's",
    "thank you", "thanks", "ok", "okay", "well", "i think so", "i agree", "you're welcome",
)
# a sentence ends at . ! ? or a line break, but not at the point of a decimal (3.5)
_SENTENCE = re.compile(r"(?:[^.!?\n]|\.(?=\d))+(?:[.!?]+|\n|$)")
_CLAUSE = re.compile(r"[^.!?\n,;:]+")
_ANSWER_LINE = re.compile(r"(?im)^\s*(?:final\s+)?answer\s*[:\-]\s*(.+?)\s*$")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (split on . ! ? and line breaks), stripped, non-empty."""
    if not isinstance(text, str):
        return []
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip(" \t\n-*•")]


def _norm(s: str) -> str:
    return " ".join(w.lower() for w in _WORD.findall(s))


def is_boilerplate(sentence: str) -> bool:
    n = _norm(sentence)
    if not n:
        return True
    return any(n == b or n.startswith(b + " ") and len(n.split()) <= len(b.split()) + 4
               for b in _BOILERPLATE)


def claims(text: str, limit: int = 4) -> list[str]:
    """The first ``limit`` distinct sentences that are not boilerplate."""
    out: list[str] = []
    seen: set[str] = set()
    for s in sentences(text):
        key = _norm(s)
        if key in seen or is_boilerplate(s):
            continue
        seen.add(key)
        out.append(s)
        if len(out) >= limit:
            break
    return out


def final_answer(text: str) -> str:
    """The reply's answer: its ``Answer:`` line if it has one, else its first claim."""
    if not isinstance(text, str):
        return ""
    m = _ANSWER_LINE.search(text)
    if m and m.group(1).strip():
        return m.group(1).strip()
    first = claims(text, limit=1)
    return first[0] if first else text.strip()


def answer_key(text: str) -> str:
    """A normal form for agreement: lower-case words and numbers (``3.50`` -> ``3.5``)."""
    words = []
    for w in _WORD.findall(final_answer(text)):
        try:
            f = float(w)
            w = f"{f:g}"
        except ValueError:
            w = w.lower()
        words.append(w)
    return " ".join(words)


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def numbers(text: str) -> set[float]:
    """The numbers written in ``text`` (``1,000`` -> 1000.0)."""
    out = set()
    for m in _NUMBER.finditer(text or ""):
        try:
            out.add(float(m.group(0).replace(",", "")))
        except ValueError:
            pass
    return out


def agree(a: str, b: str, task: str = "") -> bool:
    """Two replies give the same final answer: the same words, or the same numbers
    (leaving out the numbers the task itself states) in their final answers."""
    ka, kb = answer_key(a), answer_key(b)
    if ka and ka == kb:
        return True
    asked = numbers(task)
    na, nb = numbers(final_answer(a)) - asked, numbers(final_answer(b)) - asked
    return bool(na) and na == nb


def repetition_cut(text: str, *, min_words: int = 3, clause_repeats: int = 3) -> int | None:
    """Where ``text`` starts repeating itself, or None.

    A sentence of ``min_words`` or more words seen a second time, or any clause
    (split also on , ; :) seen ``clause_repeats`` times, is a loop; the cut is the start
    of the repeat, so everything before it is kept.
    """
    if not isinstance(text, str) or not text:
        return None
    seen: set[str] = set()
    for m in _SENTENCE.finditer(text):
        s = m.group(0)
        if not re.search(r"[.!?\n]$", s):      # the sentence is still being written
            break
        key = _norm(s)
        if len(key.split()) >= min_words:
            if key in seen:
                return m.start() + (len(s) - len(s.lstrip()))
            seen.add(key)
    counts: dict[str, int] = {}
    for m in _CLAUSE.finditer(text):
        key = _norm(m.group(0))
        if len(key.split()) < 2:
            continue
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= clause_repeats:
            first = text.find(m.group(0).strip())
            second = text.find(m.group(0).strip(), first + 1)
            return second if second > 0 else m.start()
    return None


def strip_repeats(text: str) -> str:
    """``text`` cut where it starts repeating itself (unchanged if it does not)."""
    cut = repetition_cut(text)
    return text if cut is None else text[:cut].rstrip(" ,;:")
