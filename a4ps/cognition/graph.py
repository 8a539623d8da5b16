"""The cognitive core: ALFRED routes, BRICK and ROBIN talk until they converge, ALFRED
answers, and the exchange becomes memory.

::

    START -> alfred_route -> recall --contrapunto--> brick
                                    --direct-------> alfred_synthesize
                                    --tool---------> forge -> brick
    brick --TOOL: request--> forge -> brick      (once per task)
    brick -> robin -> measure --above threshold, rounds left--> brick
                              --converged / round limit-----> alfred_synthesize
    alfred_synthesize -> remember -> END

(``CognitiveGraph.mermaid()`` draws it; tests/test_graph.py pins its edges.)

The graph is a LangGraph ``StateGraph`` with a SQLite (or, by setting, PostgreSQL)
checkpointer (thread id = task id) written with ``durability="sync"``, so a process
killed mid-task resumes from the last finished node (``run(..., resume=True)``). Nodes
read the persona protos at every call, so editing BRICK's system prompt changes BRICK's
next turn.

A model that answers nothing or garbage never crashes the graph: the turn is retried
once, the problem is recorded in the step (``task.step`` ``problem``) and the task
either recovers (ALFRED's answer is assembled from the dialogue) or ends with
``status="failed"`` and a clear ``error`` in the result.
"""
from __future__ import annotations

import contextvars
import logging
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

# absolute imports: langgraph.json loads this file by path
from a4ps.cognition import prompts
from a4ps.cognition.checkpoints import is_postgres_url
from a4ps.cognition.prompts import DEFAULT_ROUTE, ROUTES
from a4ps.cognition.state import CognitiveState, TaskCancelled
from a4ps.events import json_safe
from a4ps.models.errors import GenerationCancelled
from a4ps.proto import MethodFault

if TYPE_CHECKING:
    from a4ps.config import Settings
    from a4ps.events import EventBus

log = logging.getLogger(__name__)

NODES = ("alfred_route", "recall", "brick", "robin", "measure", "forge",
         "alfred_synthesize", "remember")
# the running task's cancel token, read by every model call of that run
_CANCEL: contextvars.ContextVar[Any] = contextvars.ContextVar("a4ps_graph_cancel", default=None)


