"""Issue 14.5: tools are found before they are forged, kept under the requested name,
and called with the request's arguments: the real registry, gate, forge and runsc
sandbox under the graph (personas scripted; ALFRED routes to the tool route and BRICK's
tool requests are scripted structured decisions; BRICK's tool code is scripted)."""
from __future__ import annotations

import pytest

import graph_parts
from a4ps.events import EventRecorder
from a4ps.models.embeddings import HashEmbedder
from a4ps.proto import ProtoManager
from a4ps.tools.registry import ToolRegistry
from a4ps.tools.tool_forge import ToolForge

AGREE = "The answer is exactly what the tool computed."

MEAN_REPLY = '''```python
import statistics

def mean(values: list) -> float:
    return statistics.mean(values)
```

```python
from tool import mean

def test_mean():
    assert mean([1, 2, 3]) == 2
    assert mean([2, 4]) == 3
```
'''

PI_REPLY = '''```python
def pi_digits() -> str:
    return "3.1415"
```

```python
from tool import pi_digits

def test_pi():
    assert pi_digits() == "3.1415"
```
'''


class ScriptedWriter:
    """Plays BRICK writing the tool: the same reply every time; counts the calls."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.calls = 0

    def __call__(self, spec, feedback):
        self.calls += 1
        return self.reply


@pytest.fixture
def world(settings, bus, sandbox):
    made = []

    def build(writer_reply: str, requests: dict[int, dict]):
        """``requests``: BRICK's structured tool request for the n-th tool-route task."""
        registry = ToolRegistry(ProtoManager(bus), settings, bus, embedder=HashEmbedder(),
                                sandbox=sandbox)
        writer = ScriptedWriter(writer_reply)
        forge = ToolForge(registry, sandbox, writer, settings, bus)
        parts = graph_parts.build(settings, bus, graph_parts.script(
            route="tool", tool=lambda n: requests.get(n), brick=AGREE, robin=AGREE),
            forge=forge, registry=registry, memory=False)
        made.append(parts)
        return parts, registry, writer
    yield build
    for p in made:
        p.graph.close()


def request(name: str, description: str, **args: str) -> dict:
    """A tool request as BRICK's structured decision gives it (argument values as JSON text)."""
    return {"name": name, "description": description,
            "args": [{"name": k, "value": v} for k, v in args.items()]}


def test_two_tasks_needing_the_same_capability_forge_once_and_call_twice(world, bus):
    parts, registry, writer = world(MEAN_REPLY, {
        1: request("mean", "arithmetic mean (average) of a list of numbers", values="[1, 2, 3]"),
        2: request("average", "average of a list of numbers", values="[4, 6]")})
    rec = EventRecorder(bus)
    first = parts.graph.run("t-mean-1", "What is the mean of 1, 2 and 3?")
    second = parts.graph.run("t-mean-2", "What is the average of 4 and 6?")

    assert writer.calls == 1 and len(rec.of("tool.created")) == 1        # forged once
    invoked = [e.payload for e in rec.of("tool.invoked")]
    assert [(i["tool"], i["ok"], i["task_id"]) for i in invoked] == [
        ("mean", True, "t-mean-1"), ("mean", True, "t-mean-2")]          # called twice
    assert invoked[0]["reused"] is False and invoked[1]["reused"] is True
    assert invoked[1]["found_by"] == "description" and invoked[1]["args"] == {"values": [4, 6]}
    assert first["tool"]["name"] == "mean" and first["tool"]["output"] == 2
    assert second["tool"]["name"] == "mean" and second["tool"]["output"] == 5
    assert second["tool"]["reused"] and second["tool"]["version"] == 1
    assert [t["name"] for t in registry.list()] == ["mean"]


def test_the_requested_name_is_kept_and_found_again_by_name(world, bus):
    mean = "arithmetic mean (average) of a list of numbers"
    parts, registry, writer = world(MEAN_REPLY, {1: request("mean", mean, values="[1, 2, 3]"),
                                                 2: request("mean", mean, values="[10, 20]")})
    rec = EventRecorder(bus)
    parts.graph.run("t-a", "mean of 1, 2, 3?")
    r = parts.graph.run("t-b", "mean of 10 and 20?")
    assert writer.calls == 1
    assert r["tool"]["found_by"] == "name" and r["tool"]["output"] == 15
    assert [e.payload["tool"] for e in rec.of("tool.invoked")] == ["mean", "mean"]


