"""The cognitive core: ALFRED routes, BRICK and ROBIN talk until they agree, ALFRED
picks the answer, and the exchange becomes memory.

::

    START -> alfred_route -> recall --contrapunto--> brick
                                    --direct-------> alfred_synthesize
                                    --tool---------> tool_request --request--> forge
                                                                  --none-----> brick
    forge --answered--> alfred_synthesize       (the tool answered the task itself)
          --consult---> brick                   (no answer from the tool: the dialogue)
    brick -> robin -> measure --disagree, rounds left--> brick
                              --agreed / round limit / unusable--> alfred_synthesize
    alfred_synthesize -> remember -> END

(``CognitiveGraph.mermaid()`` draws it; tests/test_graph.py pins its edges.)

Decisions are asked under constraint (:mod:`a4ps.cognition.decisions`): the route is
the exact-computation signal or ``models.choose`` over the three routes, BRICK's tool
is ``models.choose`` among the registered tools (or none: then his request for a new
one is ``models.structured`` and the forge makes it), and after a dialogue ALFRED's
answer is a ``models.choose`` among the candidate answers BRICK and ROBIN gave (when
their final answers agree there is nothing to choose). A tool that answers the task
itself (its output has an ``answer`` text, as the seed tool ``calculate`` does) gives
the task's answer; any other output goes to BRICK and ROBIN as context. A
decision that cannot be made is recorded as a problem and as an unparsed decision in
``result["decisions"]``; what the graph then does is said in the step, never passed
off as the model's choice. Free text is only what the personas say.

Each persona turn streams: the graph passes a :class:`~a4ps.cognition.streaming.TurnGuard`
as ``on_token`` and ``cancel`` to ``models.generate`` with the persona's generation
slots (:mod:`a4ps.cognition.generation`), publishes ``task.token`` events (at most one
per ~50 ms per task), stops a turn that starts repeating itself, and stops the task
when the caller's ``cancel`` token is set (``run(..., cancel=event)``): the node in
flight ends and :class:`~a4ps.cognition.state.TaskCancelled` is raised; every node
checks the token before it starts.

Dissonance is measured on the two final answers (the ``Answer:`` line or the first
sentence that is not boilerplate); a round in which one side had no usable reply has
no dissonance (None), not 1.0, and ends the dialogue.

The graph is a LangGraph ``StateGraph`` with a SQLite (or, by setting, PostgreSQL)
checkpointer (thread id = task id) written with ``durability="sync"``, so a process
killed mid-task resumes from the last finished node (``run(..., resume=True)``). Nodes read the persona protos at every
call, so editing BRICK's system prompt or temperature changes BRICK's next turn.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, TypeGuard, cast

# absolute imports: langgraph.json tooling may load this file by path
from a4ps.cognition import decisions, generation, prompts
from a4ps.cognition.answers import agree, final_answer
from a4ps.cognition.checkpoints import is_postgres_url, postgres_saver
from a4ps.cognition.decisions import Decision
from a4ps.cognition.prompts import ROUTES
from a4ps.cognition.state import CognitiveState, TaskCancelled
from a4ps.cognition.streaming import TokenStream, TurnGuard
from a4ps.events import json_safe
from a4ps.models.errors import GenerationCancelled
from a4ps.proto import MethodFault
from a4ps.cognition.dissonance import DissonanceMeter
from a4ps.tools.registry import tool_name
from a4ps.tools.tool_forge import spec_from_request

if TYPE_CHECKING:
    from langgraph.checkpoint.base import BaseCheckpointSaver

    from a4ps.config import Settings
    from a4ps.events import Bus
    from a4ps.memory import MemoryStore
    from a4ps.models.manager import ModelManager
    from a4ps.models.base import CancelToken
    from a4ps.proto import Proto, ProtoManager
    from a4ps.tools.registry import ToolCatalog, ToolLookup
    from a4ps.tools.tool_forge import Forger

log = logging.getLogger(__name__)

NODES = ("alfred_route", "recall", "tool_request", "forge", "brick", "robin", "measure",
         "alfred_synthesize", "remember")
CANDIDATE_CHARS = 400        # an answer candidate ALFRED chooses among, at most


@dataclass
class _Run:
    """What one running task needs beyond its state: the cancel token and its stream."""
    cancel: CancelToken | None
    stream: TokenStream
    owned: bool = True          # False: made by a node (a run started outside run())


@dataclass
class Turn:
    """One persona turn: the usable text (or '' and a problem) and its figures."""
    text: str
    problem: str | None
    model_s: float
    tokens: int
    finish: str | None


class StateNode(Protocol):
    """A node as LangGraph's ``add_node`` types it: the parameter is named ``state``
    (a plain ``Callable[[CognitiveState], ...]`` does not match its protocol)."""

    def __call__(self, state: CognitiveState) -> dict[str, Any]: ...


def _is_catalog(registry: object) -> TypeGuard[ToolCatalog]:
    """Whether the tool seam can also list its tools (a minimal one may not)."""
    return callable(getattr(registry, "list", None))


class CognitiveGraph:
    """Runs tasks through the contrapunto. Parts are passed in; nothing is global.

    ``checkpointer_path=None`` follows ``cognition.checkpointer``: ``"sqlite"`` is
    ``settings.checkpoint_dir / "graph.sqlite"``, a ``postgres://`` URL is that database
    (``cognition/checkpoints.py``); a path or a URL may also be passed directly.
    ``False`` compiles without a checkpointer (LangGraph Studio, benchmarks).
    ``dissonance`` is a ``DissonanceMeter``; by default one over ``models.embed``.
    ``turn_max_tokens`` caps each persona turn over the persona's ``max_tokens`` slot.
    ``token_interval_s``: at most one ``task.token`` event per task this often.
    """

    def __init__(self, protos: ProtoManager, models: ModelManager, memory: MemoryStore,
                 bus: Bus, settings: Settings, *, forge: Forger | None = None,
                 registry: ToolLookup | None = None,
                 dissonance: DissonanceMeter | None = None,
                 checkpointer_path: Path | str | None | bool = None,
                 turn_max_tokens: int | None = None, token_interval_s: float = 0.05) -> None:
        self.protos = protos
        self.models = models
        self.memory = memory
        self.bus = bus
        self.settings = settings
        self.forge = forge
        self.registry = registry
        self._meter = dissonance
        self.turn_max_tokens = turn_max_tokens
        self.token_interval_s = token_interval_s
        if checkpointer_path is None or checkpointer_path is True:
            checkpointer_path = settings.cognition.checkpointer
            if not is_postgres_url(checkpointer_path):
                checkpointer_path = Path(settings.checkpoint_dir) / "graph.sqlite"
        self.checkpointer_url: str | None = \
            checkpointer_path if is_postgres_url(checkpointer_path) else None
        self.checkpointer_path = Path(checkpointer_path) \
            if checkpointer_path and self.checkpointer_url is None else None
        self._pool: Any = None
        self._lock = threading.Lock()
        self._compiled: Any = None
        self._saver: Any = None
        self._conn: sqlite3.Connection | None = None
        self._runs: dict[str, _Run] = {}

    # -- building ------------------------------------------------------------------
    def build(self) -> Any:
        """The (uncompiled) StateGraph: nodes and edges, no checkpointer."""
        from langgraph.graph import END, START, StateGraph

        g = StateGraph(CognitiveState)
        for name in NODES:
            g.add_node(name, self._node(name, getattr(self, f"_{name}")))
        g.add_edge(START, "alfred_route")
        g.add_edge("alfred_route", "recall")
        g.add_conditional_edges("recall", _after_recall,
                                {"contrapunto": "brick", "direct": "alfred_synthesize",
                                 "tool": "tool_request"})
        g.add_conditional_edges("tool_request", _after_tool_request,
                                {"request": "forge", "none": "brick"})
        g.add_conditional_edges("forge", _after_forge,
                                {"answered": "alfred_synthesize", "consult": "brick"})
        g.add_edge("brick", "robin")
        g.add_edge("robin", "measure")
        g.add_conditional_edges("measure", _after_measure,
                                {"again": "brick", "synthesize": "alfred_synthesize"})
        g.add_edge("alfred_synthesize", "remember")
        g.add_edge("remember", END)
        return g

    def _node(self, name: str, fn: Callable[[CognitiveState], dict[str, Any]]) -> StateNode:
        """``fn`` behind the node-boundary cancel check."""
        def node(state: CognitiveState) -> dict[str, Any]:
            self._check_cancel(state, name)
            return fn(state)
        node.__name__ = name
        return node
    def compile(self, checkpointer: Any = None) -> Any:
        return self.build().compile(checkpointer=checkpointer, name="a4ps-contrapunto")

    @property
    def graph(self) -> Any:
        """The compiled graph (with the SQLite checkpointer when configured), built once."""
        with self._lock:
            if self._compiled is None:
                saver: BaseCheckpointSaver[str] | None = None
                if self.checkpointer_url is not None:
                    saver, self._pool = postgres_saver(self.checkpointer_url)
                elif self.checkpointer_path is not None:
                    from langgraph.checkpoint.sqlite import SqliteSaver
                    self.checkpointer_path.parent.mkdir(parents=True, exist_ok=True)
                    # the saver serialises access with its own lock
                    self._conn = sqlite3.connect(str(self.checkpointer_path),
                                                 check_same_thread=False)
                    # WAL + synchronous=NORMAL: a commit survives the process being
                    # killed (SIGKILL); only an OS crash could lose the last one
                    self._conn.execute("PRAGMA journal_mode=WAL")
                    self._conn.execute("PRAGMA synchronous=NORMAL")
                    sqlite_saver = SqliteSaver(self._conn)
                    sqlite_saver.setup()
                    saver = sqlite_saver
                self._saver = saver
                self._compiled = self.compile(saver)
            return self._compiled

    def mermaid(self) -> str:
        return str(self.compile().get_graph().draw_mermaid())

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            if self._pool is not None:
                self._pool.close()
            self._conn = self._pool = self._saver = self._compiled = None

    @property
    def meter(self) -> DissonanceMeter:
        if self._meter is None:
            self._meter = DissonanceMeter(self.models)
        return self._meter

    # -- running -------------------------------------------------------------------
    def _config(self, task_id: str) -> dict[str, Any]:
        return {"configurable": {"thread_id": str(task_id)}, "recursion_limit": 100}

    def checkpoint(self, task_id: str) -> Any:
        """LangGraph's StateSnapshot for the task, or None if it never ran here."""
        graph = self.graph
        if self._saver is None:
            return None
        snap = graph.get_state(self._config(task_id))
        return snap if snap.values else None

    def has_checkpoint(self, task_id: str) -> bool:
        """True when the task started and did not finish: ``run(resume=True)`` continues it."""
        snap = self.checkpoint(task_id)
        return bool(snap is not None and snap.next)

    def forget(self, task_id: str) -> None:
        """Drop the task's checkpoints."""
        self.graph
        if self._saver is not None:
            self._saver.delete_thread(str(task_id))

    def run(self, task_id: str, text: str, *, resume: bool = False,
            route: str | None = None, meta: dict[str, Any] | None = None,
            cancel: CancelToken | None = None) -> dict[str, Any]:
        """Run one task to the end and return its result.

        ``resume=True`` continues from the task's last checkpoint if it has an
        unfinished one, returns the stored result if it already finished, and starts
        afresh otherwise. ``route`` (or ``meta["route"]``) forces ALFRED's decision
        (one of ROUTES). ``meta`` (the task's origin data) goes into the memory row.
        ``cancel`` (anything with ``is_set()``, e.g. a ``threading.Event``) stops the
        task: checked before every node and passed into every model call; a cancelled
        run raises :class:`TaskCancelled` and leaves its checkpoint, so it can resume.
        A task that found no usable answer returns ``status="failed"`` and ``error``.
        """
        meta = dict(meta or {})
        route = route or meta.get("route")
        if route is not None and route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, not {route!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the task text is empty: say what you want done")
        graph = self.graph
        config = self._config(task_id)
        key = str(task_id)
        self._runs[key] = _Run(cancel, TokenStream(self.bus.publish, key,
                                                   interval_s=self.token_interval_s))
        try:
            values: dict[str, Any] | None = None
            if resume and self._saver is not None:
                snap = graph.get_state(config)
                if snap.values and snap.next:
                    log.info("task %s: resuming before %s", task_id, list(snap.next))
                    values = graph.invoke(None, config, durability="sync")
                elif snap.values and snap.values.get("status"):
                    values = dict(snap.values)      # finished before the restart
            if values is None:
                if self._saver is not None:
                    self._saver.delete_thread(key)    # a fresh run, not a continuation
                start: CognitiveState = {"task_id": key, "task": text.strip(),
                                         "meta": _plain(meta)}
                if route:
                    start["route"] = route
                    start["route_reason"] = "forced by the caller"
                kwargs = {"durability": "sync"} if self._saver is not None else {}
                values = graph.invoke(start, config, **kwargs)
        finally:
            self._runs.pop(key, None)
        return _result(values)

    # -- helpers ---------------------------------------------------------------------
    def _run_of(self, state: CognitiveState) -> _Run:
        """The task's cancel token and stream (a run started outside ``run()``, as in
        LangGraph Studio, gets a stream and no cancel token)."""
        key = str(state.get("task_id"))
        run = self._runs.get(key)
        if run is None:
            run = self._runs.setdefault(key, _Run(None, TokenStream(
                self.bus.publish, key, interval_s=self.token_interval_s), owned=False))
        return run

    def _check_cancel(self, state: CognitiveState, node: str) -> None:
        cancel = self._run_of(state).cancel
        if cancel is not None and cancel.is_set():
            raise TaskCancelled(state.get("task_id"), node)

    def _step(self, state: CognitiveState, node: str, persona: str | None, text: str, *,
              round: int | None = None, dissonance: float | None = None,
              problem: str | None = None, **extra: Any) -> None:
        payload = {"task_id": state.get("task_id"), "node": node, "persona": persona,
                   "text": text, "round": round, "dissonance": dissonance, **extra}
        if problem:
            payload["problem"] = problem
        self.bus.publish("task.step", payload)

    def _speak(self, state: CognitiveState, node: str, persona: str, rnd: Any,
               messages: list[dict[str, str]]) -> Turn:
        """One persona turn, streamed; one retry on an unusable reply."""
        proto = self.protos.get(persona)       # looked up now: live edits apply
        gen = generation.settings_of(proto, max_tokens=self.turn_max_tokens)
        run = self._run_of(state)
        spent, tokens = 0.0, 0
        problem: str | None = None
        finish: str | None = None
        msgs = messages
        for _attempt in range(2):
            guard = TurnGuard(run.stream, node, persona, rnd, run.cancel)
            t0 = time.perf_counter()
            text: Any = ""     # a live invoke_llm may return anything: reply_problem says so
            try:
                out = self._invoke(proto, msgs, guard, gen)
                if isinstance(out, str):      # a live invoke_llm that returns text only
                    text, finish, n = out, None, guard.pieces
                else:
                    text, finish, n = getattr(out, "text", None), getattr(out, "finish", None), \
                        getattr(out, "tokens", guard.pieces)
                tokens += int(n or 0)
                if guard.repeated:
                    text, finish = guard.kept(), "repetition"
                problem = prompts.reply_problem(text)
            except GenerationCancelled as e:
                if guard.task_cancelled:
                    raise TaskCancelled(state.get("task_id"), node, str(e)) from e
                tokens += guard.pieces
                if guard.repeated:
                    text, finish = guard.kept(), "repetition"
                    problem = prompts.reply_problem(text)
                else:
                    problem = f"model error: {type(e).__name__}: {e}"
            except MethodFault:        # a live method wedged: the task fails, with why
                raise
            except Exception as e:     # a model failure is the model's, not the graph's
                problem = f"model error: {type(e).__name__}: {e}"
                log.warning("%s: %s", persona, problem)
            finally:
                guard.done()
            spent += time.perf_counter() - t0
            self._check_cancel(state, node)
            if problem is None:
                text = text.strip()
                self._set_last_utterance(proto, text)
                return Turn(text, None, spent, tokens, finish)
            msgs = prompts.retry_nudge(messages, problem)
        return Turn("", f"{persona}: {problem} (after one retry)", spent, tokens, finish)

    def _invoke(self, proto: Proto, messages: list[dict[str, str]], guard: TurnGuard,
                gen: dict[str, Any]) -> Any:
        """The persona's live ``invoke_llm`` (so an edited method speaks), else the model."""
        if proto.has("invoke_llm"):
            return proto.invoke_llm(messages, full=True, on_token=guard, cancel=guard, **gen)
        return self.models.generate(proto.model_name, messages, on_token=guard, cancel=guard,
                                    **gen)

    def _decide(self, state: CognitiveState, node: str, kind: str,
                ask: Callable[[Any], Decision]) -> Decision:
        """Run a decision; a model failure is no decision (with the reason), a cancel stops."""
        cancel = self._run_of(state).cancel
        t0 = time.perf_counter()
        try:
            decision = ask(cancel)
        except GenerationCancelled as e:
            if cancel is not None and cancel.is_set():
                raise TaskCancelled(state.get("task_id"), node, str(e)) from e
            decision = Decision(kind, None, f"{kind}: no decision (model error: {e})",
                                seconds=time.perf_counter() - t0)
        except Exception as e:
            decision = Decision(kind, None,
                                f"{kind}: no decision (model error: {type(e).__name__}: {e})",
                                seconds=time.perf_counter() - t0)
        self._check_cancel(state, node)
        if decision.problem:
            log.info("task %s: %s", state.get("task_id"), decision.problem)
        return decision

    def _set_last_utterance(self, proto: Proto, text: str) -> None:
        manager = getattr(proto, "_manager", None)
        if manager is None or not proto.has("last_utterance"):
            return
        try:
            manager.update(proto.name, {"last_utterance": text[:500]})
        except Exception:       # cosmetic (the UI's speech bubble); never fails a task
            log.debug("could not set %s.last_utterance", proto.name, exc_info=True)

    # -- nodes -----------------------------------------------------------------------
    def _alfred_route(self, state: CognitiveState) -> dict[str, Any]:
        if state.get("route") in ROUTES:      # forced by the caller
            route, why = state["route"], state.get("route_reason") or "forced"
            self._step(state, "alfred_route", "ALFRED", route, route=route, reason=why)
            return {}
        alfred = self.protos.get("ALFRED")
        d = self._decide(state, "alfred_route", "route", lambda cancel: decisions.decide_route(
            self.models, alfred, state["task"], cancel=cancel))
        if d.parsed and d.method == "signal":
            route, why = d.value, f"the task states an exact computation ({d.evidence!r})"
        elif d.parsed:
            route, why = d.value, f"ALFRED chose {d.value} ({d.method})"
        else:
            route = "contrapunto"
            why = f"{d.problem}; running the whole contrapunto, which needs no route decision"
        self._step(state, "alfred_route", "ALFRED", route, route=route, reason=why,
                   problem=d.problem, decision=d.record())
        update: dict[str, Any] = {"route": route, "route_reason": why,
                                  "decisions": [d.record()]}
        if d.problem:
            update["problems"] = [d.problem]
        return update

    def _recall(self, state: CognitiveState) -> dict[str, Any]:
        k = self.settings.cognition.recall_k
        if self.memory is None or k <= 0:
            self._step(state, "recall", None, "memory recall is off")
            return {"memories": []}
        try:
            hits = self.memory.search(state["task"], k=k + 2)
        except Exception as e:
            problem = f"memory search failed: {type(e).__name__}: {e}"
            log.warning("task %s: %s", state.get("task_id"), problem)
            self._step(state, "recall", None, "", problem=problem)
            return {"memories": [], "problems": [problem]}
        memories = [_memory_dict(h) for h in hits
                    if _get(h, "task_id") != state.get("task_id")][:k]
        self._step(state, "recall", None,
                   "\n".join(m["text"][:120] for m in memories) or "nothing relevant remembered",
                   memories=len(memories))
        return {"memories": memories}

    def _tool_request(self, state: CognitiveState) -> dict[str, Any]:
        """BRICK's tool: a registered one he chooses (called with the task's own words
        when it takes one text), or, when none fits, his request for a new one."""
        brick = self.protos.get("BRICK")
        records: list[dict[str, Any]] = []
        problems: list[str] = []
        request: dict[str, Any] | None = None
        menu = self._tool_menu()
        chosen = None
        if menu:
            c = self._decide(state, "tool_request", "tool",
                             lambda cancel: decisions.decide_tool(
                                 self.models, brick, state["task"], menu, cancel=cancel))
            records.append(c.record())
            if c.problem:
                problems.append(c.problem)
            if c.parsed and c.value != decisions.NO_TOOL:
                chosen = next(t for t in menu if t["name"] == c.value)
        if chosen is not None and chosen.get("text_input"):
            request = {"name": chosen["name"], "description": chosen.get("description") or "",
                       "args": {chosen["text_input"]: state["task"]}}
            text = f"tool {chosen['name']}: called with the task's words"
        else:
            d = self._decide(state, "tool_request", "tool_request",
                             lambda cancel: decisions.decide_tool_request(
                                 self.models, brick, state["task"], cancel=cancel))
            records.append(d.record())
            if d.problem:
                problems.append(d.problem)
            request = d.value
            if request is not None and chosen is not None:      # his tool, his arguments
                request = {**request, "name": chosen["name"]}
            text = (f"tool {request['name']}: {request['description']}" if request
                    else "no tool request: BRICK answers without a tool")
        self._step(state, "tool_request", "BRICK", text, tool_request=request,
                   problem="; ".join(problems) or None, decision=records[-1])
        update: dict[str, Any] = {"tool_request": request, "decisions": records}
        if problems:
            update["problems"] = problems
        return update

    def _tool_menu(self) -> list[dict[str, Any]]:
        """The registered tools BRICK may choose among: name, description and the one
        text parameter that takes the task's words (None when it takes other inputs)."""
        registry = self.registry
        if not _is_catalog(registry):
            return []
        try:
            tools = list(registry.list())
        except Exception:
            log.warning("listing the tools failed", exc_info=True)
            return []
        menu = []
        for t in tools:
            try:
                spec = registry.get(t["name"]).get("spec") or {}
            except Exception:
                spec = {}
            inputs = dict(spec.get("inputs") or {})
            text_input = None
            if len(inputs) == 1:
                key, info = next(iter(inputs.items()))
                if str((info or {}).get("type", "")).lower() in ("str", "string", "text"):
                    text_input = key
            menu.append({"name": t["name"], "description": t.get("description") or "",
                         "text_input": text_input})
        return menu

    def _brick(self, state: CognitiveState) -> dict[str, Any]:
        rnd = len(state.get("rounds") or []) + 1
        brick = self.protos.get("BRICK")
        robin_said = state.get("robin_text") if rnd > 1 else None
        return self._contrapunto_turn(state, "brick", "BRICK", rnd, prompts.brick_messages(
            brick, state["task"], memories=state.get("memories") or [],
            robin_said=robin_said, tool_result=state.get("tool_result")))

    def _robin(self, state: CognitiveState) -> dict[str, Any]:
        rnd = len(state.get("rounds") or []) + 1
        robin = self.protos.get("ROBIN")
        return self._contrapunto_turn(state, "robin", "ROBIN", rnd, prompts.robin_messages(
            robin, state["task"], brick_said=(state.get("brick_text") or None) if rnd > 1 else None,
            memories=state.get("memories") or [], tool_result=state.get("tool_result")))

    def _contrapunto_turn(self, state: CognitiveState, node: str, persona: str, rnd: int,
                          messages: list[dict[str, str]]) -> dict[str, Any]:
        """BRICK's or ROBIN's turn in a round: speak, record the step, and the state
        update (``<node>_text``, the turn, the problem if there was one)."""
        turn = self._speak(state, node, persona, rnd, messages)
        self._step(state, node, persona, turn.text, round=rnd, problem=turn.problem,
                   finish=turn.finish)
        update: dict[str, Any] = {f"{node}_text": turn.text,
                                  "turns": [_turn(persona, rnd, turn, None)]}
        if turn.problem:
            update["problems"] = [turn.problem]
        return update

    def _measure(self, state: CognitiveState) -> dict[str, Any]:
        rnd = len(state.get("rounds") or []) + 1
        brick, robin = state.get("brick_text") or "", state.get("robin_text") or ""
        problem = None
        d: float | None = None
        basis = None
        if brick and robin:
            a, b = final_answer(brick), final_answer(robin)
            if agree(brick, robin, state["task"]):
                d, basis = 0.0, "the same final answer"
            else:
                try:
                    d, basis = float(self.meter.between(a, b)), "final answers compared"
                except Exception as e:
                    problem = f"dissonance could not be measured: {type(e).__name__}: {e}"
        cog = self.settings.cognition
        if not brick and not robin:
            stop = "neither BRICK nor ROBIN gave a usable reply"
        elif not brick or not robin:
            stop = f"only {'BRICK' if brick else 'ROBIN'} gave a usable reply"
        elif d is None:
            stop = "dissonance could not be measured"
        elif d < cog.dissonance_threshold:
            stop = "converged"
        elif rnd >= cog.max_rounds:
            stop = "round limit"
        else:
            stop = None
        shown = "dissonance n/a" if d is None else f"dissonance {d:.3f}"
        self._step(state, "measure", None, shown + (f": {stop}" if stop else ""),
                   round=rnd, dissonance=d, problem=problem, stop=stop, basis=basis)
        update: dict[str, Any] = {
            "dissonance": d, "stop": stop,
            "rounds": [{"round": rnd, "brick": brick, "robin": robin, "dissonance": d}]}
        if problem:
            update["problems"] = [problem]
        return update

    def _forge(self, state: CognitiveState) -> dict[str, Any]:
        request = dict(state.get("tool_request") or {})
        result = self._get_tool(state, request)
        if result["ok"]:
            how = {"name": "found by name", "description": "found by description"}.get(
                result.get("found_by") or "", "forged")
            text = f"tool {result.get('name')} v{result.get('version')} ({how})"
            if "output" in result:
                text += f": {_brief(result['output'])}"
        else:
            text = f"tool {result.get('name')}: {result['reason']}"
        self._step(state, "forge", "BRICK", text, tool=result,
                   problem=None if result["ok"] else result["reason"])
        return {"tool_result": result}

    def _get_tool(self, state: CognitiveState, request: dict[str, Any]) -> dict[str, Any]:
        """Find the tool the request needs (by name, then by description, with fitting
        parameters), forge it under the requested name only when none fits, then call
        it with the request's arguments (``{}`` when none were given)."""
        description = str(request.get("description") or state["task"]).strip()
        name = _request_name(request.get("name"), description)
        args = request.get("args")
        call_args = dict(args) if isinstance(args, dict) else {}
        base = {"ok": False, "name": name, "request": request}
        if self.forge is None and self.registry is None:
            return {**base, "reason": "no tool forge configured"}
        try:
            found = (self.registry.match(name, description, call_args)
                     if self.registry is not None else None)
            if found is not None:
                tool, version, attempts = found["name"], found.get("version"), None
            else:
                if self.forge is None:
                    return {**base, "reason": f"no tool fits {name!r} and no tool forge is configured"}
                outcome = self.forge.forge(_tool_spec({**request, "name": name}, state))
                version = getattr(outcome, "version", None)
                attempts = getattr(outcome, "attempts", None)
                if not getattr(outcome, "ok", False):
                    return {**base, "version": version, "attempts": attempts,
                            "reason": f"forge failed: {getattr(outcome, 'reason', None) or 'no reason given'}"}
                made = getattr(outcome, "tool", None)     # the registered name
                tool = made if isinstance(made, str) and made else name
            result = {**base, "ok": True, "name": tool, "version": version, "attempts": attempts,
                      "reused": found is not None, "found_by": found["how"] if found else None,
                      "reason": None}
        except Exception as e:
            log.warning("task %s: tool request failed", state.get("task_id"), exc_info=True)
            return {**base, "reason": f"{type(e).__name__}: {e}"}
        if self.registry is not None:
            result.update(self._call_tool(self.registry, state, result, call_args))
        return result

    def _call_tool(self, registry: ToolLookup, state: CognitiveState, tool: dict[str, Any],
                   args: dict[str, Any]) -> dict[str, Any]:
        """Call a found or forged tool; publish ``tool.invoked`` either way."""
        t0 = time.perf_counter()
        error = None
        try:
            output = _plain(registry.call(tool["name"], args))
        except Exception as e:
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("task %s: calling tool %s failed: %s", state.get("task_id"), tool["name"], e)
        self.bus.publish("tool.invoked", {
            "task_id": state.get("task_id"), "tool": tool["name"], "version": tool.get("version"),
            "args": _plain(args), "ok": error is None, "reused": tool.get("reused"),
            "found_by": tool.get("found_by"), "seconds": round(time.perf_counter() - t0, 4),
            "error": error})
        if error is not None:
            return {"ok": False, "reason": f"calling {tool['name']} failed: {error}"}
        return {"output": output}

    def _alfred_synthesize(self, state: CognitiveState) -> dict[str, Any]:
        if not state.get("rounds") and tool_answer(state.get("tool_result")):
            return self._answer_from_tool(state)
        if not state.get("rounds"):
            return self._answer_alone(state)
        final_d = state.get("dissonance")
        brick, robin = state.get("brick_text") or "", state.get("robin_text") or ""
        rounds = len(state.get("rounds") or [])
        update: dict[str, Any] = {}
        if not brick and not robin:
            reason = ("no usable reply from BRICK or ROBIN: "
                      + "; ".join(state.get("problems") or ["(no detail)"]))
            self._step(state, "alfred_synthesize", "ALFRED", "", dissonance=final_d,
                       problem=reason)
            return {"status": "failed", "error": reason, "answer": "",
                    "answer_source": "none"}
        problem = None
        if not brick or not robin:
            who = "BRICK" if brick else "ROBIN"
            text, source = brick or robin, f"fallback:{who}"
            problem = f"only {who} gave a usable answer; it is the answer without a choice"
        elif agree(brick, robin, state["task"]) or _clip(brick) == _clip(robin):
            text, source = brick, "agreement"
        else:
            alfred = self.protos.get("ALFRED")
            options = {_clip(brick): "BRICK", _clip(robin): "ROBIN"}
            d = self._decide(state, "alfred_synthesize", "answer",
                             lambda cancel: decisions.decide_answer(
                                 self.models, alfred, state["task"], list(options),
                                 tool_result=state.get("tool_result"), cancel=cancel))
            update["decisions"] = [{**d.record(), "value": options.get(d.value)}]
            if d.parsed:
                who = options[d.value]
                text, source = (brick if who == "BRICK" else robin), f"choice:{who}"
            else:
                text, source = brick, "fallback:BRICK"
                problem = f"{d.problem}; the answer is BRICK's, not ALFRED's choice"
        self._step(state, "alfred_synthesize", "ALFRED", text, round=rounds,
                   dissonance=final_d, problem=problem, source=source)
        if problem:
            update["problems"] = [problem]
        high = self.settings.cognition.dissonance_high
        if final_d is not None and final_d > high:
            meta = state.get("meta") or {}
            self.bus.publish("dissonance.high", {
                "task_id": state.get("task_id"), "text": state["task"], "dissonance": final_d,
                "rounds": rounds, "brick": brick, "robin": robin,
                "origin": meta.get("origin") or ("reflection" if meta.get("kind") == "reflection" else None),
                "meta": _plain(meta)})
        return {**update, "answer": text, "answer_source": source, "status": "ok",
                "error": None}

    def _answer_from_tool(self, state: CognitiveState) -> dict[str, Any]:
        """The tool answered the task itself: its answer is ALFRED's, named as the tool's."""
        tool = state.get("tool_result") or {}
        text = tool_answer(tool)
        source = f"tool:{tool.get('name')}"
        self._step(state, "alfred_synthesize", "ALFRED", text, source=source)
        return {"answer": text, "answer_source": source, "status": "ok", "error": None}

    def _answer_alone(self, state: CognitiveState) -> dict[str, Any]:
        """The direct route: ALFRED answers in his own words."""
        alfred = self.protos.get("ALFRED")
        turn = self._speak(state, "alfred_synthesize", "ALFRED", None, prompts.direct_messages(
            alfred, state["task"], memories=state.get("memories") or [],
            tool_result=state.get("tool_result")))
        update: dict[str, Any] = {"turns": [_turn("ALFRED", "answer", turn, None)]}
        if turn.problem:
            self._step(state, "alfred_synthesize", "ALFRED", "", problem=turn.problem)
            return {**update, "problems": [turn.problem], "status": "failed", "answer": "",
                    "answer_source": "none", "error": f"ALFRED could not answer: {turn.problem}"}
        self._step(state, "alfred_synthesize", "ALFRED", turn.text, source="alfred",
                   finish=turn.finish)
        return {**update, "answer": turn.text, "answer_source": "alfred", "status": "ok",
                "error": None}

    def _remember(self, state: CognitiveState) -> dict[str, Any]:
        run = self._runs.get(str(state.get("task_id")))
        if run is not None and not run.owned:      # the last node: forget a Studio run
            self._runs.pop(str(state.get("task_id")), None)
        if state.get("status") != "ok" or self.memory is None:
            why = "nothing to remember (the task failed)" if self.memory is not None else "memory is off"
            self._step(state, "remember", None, why)
            return {"memory_id": None}
        rounds = state.get("rounds") or []
        try:
            mid = self.memory.add(
                f"Task: {state['task']}\nAnswer: {state.get('answer', '')}",
                kind="interaction", persona="ALFRED", task_id=state.get("task_id") or "",
                dissonance=state.get("dissonance") or 0.0,
                meta={**(state.get("meta") or {}), "route": state.get("route"), "rounds": len(rounds),
                      "stop": state.get("stop"), "brick": state.get("brick_text"),
                      "robin": state.get("robin_text"), "source": state.get("answer_source")})
        except Exception as e:
            problem = f"memory write failed: {type(e).__name__}: {e}"
            log.warning("task %s: %s", state.get("task_id"), problem)
            self._step(state, "remember", None, "", problem=problem)
            return {"memory_id": None, "problems": [problem]}
        self._step(state, "remember", None, f"remembered as {mid}", memory_id=str(mid))
        return {"memory_id": str(mid)}


# -- edges (pure functions of the state) ----------------------------------------------

def _after_recall(state: CognitiveState) -> Literal["contrapunto", "direct", "tool"]:
    route = state.get("route")
    # one of ROUTES, checked here (the state's route is a plain str)
    if route in ROUTES:
        return cast(Literal["contrapunto", "direct", "tool"], route)
    return "contrapunto"


def _after_tool_request(state: CognitiveState) -> Literal["request", "none"]:
    return "request" if state.get("tool_request") else "none"


def _after_forge(state: CognitiveState) -> Literal["answered", "consult"]:
    return "answered" if tool_answer(state.get("tool_result")) else "consult"


def tool_answer(tool_result: Any) -> str:
    """The answer a tool gave to the task itself (its output's ``answer`` text), or ''."""
    if not isinstance(tool_result, dict) or not tool_result.get("ok"):
        return ""
    output = tool_result.get("output")
    if isinstance(output, dict) and isinstance(output.get("answer"), str):
        return str(output["answer"]).strip()
    return ""


def _after_measure(state: CognitiveState) -> Literal["again", "synthesize"]:
    return "synthesize" if state.get("stop") else "again"


# -- small helpers ---------------------------------------------------------------------

def _turn(persona: str, rnd: Any, turn: Turn, dissonance: float | None) -> dict[str, Any]:
    return {"persona": persona, "round": rnd, "text": turn.text, "dissonance": dissonance,
            "model_s": round(turn.model_s, 6), "problem": turn.problem,
            "tokens": turn.tokens, "finish": turn.finish}


def _clip(text: str) -> str:
    return text.strip()[:CANDIDATE_CHARS]


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


_plain = json_safe  # checkpoint/payload-safe plain data


def _memory_dict(rec: Any) -> dict[str, Any]:
    return {k: _plain(_get(rec, k)) for k in
            ("id", "text", "persona", "task_id", "ts", "dissonance", "score")}


def _request_name(raw: Any, description: str) -> str:
    """The requested tool name as an identifier; without one, words of the description
    (never one fixed name, which would make every tool a new version of the last)."""
    for candidate in (raw, "_".join(decisions.content_words(description)[:4])):
        if isinstance(candidate, str) and candidate.strip():
            try:
                return tool_name(candidate)
            except ValueError:
                continue
    return "task_tool"


def _brief(value: Any) -> str:
    import json
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:200] + "..."