class CognitiveGraph:
    """Runs tasks through the contrapunto. Parts are passed in; nothing is global.

    ``checkpointer_path=None`` follows ``cognition.checkpointer``: ``"sqlite"`` is
    ``settings.checkpoint_dir / "graph.sqlite"``, a ``postgres://`` URL is that database
    (``cognition/checkpoints.py``); a path or a URL may also be passed directly.
    ``False`` compiles without a checkpointer (LangGraph Studio, benchmarks).
    ``dissonance`` is a ``DissonanceMeter``; by default one over ``models.embed``.
    ``turn_max_tokens`` caps each persona turn (None: the backend's default).
    """

    def __init__(self, protos: Any, models: Any, memory: Any, bus: EventBus,
                 settings: Settings, *, forge: Any = None, registry: Any = None,
                 dissonance: Any = None, checkpointer_path: Path | str | None | bool = None,
                 turn_max_tokens: int | None = None) -> None:
        self.protos = protos
        self.models = models
        self.memory = memory
        self.bus = bus
        self.settings = settings
        self.forge = forge
        self.registry = registry
        self._meter = dissonance
        self.turn_max_tokens = turn_max_tokens
        if checkpointer_path is None or checkpointer_path is True:
            checkpointer_path = settings.cognition.checkpointer
            if not is_postgres_url(checkpointer_path):
                checkpointer_path = Path(settings.checkpoint_dir) / "graph.sqlite"
        self.checkpointer_url = checkpointer_path if is_postgres_url(checkpointer_path) else None
        self.checkpointer_path = Path(checkpointer_path) \
            if checkpointer_path and self.checkpointer_url is None else None
        self._pool: Any = None
        self._lock = threading.Lock()
        self._compiled: Any = None
        self._saver: Any = None
        self._conn: sqlite3.Connection | None = None

    # -- building ------------------------------------------------------------------
    def build(self) -> Any:
        """The (uncompiled) StateGraph: nodes and edges, no checkpointer."""
        from langgraph.graph import END, START, StateGraph

        g = StateGraph(CognitiveState)
        g.add_node("alfred_route", self._alfred_route)
        g.add_node("recall", self._recall)
        g.add_node("brick", self._brick)
        g.add_node("robin", self._robin)
        g.add_node("measure", self._measure)
        g.add_node("forge", self._forge)
        g.add_node("alfred_synthesize", self._alfred_synthesize)
        g.add_node("remember", self._remember)
        g.add_edge(START, "alfred_route")
        g.add_edge("alfred_route", "recall")
        g.add_conditional_edges("recall", _after_recall,
                                {"contrapunto": "brick", "direct": "alfred_synthesize",
                                 "tool": "forge"})
        g.add_conditional_edges("brick", _after_brick, {"forge": "forge", "robin": "robin"})
        g.add_edge("forge", "brick")
        g.add_edge("robin", "measure")
        g.add_conditional_edges("measure", self._after_measure,
                                {"again": "brick", "synthesize": "alfred_synthesize"})
        g.add_edge("alfred_synthesize", "remember")
        g.add_edge("remember", END)
        return g

    def compile(self, checkpointer: Any = None) -> Any:
        return self.build().compile(checkpointer=checkpointer, name="a4ps-contrapunto")

    @property
    def graph(self) -> Any:
        """The compiled graph (with the SQLite checkpointer when configured), built once."""
        with self._lock:
            if self._compiled is None:
                saver = None
                if self.checkpointer_url is not None:
                    from a4ps.cognition.checkpoints import postgres_saver
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
                    saver = SqliteSaver(self._conn)
                    saver.setup()
                self._saver = saver
                self._compiled = self.compile(saver)
            return self._compiled

    def mermaid(self) -> str:
        return self.compile().get_graph().draw_mermaid()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            if self._pool is not None:
                self._pool.close()
            self._conn = self._pool = self._saver = self._compiled = None

    @property
    def meter(self) -> Any:
        if self._meter is None:
            from a4ps.cognition.dissonance import DissonanceMeter
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
            cancel: Any = None) -> dict[str, Any]:
        """Run one task to the end and return its result.

        ``resume=True`` continues from the task's last checkpoint if it has an
        unfinished one, returns the stored result if it already finished, and starts
        afresh otherwise. ``route`` (or ``meta["route"]``) forces ALFRED's decision
        (one of ROUTES). ``meta`` (the task's origin data) goes into the memory row.
        A task that found no usable answer returns ``status="failed"`` and ``error``.
        ``cancel`` (anything with ``is_set()``, e.g. a ``threading.Event``) is checked
        at every node boundary and passed into every model call: once set, the run
        raises :class:`TaskCancelled` (the checkpoint keeps the finished nodes).
        """
        meta = dict(meta or {})
        route = route or meta.get("route")
        if route is not None and route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, not {route!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the task text is empty: say what you want done")
        graph = self.graph
        config = self._config(task_id)
        values: dict[str, Any] | None = None
        token = _CANCEL.set(cancel)
        try:
            if resume and self._saver is not None:
                snap = graph.get_state(config)
                if snap.values and snap.next:
                    log.info("task %s: resuming before %s", task_id, list(snap.next))
                    values = self._drive(None, config, task_id, cancel, durability="sync")
                elif snap.values and snap.values.get("status"):
                    values = dict(snap.values)      # finished before the restart
            if values is None:
                if self._saver is not None:
                    self._saver.delete_thread(str(task_id))    # a fresh run, not a continuation
                start: CognitiveState = {"task_id": str(task_id), "task": text.strip(),
                                         "meta": _plain(meta)}
                if route:
                    start["route"] = route
                    start["route_reason"] = "forced by the caller"
                kwargs = {"durability": "sync"} if self._saver is not None else {}
                values = self._drive(start, config, task_id, cancel, **kwargs)
        finally:
            _CANCEL.reset(token)
        return _result(values)

    def _drive(self, start: Any, config: dict[str, Any], task_id: str, cancel: Any,
               **kwargs: Any) -> dict[str, Any]:
        """Run the graph node by node; stop at the first boundary after ``cancel`` is set."""
        if cancel is not None and cancel.is_set():
            raise TaskCancelled(task_id, None, "cancelled before it started")
        values: dict[str, Any] = {}
        last: str | None = None
        stream = self.graph.stream(start, config, stream_mode=["updates", "values"], **kwargs)
        try:
            for mode, chunk in stream:
                if mode == "values":
                    values = chunk
                    continue
                last = next(iter(chunk), last)          # the node that just finished
                if cancel is not None and cancel.is_set() and last != "remember":
                    raise TaskCancelled(task_id, last)
        except GenerationCancelled as e:     # a model call the token stopped mid-node
            raise TaskCancelled(task_id, last, f"generation stopped ({e})") from None
        finally:
            stream.close()
        return values

    # -- helpers ---------------------------------------------------------------------
    def _step(self, state: CognitiveState, node: str, persona: str | None, text: str, *,
              round: int | None = None, dissonance: float | None = None,
              problem: str | None = None, **extra: Any) -> None:
        payload = {"task_id": state.get("task_id"), "node": node, "persona": persona,
                   "text": text, "round": round, "dissonance": dissonance, **extra}
        if problem:
            payload["problem"] = problem
        self.bus.publish("task.step", payload)

    def _speak(self, persona: str, messages: list[dict[str, str]], *,
               max_tokens: int | None = None, check: bool = True
               ) -> tuple[str, str | None, float]:
        """(text, problem, model seconds). One retry on an unusable reply."""
        proto = self.protos.get(persona)       # looked up now: live edits apply
        spent = 0.0
        problem: str | None = None
        msgs = messages
        for attempt in range(2):
            t0 = time.perf_counter()
            try:
                reply = self._invoke(proto, msgs, max_tokens)
                problem = prompts.reply_problem(reply) if check else (
                    None if isinstance(reply, str) else "model returned no text")
            except GenerationCancelled:
                raise                  # the task is being cancelled: no retry
            except MethodFault:        # a live method wedged: the task fails, with why
                raise
            except Exception as e:     # a model failure is the model's, not the graph's
                reply, problem = "", f"model error: {type(e).__name__}: {e}"
                log.warning("%s: %s", persona, problem)
            spent += time.perf_counter() - t0
            if problem is None:
                text = reply.strip()
                self._set_last_utterance(proto, text)
                return text, None, spent
            msgs = prompts.retry_nudge(messages, problem)
        return "", f"{persona}: {problem} (after one retry)", spent

    def _invoke(self, proto: Any, messages: list[dict[str, str]], max_tokens: int | None) -> Any:
        max_tokens = max_tokens or self.turn_max_tokens
        kw = {"max_tokens": max_tokens} if max_tokens else {}
        if _CANCEL.get() is not None:
            kw["cancel"] = _CANCEL.get()
        if proto.has("invoke_llm"):
            return proto.invoke_llm(messages, **kw)
        return self.models.chat(proto.model_name, messages,
                                temperature=proto.get("temperature"), **kw)

    def _set_last_utterance(self, proto: Any, text: str) -> None:
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
        text, problem, model_s = self._speak(
            "ALFRED", prompts.route_messages(alfred, state["task"]), max_tokens=8, check=False)
        route, why = prompts.parse_route(text)
        if problem:
            why = f"{problem}; defaulting to the contrapunto"
            route = DEFAULT_ROUTE
        self._step(state, "alfred_route", "ALFRED", route, route=route, reason=why,
                   problem=problem)
        update: dict[str, Any] = {"route": route, "route_reason": why,
                                  "turns": [_turn("ALFRED", "route", text, None, model_s, problem)]}
        if route == "tool":
            update["tool_request"] = {"name": None, "description": state["task"], "args": None}
        if problem:
            update["problems"] = [problem]
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

    def _brick(self, state: CognitiveState) -> dict[str, Any]:
        rnd = len(state.get("rounds") or []) + 1
        brick = self.protos.get("BRICK")
        robin_said = state.get("robin_text") if rnd > 1 else None
        allow_tool = state.get("tool_result") is None
        text, problem, model_s = self._speak("BRICK", prompts.brick_messages(
            brick, state["task"], memories=state.get("memories") or [],
            robin_said=robin_said, tool_result=state.get("tool_result"),
            allow_tool=allow_tool))
        update: dict[str, Any] = {
            "brick_text": text,
            "turns": [_turn("BRICK", rnd, text, None, model_s, problem)]}
        request = prompts.parse_tool_request(text) if allow_tool and text else None
        if request is not None:
            update["tool_request"] = request.to_dict()
        if problem:
            update["problems"] = [problem]
        self._step(state, "brick", "BRICK", text, round=rnd, problem=problem,
                   tool_request=request.to_dict() if request else None)
        return update

    def _robin(self, state: CognitiveState) -> dict[str, Any]:
        rnd = len(state.get("rounds") or []) + 1
        robin = self.protos.get("ROBIN")
        text, problem, model_s = self._speak("ROBIN", prompts.robin_messages(
            robin, state["task"], brick_said=state.get("brick_text") or "",
            memories=state.get("memories") or []))
        self._step(state, "robin", "ROBIN", text, round=rnd, problem=problem)
        update: dict[str, Any] = {"robin_text": text,
                                  "turns": [_turn("ROBIN", rnd, text, None, model_s, problem)]}
        if problem:
            update["problems"] = [problem]
        return update

    def _measure(self, state: CognitiveState) -> dict[str, Any]:
        rnd = len(state.get("rounds") or []) + 1
        brick, robin = state.get("brick_text") or "", state.get("robin_text") or ""
        problem = None
        try:
            d = float(self.meter.between(brick, robin))
        except Exception as e:
            problem = f"dissonance could not be measured: {type(e).__name__}: {e}"
            d = 1.0
        cog = self.settings.cognition
        if not brick and not robin:
            stop = "neither BRICK nor ROBIN gave a usable reply"
        elif d < cog.dissonance_threshold:
            stop = "converged"
        elif rnd >= cog.max_rounds:
            stop = "round limit"
        else:
            stop = None
        self._step(state, "measure", None, f"dissonance {d:.3f}" + (f": {stop}" if stop else ""),
                   round=rnd, dissonance=d, problem=problem, stop=stop)
        update: dict[str, Any] = {
            "dissonance": d, "stop": stop,
            "rounds": [{"round": rnd, "brick": brick, "robin": robin, "dissonance": d}]}
        if problem:
            update["problems"] = [problem]
        return update

    @staticmethod
    def _after_measure(state: CognitiveState) -> Literal["again", "synthesize"]:
        return "synthesize" if state.get("stop") else "again"

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
            result.update(self._call_tool(state, result, call_args))
        return result

    def _call_tool(self, state: CognitiveState, tool: dict[str, Any],
                   args: dict[str, Any]) -> dict[str, Any]:
        """Call a found or forged tool; publish ``tool.invoked`` either way."""
        t0 = time.perf_counter()
        error = None
        try:
            output = _plain(self.registry.call(tool["name"], args))
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
        alfred = self.protos.get("ALFRED")
        route = state.get("route") or DEFAULT_ROUTE
        brick, robin = state.get("brick_text") or "", state.get("robin_text") or ""
        final_d = state.get("dissonance")
        dialogue = bool(state.get("rounds"))
        if dialogue and not brick and not robin:
            reason = ("no usable reply from BRICK or ROBIN: "
                      + "; ".join(state.get("problems") or ["(no detail)"]))
            self._step(state, "alfred_synthesize", "ALFRED", "", dissonance=final_d,
                       problem=reason)
            return {"status": "failed", "error": reason, "answer": ""}
        if dialogue:
            messages = prompts.synthesis_messages(alfred, state["task"], brick_said=brick,
                                                  robin_said=robin,
                                                  tool_result=state.get("tool_result"))
        else:
            messages = prompts.direct_messages(alfred, state["task"],
                                               memories=state.get("memories") or [],
                                               tool_result=state.get("tool_result"))
        text, problem, model_s = self._speak("ALFRED", messages)
        update: dict[str, Any] = {"turns": [_turn("ALFRED", "answer", text, final_d, model_s, problem)]}
        if problem:
            update["problems"] = [problem]
            if dialogue:        # recover: the dialogue itself is an answer
                text = "\n\n".join(f"{p}: {t}" for p, t in (("BRICK", brick), ("ROBIN", robin)) if t)
                problem += "; the answer is BRICK's and ROBIN's last words"
            else:
                self._step(state, "alfred_synthesize", "ALFRED", "", problem=problem)
                return {**update, "status": "failed", "answer": "",
                        "error": f"ALFRED could not answer: {problem}"}
        self._step(state, "alfred_synthesize", "ALFRED", text,
                   round=len(state.get("rounds") or []) or None, dissonance=final_d,
                   problem=problem)
        high = self.settings.cognition.dissonance_high
        if dialogue and final_d is not None and final_d > high:
            meta = state.get("meta") or {}
            self.bus.publish("dissonance.high", {
                "task_id": state.get("task_id"), "text": state["task"], "dissonance": final_d,
                "rounds": len(state.get("rounds") or []),
                "brick": state.get("brick_text") or "", "robin": state.get("robin_text") or "",
                "origin": meta.get("origin") or ("reflection" if meta.get("kind") == "reflection" else None),
                "meta": _plain(meta)})
        return {**update, "answer": text, "status": "ok", "error": None}

    def _remember(self, state: CognitiveState) -> dict[str, Any]:
        if state.get("status") != "ok" or self.memory is None:
            why = "nothing to remember (the task failed)" if self.memory is not None else "memory is off"
            self._step(state, "remember", None, why)
            return {"memory_id": None}
        rounds = state.get("rounds") or []
        try:
            mid = self.memory.add(
                f"Task: {state['task']}\nAnswer: {state.get('answer', '')}",
                kind="interaction", persona="ALFRED", task_id=state.get("task_id"),
                dissonance=state.get("dissonance"),
                meta={**(state.get("meta") or {}), "route": state.get("route"), "rounds": len(rounds),
                      "stop": state.get("stop"), "brick": state.get("brick_text"),
                      "robin": state.get("robin_text")})
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
    return route if route in ROUTES else DEFAULT_ROUTE


def _after_brick(state: CognitiveState) -> Literal["forge", "robin"]:
    if state.get("tool_request") and state.get("tool_result") is None:
        return "forge"
    return "robin"


# -- small helpers ---------------------------------------------------------------------

def _turn(persona: str, rnd: Any, text: str, dissonance: float | None, model_s: float,
          problem: str | None) -> dict[str, Any]:
    return {"persona": persona, "round": rnd, "text": text, "dissonance": dissonance,
            "model_s": round(model_s, 6), "problem": problem}


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


_plain = json_safe  # checkpoint/payload-safe plain data


def _memory_dict(rec: Any) -> dict[str, Any]:
    return {k: _plain(_get(rec, k)) for k in
            ("id", "text", "persona", "task_id", "ts", "dissonance", "score")}


_NAME_STOPWORDS = frozenset(
    "a an the of to for and or in on by with from what which how is are be many much "
    "please me my i you it this that some give tell find get compute calculate".split())


def _request_name(raw: Any, description: str) -> str:
    """The requested tool name as an identifier; without one, words of the description
    (never one fixed name, which would make every tool a new version of the last)."""
    from a4ps.tools.registry import tool_name
    for candidate in (raw, "_".join([w for w in re.findall(r"[a-z]+", description.lower())
                                     if w not in _NAME_STOPWORDS][:4])):
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
    from a4ps.tools.tool_forge import spec_from_request
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
        "route": values.get("route"),
        "route_reason": values.get("route_reason"),
        "rounds": rounds,
        "final_dissonance": rounds[-1]["dissonance"] if rounds else None,
        "stop": values.get("stop"),
        "turns": turns,
        "memories": list(values.get("memories") or []),
        "memory_id": values.get("memory_id"),
        "tool": values.get("tool_result"),
        "problems": list(values.get("problems") or []),
        "model_s": round(sum(t.get("model_s") or 0.0 for t in turns), 6),
    }


# -- LangGraph CLI / Studio -------------------------------------------------------------

class _Lazy:
    """Attribute access forwarded to a part built on first use."""

    def __init__(self, get: Callable[[], Any]) -> None:
        self._get = get

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)


def make_graph(config: Any = None) -> Any:
    """Compiled graph for ``langgraph.json`` (LangGraph CLI / Studio).

    Loads settings only; the System (models, memory, personas) is built and started
    the first time a node runs, so drawing the graph costs nothing. The LangGraph
    server brings its own checkpointer, so this one is compiled without ours.
    Input: ``{"task_id": "...", "task": "..."}``.
    """
    from a4ps.config import load_settings

    settings = load_settings()
    lock = threading.Lock()
    holder: dict[str, Any] = {}

    def system() -> Any:
        with lock:
            if "system" not in holder:
                from a4ps.system import System
                s = System(settings)
                s.start()
                holder["system"] = s
            return holder["system"]

    cg = CognitiveGraph(_Lazy(lambda: system().protos), _Lazy(lambda: system().models),
                        _Lazy(lambda: system().memory), _Lazy(lambda: system().bus),
                        settings, checkpointer_path=False)
    return cg.compile()
