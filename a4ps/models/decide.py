"""Decisions under constraint on an embedded token engine: ``choose`` and ``structured``.

A 135M model asked "reply with one word" rambles, and asked for JSON writes broken
JSON. So it is never asked to *write* a decision, only to *weigh* one:

* ``choose`` scores every option as the assistant's whole reply (the option's tokens
  then the end-of-turn token) and picks the best. Raw log-probabilities are biased:
  SmolLM2 prefers some words whatever the question (it picked "dialogue" for every
  route). Contextual calibration (Zhao et al., 2021, "Calibrate before use") removes
  that bias: each option's log-probability under the same prompt with the user's
  content replaced by "N/A" is subtracted, so what wins is what *this* question makes
  more likely than usual. Measured on the labelled set in tests/decision_cases.py
  (see :data:`METHODS` and tests/test_models_decide.py).
* ``structured`` walks the JSON schema as a template: braces, keys, commas and quotes
  are written by us; enums, booleans and null-or-not are decided by scored choice;
  strings are generated freely and cut at the closing quote, a newline or maxLength;
  integers/numbers are generated digit by digit and kept within minimum/maximum (a
  small range is scored value by value instead). The value is built as it is walked,
  so it always validates: nothing is parsed from the model's text.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any, Callable, Sequence

from a4ps.models.base import CancelToken, Choice, Message
from a4ps.models.engine import Sampling, TokenEngine
from a4ps.models.errors import GenerationCancelled
from a4ps.models.tokens import ChatTokenizer

#: how options are compared; "calibrated" is the default (see the module docstring)
METHODS = ("calibrated", "sum", "mean")
CONTENT_FREE = "N/A"
_MAX_STRING = 200            # a string without maxLength is cut here
_MAX_ITEMS = 8               # an array without maxItems stops here
_SCORED_RANGE = 32           # integer ranges up to this many values are scored per value
_MAX_DIGITS = 18


class Decider:
    """Scored choice and schema walking on one engine + tokenizer."""

    def __init__(self, engine: TokenEngine, tok: ChatTokenizer, *,
                 method: str = "calibrated", cache_size: int = 128) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        self.engine = engine
        self.tok = tok
        self.method = method
        self._cf_cache: OrderedDict[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]],
                                    list[float]] = OrderedDict()
        self._cache_size = cache_size

    # -- choose -------------------------------------------------------------

    def choose(self, messages: list[Message], options: Sequence[str], *,
               cancel: CancelToken | None = None, method: str | None = None) -> Choice:
        """The most likely option as the reply (calibrated unless ``method`` says).

        Each option is weighed in its spellings ("yes", "Yes": the model's
        probability of saying it at all, whatever the case) and without an end-of-turn
        token (a small model rarely stops right after one word, so requiring it only
        adds noise: measured on tests/decision_cases.py)."""
        method = method or self.method
        spellings = [_spellings(o) for o in options]
        conts = [self.tok.encode(v) for group in spellings for v in group]
        prompt = self.tok.chat_ids(messages, reserve=max(len(c) for c in conts))
        flat = self._scores(prompt, conts, method, cancel,
                            lambda: self.tok.chat_ids(content_free(messages)),
                            groups=[len(g) for g in spellings])
        best = max(range(len(options)), key=flat.__getitem__)
        return Choice(options[best], dict(zip(options, flat)), f"scored-{method}")

    def _scores(self, prefix: list[int], conts: list[list[int]], method: str,
                cancel: CancelToken | None, cf_prefix: Callable[[], list[int]],
                groups: list[int] | None = None
                ) -> list[float]:
        """One score per group of continuations (groups of 1 unless given): the
        group's log-probability (log-sum-exp), calibrated or raw as ``method`` says."""
        groups = groups or [1] * len(conts)
        _check(cancel)
        lps = self.engine.score(prefix, conts)
        if method == "mean":
            return _grouped([sum(lp) / max(1, len(lp)) for lp in lps], groups)
        raw = _grouped([sum(lp) for lp in lps], groups)
        if method == "sum":
            return raw
        _check(cancel)
        base = _grouped(self._content_free(cf_prefix(), conts), groups)
        return [r - b for r, b in zip(raw, base)]

    def _content_free(self, prefix: list[int], conts: list[list[int]]) -> list[float]:
        key = (tuple(prefix), tuple(tuple(c) for c in conts))
        hit = self._cf_cache.get(key)
        if hit is not None:
            self._cf_cache.move_to_end(key)
            return hit
        value = [sum(lp) for lp in self.engine.score(prefix, conts)]
        self._cf_cache[key] = value
        while len(self._cf_cache) > self._cache_size:
            self._cf_cache.popitem(last=False)
        return value

    # -- structured ---------------------------------------------------------

    def structured(self, messages: list[Message], schema: dict[str, Any], *,
                   cancel: CancelToken | None = None) -> Any:
        """A value for ``schema`` (a :mod:`a4ps.models.schema` subset), always valid."""
        msgs = with_json_hint(messages, schema)
        walk = _Walk(self, self.tok.chat_ids(msgs, reserve=256),
                     lambda: self.tok.chat_ids(with_json_hint(content_free(messages), schema)),
                     cancel)
        return walk.value(schema)


