"""Constrained decisions on the real embedded model (SmolLM2-135M): over 50 calls each,
the route and the tool request always parse. Slow: real model calls.

The tool request is the embedded backend's schema walk; its free-text name field once
came back as '17' for "What is 17 times 23?" (CI), so an unusable name is asked again
as a closed choice (decisions.decide_tool_request) and every request has a name."""
from __future__ import annotations

import pytest

from a4ps.cognition import decisions
from a4ps.cognition.suite import load_suite

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]    # 50 real calls per test
CALLS = 50


@pytest.fixture(scope="module")
def personas(embedded_models):
    """ALFRED and BRICK as the System seeds them (codex prompts), on the embedded model."""
    from a4ps.codex import Codex
    from a4ps.events import EventBus
    from a4ps.system import CODEX_PATH
    codex = Codex.from_toml(CODEX_PATH, EventBus())

    class Persona:
        def __init__(self, name):
            self.name, self.model_name = name, "smollm2-135m"
            self.prompt = codex.system_prompt(name)

        def get(self, key, default=None):
            return self.prompt if key == "system_prompt" else default
    return {"ALFRED": Persona("ALFRED"), "BRICK": Persona("BRICK")}


def texts(n: int) -> list[str]:
    tasks = [t.text for t in load_suite()]
    return (tasks * (n // len(tasks) + 1))[:n]


def test_route_decisions_always_parse(embedded_models, personas):
    routes = []
    for text in texts(CALLS):
        d = decisions.decide_route(embedded_models, personas["ALFRED"], text)
        assert d.parsed, (text, d.problem)
        assert d.value in decisions.ROUTES and set(d.scores) <= set(decisions.ROUTES)
        routes.append(d.value)
    assert len(routes) == CALLS


def test_tool_requests_always_parse(embedded_models, personas):
    for text in texts(CALLS):
        d = decisions.decide_tool_request(embedded_models, personas["BRICK"], text)
        assert d.parsed, (text, d.problem)
        assert d.value["name"] and isinstance(d.value["args"], dict)
