"""A small labelled set of closed choices, to measure how well a small model decides.

Four families of the decisions A4PS asks: the route (as ALFRED's route prompt asks
it), yes/no facts, the sentiment of a text, the topic of a text. Each case is
(messages, options, the right answer). Used by tests/test_models_decide.py and
bench/bench_models.py to compare scoring methods (raw mean / raw sum / calibrated).
"""
from __future__ import annotations

ROUTES = ["direct", "contrapunto", "tool"]
_ROUTE_SYSTEM = ("You are ALFRED, the steward of a small team. BRICK is logical, ROBIN is "
                 "empathetic. You decide how each task is handled.")
_ROUTE_ASK = ("Task: {task}\n\nHow should this task be handled? Answer with one word:\n"
              "direct - a greeting or a simple question you can answer alone\n"
              "contrapunto - BRICK (logic) and ROBIN (feelings) should think it through together\n"
              "tool - it needs a precise calculation or a program")

ROUTE_TASKS = [
    ("Hello!", "direct"),
    ("What is the capital of France?", "direct"),
    ("Good morning, ALFRED.", "direct"),
    ("What colour is the sky on a clear day?", "direct"),
    ("Should I quit my job to start a company with my best friend?", "contrapunto"),
    ("How can I comfort a friend whose dog just died?", "contrapunto"),
    ("Is it right to lie to protect someone's feelings?", "contrapunto"),
    ("My sister and I argue about caring for our old parents. What should we do?", "contrapunto"),
    ("What is 48213 multiplied by 9177?", "tool"),
    ("Compute the SHA-256 hash of the word banana.", "tool"),
    ("Calculate the square root of 987654321 to six decimal places.", "tool"),
    ("Count how many prime numbers there are below 100000.", "tool"),
]

YES_NO = [
    ("Is Paris in France?", "yes"),
    ("Is the sun cold?", "no"),
    ("Do fish live in water?", "yes"),
    ("Can a cat fly like a bird?", "no"),
    ("Is ice frozen water?", "yes"),
    ("Is two bigger than ten?", "no"),
    ("Do people need sleep?", "yes"),
    ("Is the moon made of cheese?", "no"),
    ("Is a dog an animal?", "yes"),
    ("Does it snow in the Sahara every day?", "no"),
]

SENTIMENT = [
    ("I loved this film, the actors were wonderful and I laughed all evening.", "positive"),
    ("Terrible service, cold food, and the waiter was rude. Never again.", "negative"),
    ("The best holiday of my life, everything was perfect.", "positive"),
    ("The phone broke after two days and support ignored me.", "negative"),
    ("What a lovely surprise, thank you so much for the flowers!", "positive"),
    ("I am so disappointed, the book was boring and far too long.", "negative"),
    ("Great value, fast delivery, works exactly as described.", "positive"),
    ("This is the worst hotel I have ever stayed in.", "negative"),
    ("My kids adore this game and so do I.", "positive"),
    ("The concert was loud, late and a waste of money.", "negative"),
]

TOPICS = ["sports", "cooking", "weather", "music"]
TOPIC_TEXTS = [
    ("The striker scored twice and the team won the cup final.", "sports"),
    ("Whisk the eggs with sugar, then fold in the flour and bake for twenty minutes.", "cooking"),
    ("Heavy rain and strong winds are expected tomorrow, with snow in the hills.", "weather"),
    ("The band played their new album and the guitarist's solo was amazing.", "music"),
    ("She ran the marathon in under three hours and broke the club record.", "sports"),
    ("Fry the onions in butter until golden, then add the garlic and tomatoes.", "cooking"),
    ("A sunny morning will turn cloudy, with a chance of thunderstorms by evening.", "weather"),
    ("The orchestra performed a symphony by Beethoven with a famous violinist.", "music"),
]


def cases() -> list[tuple[str, list[dict[str, str]], list[str], str]]:
    """(family, messages, options, answer) for every case."""
    out = []
    for task, answer in ROUTE_TASKS:
        out.append(("route", [{"role": "system", "content": _ROUTE_SYSTEM},
                              {"role": "user", "content": _ROUTE_ASK.format(task=task)}],
                    ROUTES, answer))
    for q, answer in YES_NO:
        out.append(("yes/no", [{"role": "user", "content": f"Answer yes or no. {q}"}],
                    ["yes", "no"], answer))
    for text, answer in SENTIMENT:
        out.append(("sentiment", [{"role": "user", "content":
                                   f"Is this review positive or negative?\n\nReview: {text}"}],
                    ["positive", "negative"], answer))
    for text, answer in TOPIC_TEXTS:
        out.append(("topic", [{"role": "user", "content":
                               f"Which topic is this text about: sports, cooking, weather or "
                               f"music?\n\nText: {text}"}], TOPICS, answer))
    return out


def accuracy(decide, method: str) -> tuple[float, dict[str, float]]:
    """Overall and per-family accuracy of ``decide(messages, options, method) -> value``."""
    per: dict[str, list[bool]] = {}
    for family, msgs, options, answer in cases():
        per.setdefault(family, []).append(decide(msgs, options, method) == answer)
    flat = [ok for oks in per.values() for ok in oks]
    return sum(flat) / len(flat), {f: sum(v) / len(v) for f, v in per.items()}
