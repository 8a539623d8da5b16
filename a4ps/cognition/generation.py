"""Per-persona generation settings: proto slots the graph passes to ``models.generate``.

Each persona proto carries ``temperature``, ``top_p``, ``repetition_penalty``,
``no_repeat_ngram_size``, ``stop`` (a list of strings) and ``max_tokens`` (per turn).
The System seeds them from :data:`PERSONA_GENERATION` (a slot the user has edited is
never overwritten) and the graph reads them at every turn, so an inspector edit
applies to the next turn. Backends ignore knobs their engine cannot honour (see each
backend's docstring).

The defaults are reasoned, then checked on a handful of the suite's tuning tasks
(a sweep over the suite did not fit this machine's time; ``bench/bench_tasks.py
--split tune`` is how to revisit them): greedy decoding for ALFRED and BRICK (at
temperature > 0 a 135M model drifts off short factual and arithmetic answers); a mild
repetition penalty and no repeated 4-grams against the loops it falls into (the graph
also stops a turn at its first repeat); turns of at most 64 tokens, since the prompts
ask for the answer first; stop strings at the next speaker's line. ROBIN samples a
little (0.3, top-p 0.9) where the backend samples, so the dialogue can offer a second,
different candidate answer (the embedded backend decodes greedily unless
``models.embedded.do_sample`` is on).

Measured for ALFRED on the tune split's 32 factual/reasoning/format/empathy tasks (one
plain call each, embedded model, session 3): repetition penalty 1.0 / 1.15 / 1.3 passed
13 / 14 / 15; no no-repeat n-gram the same 14; 3-grams with penalty 1.05 the same 14;
at most 32 tokens 11. The one-task differences are noise at n=32, so the defaults stay;
halving the turn budget costs answers.
"""
from __future__ import annotations

from typing import Any

GEN_SLOTS = ("temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size", "stop",
             "max_tokens")

# a turn never runs into the next speaker's line
_STOP = ["\nTask:", "\nUser:", "\nBRICK:", "\nROBIN:", "\nALFRED:"]

PERSONA_GENERATION: dict[str, dict[str, Any]] = {
    "ALFRED": {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.15,
               "no_repeat_ngram_size": 4, "stop": list(_STOP), "max_tokens": 64},
    "BRICK": {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.15,
              "no_repeat_ngram_size": 4, "stop": list(_STOP), "max_tokens": 64},
    "ROBIN": {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.15,
              "no_repeat_ngram_size": 4, "stop": list(_STOP), "max_tokens": 64},
}
DEFAULT_GENERATION = PERSONA_GENERATION["ALFRED"]


def defaults_for(persona: str) -> dict[str, Any]:
    """The seeded generation slots for ``persona`` (ALFRED's for a persona not listed)."""
    base = PERSONA_GENERATION.get(persona, DEFAULT_GENERATION)
    return {k: list(v) if isinstance(v, list) else v for k, v in base.items()}


def settings_of(proto: Any, *, max_tokens: int | None = None) -> dict[str, Any]:
    """The keyword arguments for ``models.generate`` from the proto's slots, read now.

    ``max_tokens`` (the graph's override, e.g. for a test) wins over the slot. A slot
    that is missing or None is left out, so the backend's own default applies.
    """
    gen: dict[str, Any] = {}
    for slot in GEN_SLOTS:
        value = proto.get(slot) if proto.has(slot) else None
        if value is not None:
            gen[slot] = list(value) if slot == "stop" else value
    if max_tokens is not None:
        gen["max_tokens"] = max_tokens
    return gen