class _Walk:
    """One schema walk: the JSON text written so far and the prompt it follows."""

    def __init__(self, decider: Decider, prompt: list[int], cf_prompt: Callable[[], list[int]],
                 cancel: CancelToken | None) -> None:
        self.d = decider
        self.tok = decider.tok
        self.prompt = prompt
        self._cf_prompt = cf_prompt
        self._cf_ids: list[int] | None = None
        self.cancel = cancel
        self.text = ""

    # prefix ids: the prompt, then the JSON written so far (tokenized as one text)
    def ids(self) -> list[int]:
        return self.prompt + self.tok.encode(self.text) if self.text else list(self.prompt)

    def cf_ids(self) -> list[int]:
        if self._cf_ids is None:
            self._cf_ids = self._cf_prompt()
        return self._cf_ids + self.tok.encode(self.text) if self.text else list(self._cf_ids)

    def pick(self, pieces: list[str], calibrate: bool = True) -> int:
        """Index of the most likely continuation among ``pieces`` (JSON text)."""
        conts = [self.tok.encode(p) for p in pieces]
        method = self.d.method if calibrate else "sum"
        scores = self.d._scores(self.ids(), conts, method, self.cancel, self.cf_ids)
        return max(range(len(pieces)), key=scores.__getitem__)

    def value(self, schema: dict[str, Any]) -> Any:
        _check(self.cancel)
        if "anyOf" in schema:
            alts = schema["anyOf"]
            i = 0 if len(alts) == 1 else self.pick([_opening(a) for a in alts], calibrate=False)
            return self.value(alts[i])
        if "enum" in schema:
            values = list(schema["enum"])
            i = self.pick([" " + json.dumps(v) for v in values])
            self.text += " " + json.dumps(values[i])
            return values[i]
        kind = schema.get("type")
        if kind == "null":
            self.text += " null"
            return None
        if kind == "boolean":
            i = self.pick([" true", " false"])
            self.text += (" true", " false")[i]
            return i == 0
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number"):
            return self._number(schema, integer=kind == "integer")
        if kind == "array":
            return self._array(schema)
        if kind == "object":
            return self._object(schema)
        raise ValueError(f"unsupported schema {schema!r}")     # check_schema ran first

    def _object(self, schema: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self.text += "{"
        for i, (key, sub) in enumerate(schema["properties"].items()):
            self.text += ("" if i == 0 else ",") + json.dumps(key) + ":"
            out[key] = self.value(sub)
        self.text += "}"
        return out

    def _array(self, schema: dict[str, Any]) -> list[Any]:
        items = schema["items"]
        limit = int(schema.get("maxItems", _MAX_ITEMS))
        out: list[Any] = []
        self.text += " ["
        for i in range(limit):
            more = _opening(items) if i == 0 else ","
            if self.pick([more, " ]" if i == 0 else "]"], calibrate=False) == 1:
                break
            if i > 0:
                self.text += ","
            out.append(self.value(items))
        self.text += "]"
        return out

    def _string(self, schema: dict[str, Any]) -> str:
        limit = int(schema.get("maxLength", _MAX_STRING))
        self.text += ' "'
        raw = ""
        if limit > 0:
            raw = self._extend(lambda s: ('"' in s or "\n" in s or len(s) >= limit + 1),
                               max_new=limit + 8)
            raw = raw.split('"')[0].split("\n")[0]
        value = _unescape(raw)[:limit].strip()
        self.text = self.text[:-2] + " " + json.dumps(value)
        return value

    def _number(self, schema: dict[str, Any], integer: bool) -> int | float:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if integer and lo is not None and hi is not None \
                and math.ceil(lo) <= math.floor(hi) and math.floor(hi) - math.ceil(lo) < _SCORED_RANGE:
            values = list(range(math.ceil(lo), math.floor(hi) + 1))
            i = self.pick([f" {v}" for v in values])
            self.text += f" {values[i]}"
            return values[i]
        allowed = set("-0123456789" if integer else "-0123456789.eE+")
        raw = self._extend(lambda s: any(c not in allowed for c in s.lstrip()),
                           max_new=_MAX_DIGITS)
        value = _parse_number(raw.strip(), integer)
        if value is None:               # no digits at all: weigh a few candidates
            cands = _candidates(lo, hi, integer)
            value = cands[self.pick([f"{v}" for v in cands], calibrate=False)]
        if lo is not None and value < lo:
            value = math.ceil(lo) if integer else lo
        if hi is not None and value > hi:
            value = math.floor(hi) if integer else hi
        self.text += " " + json.dumps(value)
        return value

    def _extend(self, done: Callable[[str], bool], max_new: int) -> str:
        """Greedy text after the current JSON, until ``done(text)`` or ``max_new`` tokens."""
        _check(self.cancel)
        ids: list[int] = []
        text = ""
        it = self.d.engine.stream(self.ids(), max_new=max_new, sampling=Sampling())
        try:
            for tid in it:
                if tid in self.tok.end_ids:
                    break
                ids.append(tid)
                text = self.tok.decode(ids)
                if done(text) or (self.cancel is not None and self.cancel.is_set()):
                    break
        finally:
            it.close()
        _check(self.cancel)
        return text


# --------------------------------------------------------------------------- helpers

def content_free(messages: list[Message]) -> list[Message]:
    """The same conversation with the last user message's content replaced by "N/A"."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = CONTENT_FREE
            break
    return out


def with_json_hint(messages: list[Message], schema: dict[str, Any]) -> list[Message]:
    """Tell the model the answer is a JSON object with these fields (it helps a small
    model's free-text fields; the structure itself is enforced by the walk)."""
    hint = "Answer in JSON: " + _sketch(schema)
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = f"{m['content']}\n\n{hint}"
            return out
    return out + [{"role": "user", "content": hint}]


def _sketch(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_sketch(a) for a in schema["anyOf"])
    if "enum" in schema:
        return "|".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return "{" + ", ".join(f"{json.dumps(k)}: {_sketch(v)}"
                               for k, v in schema["properties"].items()) + "}"
    if kind == "array":
        return f"[{_sketch(schema['items'])}, ...]"
    return str(kind)


def _opening(schema: dict[str, Any]) -> str:
    """The first characters a value of ``schema`` starts with (to weigh alternatives)."""
    if "anyOf" in schema:
        return _opening(schema["anyOf"][0])
    if "enum" in schema:
        return " " + json.dumps(schema["enum"][0])
    return {"object": "{", "array": " [", "string": ' "', "boolean": " true",
            "null": " null", "integer": " 1", "number": " 1"}.get(str(schema.get("type")), " ")


def _spellings(option: str) -> list[str]:
    return list(dict.fromkeys([option, option[:1].upper() + option[1:]]))


def _grouped(values: list[float], groups: list[int]) -> list[float]:
    """Log-sum-exp of consecutive runs of ``values`` (run lengths ``groups``)."""
    out, i = [], 0
    for n in groups:
        run = values[i:i + n]
        m = max(run)
        out.append(m + math.log(sum(math.exp(v - m) for v in run)))
        i += n
    return out


def _unescape(raw: str) -> str:
    if "\\" not in raw:
        return raw
    try:
        return str(json.loads('"' + raw.rstrip("\\") + '"'))
    except ValueError:
        return raw.replace("\\", "")


def _parse_number(raw: str, integer: bool) -> int | float | None:
    import re
    m = re.match(r"-?\d+" if integer else r"-?\d+(\.\d+)?([eE][-+]?\d+)?", raw)
    if not m:
        return None
    try:
        v = int(m.group(0)) if integer else float(m.group(0))
    except ValueError:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _candidates(lo: float | None, hi: float | None, integer: bool) -> list[int | float]:
    lo_v = lo if lo is not None else (0 if hi is None or hi >= 0 else hi)
    hi_v = hi if hi is not None else lo_v + 100
    mid = (lo_v + hi_v) / 2
    vals = [lo_v, mid, hi_v]
    if integer:
        vals = [int(math.ceil(lo_v)), int(round(mid)), int(math.floor(hi_v))]
    return list(dict.fromkeys(vals))


def _check(cancel: CancelToken | None) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("decision cancelled")
