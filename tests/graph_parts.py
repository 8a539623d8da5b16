"""Builds a CognitiveGraph on scripted models for tests, the kill/resume worker and
the benchmark: real ProtoManager personas (with the System's live ``invoke_llm``),
real ModelManager over the ScriptedBackend, HashEmbedder, real LanceDB memory."""
from __future__ import annotations

import itertools
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PROMPTS = {
    "ALFRED": "You are ALFRED, the steward: you route tasks and give the final answer.",
    "BRICK": "You are BRICK, the logical channel: analyse precisely.",
    "ROBIN": "You are ROBIN, the empathetic channel: care for the people involved.",
}


def persona_of(messages: list[dict[str, str]]) -> str:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    for name in PROMPTS:
        if system.startswith(f"You are {name}"):
            return name
    return "?"


def is_route(messages: list[dict[str, str]]) -> bool:
    from a4ps.cognition.prompts import ROUTE_ASK
    return ROUTE_ASK in messages[0]["content"]


def is_answer_choice(messages: list[dict[str, str]]) -> bool:
    """ALFRED's answer choice: the task under his bare name (prompts.answer_choice_messages)."""
    return messages[0]["role"] == "system" and messages[0]["content"] == "You are ALFRED."


def is_tool_choice(messages: list[dict[str, str]]) -> bool:
    from a4ps.cognition.prompts import TOOL_ASK
    return TOOL_ASK in messages[0]["content"]


def is_tool_request(messages: list[dict[str, str]]) -> bool:
    return "Describe the small Python function" in messages[-1]["content"]


Say = str | Callable[[int], str]


def script(*, route: str = "contrapunto", brick: Say = "BRICK analysis.",
           robin: Say = "ROBIN view.", answer: str = "ALFRED's final answer.",
           pick: str = "BRICK", tool: Any = None, use: str = "none",
           log: list[str] | None = None) -> Callable[..., Any]:
    """A reply function for the ScriptedBackend's free text *and* decisions.

    ``brick``/``robin`` may be functions of their call number (1..). Decisions:
    ``route`` (one of the routes, answered as the word the model is offered for it; or
    any text to see a DecisionError), ``pick`` ("BRICK" or "ROBIN": ALFRED's answer
    choice), ``use`` (BRICK's choice among registered tools, "none" for none) and
    ``tool`` (the tool-request object, or a string that is not JSON; or a function of
    the request's number, 1..).
    """
    from a4ps.cognition.prompts import ROUTE_LABELS
    counts = {"BRICK": itertools.count(1), "ROBIN": itertools.count(1),
              "tool": itertools.count(1)}

    def reply(messages: list[dict[str, str]], asked: Any = None) -> Any:
        who = persona_of(messages)
        if is_route(messages):
            if log is not None:
                log.append("ALFRED/route")
            return ROUTE_LABELS.get(route, route)
        if is_tool_choice(messages):
            if log is not None:
                log.append("BRICK/tool choice")
            return use
        if is_answer_choice(messages):
            if log is not None:
                log.append("ALFRED/choice")
            return asked[0 if pick == "BRICK" else 1] if isinstance(asked, list) else pick
        if is_tool_request(messages):
            if log is not None:
                log.append("BRICK/tool")
            said = tool(next(counts["tool"])) if callable(tool) else tool
            return said if said is not None else "no tool"
        if log is not None:
            log.append(who)
        if who == "ALFRED":
            return answer
        if who in counts:
            say = brick if who == "BRICK" else robin
            return say(next(counts[who])) if callable(say) else say
        return "?"
    return reply


def seed_personas(bus: Any, models: Any, model_name: str = "scripted-m") -> Any:
    from a4ps.proto import ProtoManager
    from a4ps.system import INVOKE_LLM
    from a4ps.cognition.generation import defaults_for
    protos = ProtoManager(bus)
    protos.provide("models", models)
    protos.create("persona", {"temperature": 0.0, "status": "idle", "last_utterance": ""},
                  methods={"invoke_llm": INVOKE_LLM})
    for name, prompt in PROMPTS.items():
        protos.clone("persona", name, role=name.lower(), model_name=model_name,
                     system_prompt=prompt, **defaults_for(name))
    return protos


@dataclass
class Parts:
    graph: Any
    backend: Any
    protos: Any
    models: Any
    memory: Any
    settings: Any


def build(settings: Any, bus: Any, replies: Any, *, latency_s: float = 0.0,
          memory: bool = True, checkpoints: bool = True, forge: Any = None,
          registry: Any = None, **cognition: Any) -> Parts:
    from a4ps.cognition.graph import CognitiveGraph
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.models.manager import ModelManager
    from a4ps.models.scripted import ScriptedBackend
    if cognition:
        settings = settings.model_copy(
            update={"cognition": settings.cognition.model_copy(update=cognition)})
    embedder = HashEmbedder()
    decide = replies if callable(replies) and _takes_two(replies) else None
    backend = ScriptedBackend(replies, latency_s=latency_s, decide=decide)
    models = ModelManager(settings, bus, backend=backend, embedder=embedder)
    protos = seed_personas(bus, models)
    mem = None
    if memory:
        from a4ps.memory import MemoryManager
        mem = MemoryManager(settings, embedder, bus=bus)
    graph = CognitiveGraph(protos, models, mem, bus, settings, forge=forge, registry=registry,
                           checkpointer_path=None if checkpoints else False)
    return Parts(graph, backend, protos, models, mem, settings)


def _takes_two(fn: Any) -> bool:
    import inspect
    try:
        return len(inspect.signature(fn).parameters) >= 2
    except (TypeError, ValueError):
        return False


def kill_worker_mid_task(cmd: list[str], calls: Path, env: dict[str, str],
                         after_calls: int = 4) -> list[str]:
    """Start ``tests/graph_worker.py`` (``cmd``), SIGKILL it once it has made
    ``after_calls`` model calls, and return the lines of its ``calls.log``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if calls.exists() and len(calls.read_text().splitlines()) >= after_calls:
                break
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"worker exited early: {out[-2000:]}")
            time.sleep(0.02)
        else:
            raise AssertionError("worker made no progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout:
            proc.stdout.close()
    return calls.read_text().splitlines()