def test_a_tool_forged_without_arguments_is_called_in_the_same_task(world, bus):
    parts, registry, writer = world(PI_REPLY, {1: request("pi_digits", "the first digits of pi")})
    rec = EventRecorder(bus)
    r = parts.graph.run("t-pi", "What are the first digits of pi?")
    assert r["tool"]["request"]["args"] == {}
    assert r["tool"]["ok"] and r["tool"]["output"] == "3.1415"
    [invoked] = [e.payload for e in rec.of("tool.invoked")]
    assert invoked["args"] == {} and invoked["ok"]
    brick_calls = [c for c in parts.backend.calls if graph_parts.persona_of(c[1]) == "BRICK"
                   and "decision" not in c[2]]
    assert 'Tool pi_digits returned: "3.1415"' in brick_calls[0][1][-1]["content"]


def test_the_tool_route_keeps_the_requested_name(world, bus):
    """ALFRED's tool route: the request (a structured decision, see CONTRACTS.md) names
    the tool; the forge registers it under that name, not a fixed one."""
    parts, registry, writer = world(MEAN_REPLY, {})
    state = {"task_id": "t-route", "task": "What is the mean of 1, 2 and 3?", "route": "tool"}
    request = {"name": "mean", "description": "arithmetic mean of a list of numbers",
               "args": {"values": [1, 2, 3]}}
    result = parts.graph._get_tool(state, request)
    assert result["ok"] and result["name"] == "mean" and result["output"] == 2
    assert [t["name"] for t in registry.list()] == ["mean"]
    # without a name, words of the description name it (never one fixed name)
    from a4ps.cognition.graph import _request_name
    assert _request_name(None, "What is the average of some numbers?") == "average_numbers"
    assert _request_name("", "") == "task_tool"


def test_a_call_that_fails_is_reported_and_published(world, bus):
    parts, registry, writer = world(MEAN_REPLY, {})
    state = {"task_id": "t-bad", "task": "mean of nothing"}
    rec = EventRecorder(bus)
    result = parts.graph._get_tool(state, {"name": "mean", "description": "arithmetic mean",
                                           "args": {"values": [1, 2]}})
    assert result["ok"] and result["output"] == 1.5
    result = parts.graph._get_tool(state, {"name": "mean", "description": "arithmetic mean",
                                           "args": {"values": []}})
    # the same name with an empty list: found by name, called, and the error reported
    assert not result["ok"] and "StatisticsError" in result["reason"]
    assert [e.payload["ok"] for e in rec.of("tool.invoked")] == [True, False]
    assert writer.calls == 1


@pytest.mark.slow
def test_reuse_with_the_real_minilm_embedder(settings, bus, sandbox, minilm):
    """Paraphrases find the tool; a different capability, or parameters that do not fit
    (celsius vs fahrenheit read alike to MiniLM), forge a new one."""
    from a4ps.tools.registry import ToolSpec
    reg = ToolRegistry(ProtoManager(bus), settings, bus, embedder=minilm, sandbox=sandbox)
    reg.register(ToolSpec(name="mean", description="arithmetic mean (average) of a list of numbers"),
                 "import statistics\n\ndef mean(values):\n    return statistics.mean(values)\n", "", "BRICK")
    reg.register(ToolSpec(name="c_to_f", description="convert a temperature from celsius to fahrenheit"),
                 "def c_to_f(celsius):\n    return celsius * 9 / 5 + 32\n", "", "BRICK")
    assert reg.match("avg", "compute the mean of some values", {"values": [1, 2]})["name"] == "mean"
    assert reg.match("average", "average of a list of numbers", {"values": [1]})["name"] == "mean"
    assert reg.match("days", "number of days between two dates", {"start": "x"}) is None
    assert reg.match("f_to_c", "convert fahrenheit to celsius", {"fahrenheit": 212}) is None
    assert reg.match("temp", "convert celsius to fahrenheit", {"celsius": 100})["name"] == "c_to_f"