def _tool_spec(request: dict[str, Any], state: CognitiveState) -> Any:
    """A ToolSpec for the forge from a tool request (BRICK's, or ALFRED's tool route).

    Its arguments become the inputs and one example: the forged tool must run on
    exactly the call this task will make (``{}`` included).
    """
    args = request.get("args")
    extra: dict[str, Any] = {}
    if isinstance(args, dict):
        extra["inputs"] = {k: {"type": type(v).__name__} for k, v in args.items()}
        extra["examples"] = [{"args": args}]
    return spec_from_request(_request_name(request.get("name"), request.get("description") or state["task"]),
                             request.get("description") or state["task"], **extra)


def _result(values: dict[str, Any]) -> dict[str, Any]:
    rounds = list(values.get("rounds") or [])
    turns = list(values.get("turns") or [])
    return {
        "task_id": values.get("task_id"),
        "task": values.get("task"),
        "status": values.get("status") or "failed",
        "error": values.get("error") or (
            None if values.get("status") else "the graph stopped before an answer"),
        "answer": values.get("answer") or "",
        "answer_source": values.get("answer_source"),
        "route": values.get("route"),
        "route_reason": values.get("route_reason"),
        "rounds": rounds,
        "final_dissonance": rounds[-1]["dissonance"] if rounds else None,
        "stop": values.get("stop"),
        "turns": turns,
        "decisions": list(values.get("decisions") or []),
        "memories": list(values.get("memories") or []),
        "memory_id": values.get("memory_id"),
        "tool": values.get("tool_result"),
        "problems": list(values.get("problems") or []),
        "model_s": round(sum(t.get("model_s") or 0.0 for t in turns)
                         + sum(d.get("seconds") or 0.0 for d in values.get("decisions") or []), 6),
        "tokens": sum(t.get("tokens") or 0 for t in turns),
    }
