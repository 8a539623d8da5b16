"""Unambiguous signals in a task's text, read before a model is asked anything.

ALFRED's route is a hybrid (:func:`a4ps.cognition.decisions.decide_route`): a task that
*states* an exact computation — two numbers joined by an arithmetic operator
("17 times 23", "1234 + 5678"), a percentage, power or root of a number, or a quantity
with a unit to convert ("5 miles to kilometers", "how many grams are in 2.5
kilograms") — goes to the tool route without a model call, and the decision records
that the signal decided and the words that were the evidence. Everything else is the
model's choice. The patterns are deliberately narrow: a miss costs nothing (the model
still decides), a false hit sends a task to a tool that then says it found nothing to
compute, and the dialogue answers instead.
"""
from __future__ import annotations

import re

_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
_OPERATOR = (r"\+|-|\*|/|×|÷|\^|\bx\b|\bplus\b|\bminus\b|\btimes\b|\bmultiplied\s+by\b|"
             r"\bdivided\s+by\b|\bto\s+the\s+power\s+of\b|\bmod(?:ulo)?\b")
_ARITHMETIC = re.compile(
    rf"{_NUM}\s*(?:{_OPERATOR})\s*\(?\s*{_NUM}"              # 17 times 23, 3.5*4
    rf"|{_NUM}\s*(?:%|\bpercent\b)\s*of\s+{_NUM}"             # 15% of 240
    rf"|\b(?:square|cube)\s+root\s+of\s+{_NUM}"               # square root of 144
    rf"|{_NUM}\s+(?:squared|cubed)\b", re.I)                  # 7 squared

_UNITS = (
    "millimet(?:er|re)s?|centimet(?:er|re)s?|met(?:er|re)s?|kilomet(?:er|re)s?|mm|cm|km|"
    "inch(?:es)?|f(?:oo|ee)t|yards?|miles?|"
    "milligrams?|grams?|kilograms?|kg|mg|tonnes?|ounces?|oz|pounds?|lbs?|stones?|"
    "milliseconds?|seconds?|minutes?|hours?|days?|weeks?|years?|"
    "millilit(?:er|re)s?|lit(?:er|re)s?|ml|gallons?|quarts?|pints?|cups?|"
    "hectares?|acres?|mph|km/h|kph|"
    "kilobytes?|megabytes?|gigabytes?|terabytes?|bytes?|kb|mb|gb|tb|"
    "(?:degrees?\\s+)?(?:celsius|fahrenheit|centigrade|kelvin)")
_CONVERSION = re.compile(
    rf"{_NUM}\s*(?:{_UNITS})\s+(?:to|in|into)\s+(?:{_UNITS})\b"        # 5 miles to km
    rf"|\bhow\s+many\s+(?:{_UNITS})\s+(?:are\s+|is\s+)?(?:there\s+)?in\s+"
    rf"(?:a\s+|an\s+|{_NUM}\s*)(?:{_UNITS})\b", re.I)                   # how many g in 2 kg


def exact_computation(task: str) -> str | None:
    """The words of ``task`` that state an exact computation, or None."""
    if not isinstance(task, str):
        return None
    for pattern in (_CONVERSION, _ARITHMETIC):
        m = pattern.search(task)
        if m:
            return m.group(0).strip()
    return None
