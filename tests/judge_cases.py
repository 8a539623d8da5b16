"""A labelled set to measure whether ALFRED the judge tells good answers from bad ones.

Each task has one known good answer and bad answers of several kinds, the shapes a
small model's own answers take when they go wrong:

* ``wrong``: fluent, on topic, but a wrong fact or number;
* ``off_topic``: fluent, about something else;
* ``short``: empty, or one word that does not answer;
* ``loop``: a sentence repeated (degenerate generation);
* ``refusal``: declines to answer a harmless task;
* ``echo``: the task given back as the answer.

The curator keeps interactions the judge scores at or above a threshold as training
data, so what matters is that good answers score *above* bad ones: measured by
:func:`discrimination` (pairwise accuracy per task, AUROC over all, per bad kind, and
the share kept at a threshold). Used by tests/test_judge.py and
bench/bench_selfimprove.py --only judge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

BAD_KINDS = ("wrong", "off_topic", "short", "loop", "refusal", "echo")


@dataclass(frozen=True)
class JudgeCase:
    task: str
    answer: str
    kind: str            # "good" or one of BAD_KINDS
    group: int           # the task's index: pairs are formed within a group


def _loop(sentence: str, n: int = 5) -> str:
    return " ".join([sentence] * n)


# (task, good answer, {kind: bad answer})
_TASKS: list[tuple[str, str, dict[str, str]]] = [
    ("What is the capital of France?",
     "The capital of France is Paris.",
     {"wrong": "The capital of France is Madrid.",
      "off_topic": "Bananas are rich in potassium and grow in tropical climates.",
      "short": "",
      "loop": _loop("The capital of France is the capital of France."),
      "refusal": "I'm sorry, but I can't help with that request.",
      "echo": "What is the capital of France?"}),
    ("What is 7 multiplied by 8?",
     "7 multiplied by 8 is 56.",
     {"wrong": "7 multiplied by 8 is 54.",
      "off_topic": "The Amazon river flows through Brazil into the Atlantic Ocean.",
      "short": "Maybe.",
      "loop": _loop("Multiply the numbers."),
      "refusal": "As an AI language model, I cannot do that.",
      "echo": "What is 7 multiplied by 8?"}),
    ("How many legs does a spider have?",
     "A spider has eight legs.",
     {"wrong": "A spider has six legs, like all insects.",
      "off_topic": "Chess is a board game played by two players on a board of 64 squares.",
      "short": "Legs.",
      "loop": _loop("A spider has legs and legs."),
      "refusal": "I cannot answer questions about animals.",
      "echo": "How many legs does a spider have? How many legs does a spider have?"}),
    ("Which planet is closest to the Sun?",
     "Mercury is the planet closest to the Sun.",
     {"wrong": "Jupiter is the planet closest to the Sun.",
      "off_topic": "To bake bread you need flour, water, yeast and salt.",
      "short": "",
      "loop": _loop("The planet is a planet."),
      "refusal": "Sorry, I am unable to help with astronomy.",
      "echo": "Which planet is closest to the Sun?"}),
    ("At what temperature does water boil at sea level, in degrees Celsius?",
     "At sea level water boils at 100 degrees Celsius.",
     {"wrong": "At sea level water boils at 50 degrees Celsius.",
      "off_topic": "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
      "short": "Hot.",
      "loop": _loop("Water is water."),
      "refusal": "I'm sorry, I can't provide that information.",
      "echo": "At what temperature does water boil at sea level, in degrees Celsius?"}),
    ("Give me three tips for sleeping better.",
     "1. Go to bed at the same time every night. 2. Avoid screens for an hour before "
     "sleep. 3. Keep your bedroom dark, quiet and cool.",
     {"wrong": "1. Drink several cups of coffee before bed. 2. Use your phone in bed until "
               "late. 3. Sleep at a different time every night.",
      "off_topic": "The stock market rose by two percent today, led by technology shares.",
      "short": "Sleep.",
      "loop": _loop("Sleep is good for you."),
      "refusal": "I'm sorry, but I cannot give advice about sleep.",
      "echo": "Give me three tips for sleeping better."}),
    ("How do I comfort a friend whose dog just died?",
     "Tell your friend you are sorry for their loss, listen without rushing them, share "
     "a good memory of the dog if you have one, and check in on them over the next days.",
     {"wrong": "Tell your friend to stop being sad because it was only a dog, and suggest "
               "they buy a new one tomorrow.",
      "off_topic": "Photosynthesis converts sunlight, water and carbon dioxide into glucose.",
      "short": "OK.",
      "loop": _loop("Your friend is sad."),
      "refusal": "I can't help with personal matters.",
      "echo": "How do I comfort a friend whose dog just died?"}),
    ("Write one sentence describing the colour of a clear daytime sky.",
     "On a clear day the sky is a bright, clean blue.",
     {"wrong": "On a clear day the sky is a deep shade of green.",
      "off_topic": "Football is the most popular sport in the world.",
      "short": "",
      "loop": _loop("The sky is the sky."),
      "refusal": "I am not able to describe colours.",
      "echo": "Write one sentence describing the colour of a clear daytime sky."}),
    ("Translate 'thank you' into Spanish.",
     "'Thank you' in Spanish is 'gracias'.",
     {"wrong": "'Thank you' in Spanish is 'bonjour'.",
      "off_topic": "Mount Everest is the highest mountain on Earth.",
      "short": "Spanish.",
      "loop": _loop("Thank you thank you."),
      "refusal": "I'm sorry, but I don't do translations.",
      "echo": "Translate 'thank you' into Spanish."}),
    ("Why do we need to drink water?",
     "The body needs water to control its temperature, carry nutrients in the blood, "
     "digest food and remove waste; without it we become dehydrated.",
     {"wrong": "We do not need to drink water at all, because the body makes all the water "
               "it needs from air.",
      "off_topic": "The piano has 88 keys, 52 white and 36 black.",
      "short": "Yes.",
      "loop": _loop("Water is needed."),
      "refusal": "I cannot answer health questions.",
      "echo": "Why do we need to drink water?"}),
    ("What is the largest ocean on Earth?",
     "The Pacific Ocean is the largest ocean on Earth.",
     {"wrong": "The Arctic Ocean is the largest ocean on Earth.",
      "off_topic": "A violin has four strings tuned in fifths.",
      "short": "Water.",
      "loop": _loop("The ocean is large."),
      "refusal": "Sorry, I can't help with geography.",
      "echo": "What is the largest ocean on Earth?"}),
    ("Explain in two sentences what a bridge is for.",
     "A bridge carries a road, railway or path over an obstacle such as a river or a "
     "valley. It lets people and vehicles cross where they otherwise could not.",
     {"wrong": "A bridge is a kind of boat used to sail under rivers. It carries fish from "
               "the sea to the mountains.",
      "off_topic": "My favourite pizza has mushrooms, olives and extra cheese.",
      "short": "",
      "loop": _loop("A bridge is a bridge."),
      "refusal": "I'm sorry, I cannot explain that.",
      "echo": "Explain in two sentences what a bridge is for."}),
]


# Written after the judge's checks were built on the set above, with other phrasings of
# each bad kind, and measured without tuning anything on it: a check that only knew
# the first set's sentences would show here.
_HELD_OUT: list[tuple[str, str, dict[str, str]]] = [
    ("Who wrote the play Romeo and Juliet?",
     "Romeo and Juliet was written by William Shakespeare.",
     {"wrong": "Romeo and Juliet was written by Charles Dickens.",
      "off_topic": "Volcanoes form where magma rises through cracks in the Earth's crust.",
      "short": "Yes",
      "loop": "Romeo and Juliet is a play. It is a play. It is a play. It is a play.",
      "refusal": "I won't answer that question.",
      "echo": "Who wrote the play Romeo and Juliet"}),
    ("How many days are there in a week?",
     "There are seven days in a week.",
     {"wrong": "There are ten days in a week.",
      "off_topic": "Penguins live mostly in the Southern Hemisphere and cannot fly.",
      "short": "",
      "loop": "days days days days days days days days days days days days days days days days",
      "refusal": "Unfortunately I am not able to answer questions about time.",
      "echo": "how many days are there in a week"}),
    ("What gas do plants take in from the air to make food?",
     "Plants take in carbon dioxide from the air and use sunlight to turn it into sugar.",
     {"wrong": "Plants take in helium from the air and turn it into sugar.",
      "off_topic": "The guitar usually has six strings and is played by strumming.",
      "short": "Air.",
      "loop": _loop("Plants need air to live.", 4),
      "refusal": "Sorry, but I cannot help with biology homework.",
      "echo": "What gas do plants take in from the air to make food? What gas do plants "
              "take in from the air to make food?"}),
    ("Suggest a name for a friendly orange cat.",
     "How about Marmalade? It suits a warm, friendly orange cat.",
     {"wrong": "How about Rex? It is a great name for a large guard dog.",
      "off_topic": "Interest rates are set by the central bank to control inflation.",
      "short": "Cat.",
      "loop": _loop("Orange cat orange cat.", 6),
      "refusal": "I'm sorry, I can't suggest names.",
      "echo": "Suggest a name for a friendly orange cat."}),
    ("What should I pack for a day at the beach?",
     "Pack sunscreen, a hat, a towel, plenty of water, a snack and a swimsuit.",
     {"wrong": "Pack a heavy winter coat, snow boots and an ice scraper.",
      "off_topic": "The French Revolution began in 1789 with the storming of the Bastille.",
      "short": "Stuff.",
      "loop": _loop("Pack for the beach.", 5),
      "refusal": "As an AI, I do not go to the beach.",
      "echo": "What should I pack for a day at the beach?"}),
    ("What is the opposite of the word 'hot'?",
     "The opposite of 'hot' is 'cold'.",
     {"wrong": "The opposite of 'hot' is 'warm'.",
      "off_topic": "Saturn has a large system of rings made of ice and rock.",
      "short": "",
      "loop": _loop("Hot is hot.", 7),
      "refusal": "I cannot provide antonyms.",
      "echo": "What is the opposite of the word hot?"}),
]


def cases(held_out: bool = False) -> list[JudgeCase]:
    """Every (task, answer, kind) in the set (or the held-out set): one good and six
    bad per task."""
    out: list[JudgeCase] = []
    for g, (task, good, bad) in enumerate(_HELD_OUT if held_out else _TASKS):
        assert set(bad) == set(BAD_KINDS), task
        out.append(JudgeCase(task, good, "good", g))
        out.extend(JudgeCase(task, bad[k], k, g) for k in BAD_KINDS)
    return out


def _bucket(score: float | None) -> str:
    """Scores are continuous (1..5): counted per unit, "1" = [1, 2) ... "5" = 5."""
    if score is None:
        return "none"
    return str(min(5, int(score)))


def _rank(score: float | None) -> float:
    """No score (no evidence) ranks below every score: the curator never keeps it."""
    return float("-inf") if score is None else float(score)


def _win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def discrimination(scored: Iterable[tuple[JudgeCase, float | None]],
                   threshold: float = 4.0) -> dict[str, object]:
    """How well the scores separate good from bad answers.

    * ``pairwise``: over every (good, bad) pair of the same task, the share where the
      good answer scored higher (a tie counts half: a judge that gives everything 5
      scores 0.5);
    * ``auroc``: the same over all good x all bad answers (tasks mixed);
    * ``per_kind``: the pairwise accuracy for each bad kind;
    * ``kept``: the share of each kind scored at or above ``threshold`` (what the
      curator would keep); ``distribution``: how often each score was given.
    """
    rows = list(scored)
    goods = [(c, _rank(s)) for c, s in rows if c.kind == "good"]
    bads = [(c, _rank(s)) for c, s in rows if c.kind != "good"]
    per_kind: dict[str, list[float]] = {k: [] for k in BAD_KINDS}
    for g, gs in goods:
        for b, bs in bads:
            if b.group == g.group:
                per_kind[b.kind].append(_win(gs, bs))
    pairs = [w for ws in per_kind.values() for w in ws]
    auroc = [_win(gs, bs) for _, gs in goods for _, bs in bads]
    kinds = ("good",) + BAD_KINDS
    kept = {k: [s is not None and s >= threshold for c, s in rows if c.kind == k] for k in kinds}
    dist: dict[str, int] = {}
    for _, s in rows:
        dist[_bucket(s)] = dist.get(_bucket(s), 0) + 1
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")   # noqa: E731
    return {"n": len(rows), "pairwise": mean(pairs), "auroc": mean(auroc),
            "per_kind": {k: mean(v) for k, v in per_kind.items()},
            "kept": {k: mean([float(x) for x in v]) for k, v in kept.items()},
            "distribution": dict(sorted(dist.items())), "threshold": threshold}


def measure(score: Callable[[str, str], float | None],
            subset: Iterable[JudgeCase] | None = None,
            threshold: float = 4.0) -> dict[str, object]:
    """Score every case with ``score(task, answer)`` and measure the discrimination."""
    return discrimination([(c, score(c.task, c.answer)) for c in (subset or cases())],
                          threshold)
