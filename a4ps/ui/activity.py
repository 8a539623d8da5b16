"""Who is doing what right now: the one place the UI decides a persona's status.

Morphs, the inspector's header, the graph strip and the transcript header all read
:class:`ActivityModel`; it follows the task events (``task.step`` ends a node,
``task.token`` streams from the node that is speaking, ``model.*`` and
``finetune.progress`` for long work). The graph publishes a step when a node *ends*,
so the node running now is the step's successor in the graph's edges
(:class:`GraphShape`, from ``system.snapshot``'s ``graph``), chosen at a branch by
what the step reported (route, tool request, converged or not); the first token of a
turn confirms it. No Kivy here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

START, END = "__start__", "__end__"

# which persona speaks in a node (learned from steps as they arrive; these are the
# contrapunto's defaults, used before a node has been seen)
NODE_PERSONA = {"alfred_route": "ALFRED", "alfred_synthesize": "ALFRED", "brick": "BRICK",
                "forge": "BRICK", "robin": "ROBIN"}
NODE_SHORT = {"alfred_route": "route", "recall": "recall", "brick": "BRICK", "robin": "ROBIN",
              "measure": "measure", "forge": "forge", "alfred_synthesize": "answer",
              "remember": "memory"}
NODE_DOING = {"alfred_route": "routing", "recall": "recalling", "measure": "measuring",
              "forge": "forging a tool", "alfred_synthesize": "answering",
              "remember": "remembering"}


class GraphShape:
    """Nodes and edges of the cognitive graph, as ``system.snapshot`` sends them."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        data = data if isinstance(data, dict) else {}
        self.nodes: list[str] = [str(n) for n in data.get("nodes") or []]
        self.edges: list[tuple[str, str, bool, str | None]] = []
        for e in data.get("edges") or []:
            if isinstance(e, dict) and e.get("source") and e.get("target"):
                self.edges.append((str(e["source"]), str(e["target"]),
                                   bool(e.get("conditional")), e.get("label")))
        for s, t, _c, _l in self.edges:
            for n in (s, t):
                if n not in self.nodes:
                    self.nodes.append(n)

    def __bool__(self) -> bool:
        return bool(self.edges)

    def successors(self, node: str) -> list[tuple[str, str | None]]:
        return [(t, label) for s, t, _c, label in self.edges if s == node]

    def next_node(self, node: str, step: dict[str, Any], route: str | None) -> str | None:
        """The node that runs after ``node`` ended with ``step`` (None: the end, or a
        branch this step doesn't decide)."""
        succ = self.successors(node)
        if not succ:
            return None
        target: str | None
        if len(succ) == 1:
            target = succ[0][0]
        else:
            target = self._branch(succ, step, route)
        return None if target in (None, END) else target

    @staticmethod
    def _branch(succ: list[tuple[str, str | None]], step: dict[str, Any],
                route: str | None) -> str | None:
        labels = {label: t for t, label in succ if label}
        if route in labels:                     # recall: ALFRED's route
            return labels[route]
        if "again" in labels or "synthesize" in labels:   # measure: converged or not
            key = "synthesize" if step.get("stop") else "again"
            return labels.get(key)
        targets = [t for t, _ in succ]
        if "forge" in targets:                  # brick: a tool request goes to the forge
            if step.get("tool_request"):
                return "forge"
            rest = [t for t in targets if t != "forge"]
            return rest[0] if len(rest) == 1 else None
        return None

    def layers(self) -> list[list[str]]:
        """Columns for drawing: each node one column right of its furthest forward
        predecessor (edges back into a loop are ignored), start and end at the ends."""
        if not self.nodes:
            return []
        back = self._back_edges()
        forward = [(s, t) for s, t, _c, _l in self.edges if (s, t) not in back]
        depth = {n: 0 for n in self.nodes}
        for _ in range(len(self.nodes)):
            changed = False
            for s, t in forward:
                if depth[t] < depth[s] + 1:
                    depth[t] = depth[s] + 1
                    changed = True
            if not changed:
                break
        cols: dict[int, list[str]] = {}
        for n in self.nodes:
            cols.setdefault(depth[n], []).append(n)
        return [cols[d] for d in sorted(cols)]

    def back_edges(self) -> set[tuple[str, str]]:
        return self._back_edges()

    def _back_edges(self) -> set[tuple[str, str]]:
        back: set[tuple[str, str]] = set()
        state: dict[str, int] = {}

        def visit(n: str) -> None:
            state[n] = 1
            for t, _l in self.successors(n):
                if state.get(t) == 1:
                    back.add((n, t))
                elif t not in state:
                    visit(t)
            state[n] = 2
        roots = [START] if START in self.nodes else self.nodes[:1]
        for r in roots + self.nodes:
            if r not in state:
                visit(r)
        return back


@dataclass
class Doing:
    """One persona's activity."""

    status: str = "idle"      # idle, thinking, speaking, loading model, fine-tuning
    round: int | None = None
    node: str = ""
    task_id: str = ""

    def label(self, persona: str) -> str:
        if self.status == "idle":
            return "idle"
        parts = [persona]
        if self.round is not None:
            parts.append(f"round {self.round}")
        parts.append(self.status)
        return " \u00b7 ".join(parts)


class ActivityModel:
    """What each persona is doing, and which graph node runs, from the event stream.

    Every ``on_*`` method returns the set of personas whose activity changed, so the
    caller refreshes only their morphs.
    """

    def __init__(self, shape: GraphShape | None = None) -> None:
        self.shape = shape or GraphShape()
        self.doing: dict[str, Doing] = {}
        self.task_id = ""
        self.node = ""              # the node running now ("" when none)
        self.route: str | None = None
        self.measured = 0           # rounds measured in the running task
        self.node_persona = dict(NODE_PERSONA)
        self._loading_model = ""
        self._tuning: set[str] = set()
        self._busy: set[str] = set()      # personas neither idle nor fine-tuning

    # -- reading ---------------------------------------------------------------------
    def of(self, persona: str) -> Doing:
        return self.doing.get(persona) or Doing()

    def label(self, persona: str) -> str:
        return self.of(persona).label(persona)

    def status(self, persona: str) -> str:
        return self.of(persona).status

    @property
    def speaker(self) -> str:
        """The persona whose node runs now, or ""."""
        return self.node_persona.get(self.node, "") if self.node else ""

    # -- events ------------------------------------------------------------------------
    def on_step(self, p: dict[str, Any]) -> set[str]:
        tid = str(p.get("task_id") or "")
        if tid and tid != self.task_id:
            self._new_task(tid)
        node = str(p.get("node") or "")
        if p.get("persona") and node:
            self.node_persona[node] = str(p["persona"])
        if node == "alfred_route" and p.get("route"):
            self.route = str(p.get("route") or p.get("text") or "")
        elif node == "alfred_route" and p.get("text"):
            self.route = str(p["text"]).strip()
        if node == "measure":
            r = p.get("round")
            self.measured = r if isinstance(r, int) else self.measured + 1
        nxt = self.shape.next_node(node, p, self.route) if self.shape else None
        return self._run(nxt or "", None)

    def on_token(self, p: dict[str, Any]) -> set[str]:
        tid = str(p.get("task_id") or "")
        if tid and tid != self.task_id:
            self._new_task(tid)
        node = str(p.get("node") or "")
        persona = str(p.get("persona") or "")
        if persona and node:
            self.node_persona[node] = persona
        r = p.get("round")
        return self._run(node, r if isinstance(r, int) else None, speaking=True)

    def on_end(self, task_id: str = "") -> set[str]:
        if task_id and self.task_id and task_id != self.task_id:
            return set()
        self.node = ""
        changed = set()
        for name in list(self._busy):
            if name not in self._tuning:
                self.doing[name] = Doing()
                changed.add(name)
            self._busy.discard(name)
        return changed

    def on_model_loading(self, model: str) -> set[str]:
        self._loading_model = model
        who = self.speaker
        if who and self.of(who).status not in ("idle", "fine-tuning", "loading model"):
            d = self.of(who)
            self.doing[who] = Doing("loading model", d.round, d.node, d.task_id)
            self._busy.add(who)
            return {who}
        return set()

    def on_model_loaded(self) -> set[str]:
        self._loading_model = ""
        changed = set()
        for name, d in list(self.doing.items()):
            if d.status == "loading model":
                self.doing[name] = Doing("thinking", d.round, d.node, d.task_id)
                changed.add(name)
        return changed

    def on_finetune(self, persona: str, running: bool) -> set[str]:
        if not persona:
            return set()
        if running:
            if persona in self._tuning and self.of(persona).status == "fine-tuning":
                return set()
            self._tuning.add(persona)
            self.doing[persona] = Doing("fine-tuning")
        else:
            if persona not in self._tuning:
                return set()
            self._tuning.discard(persona)
            self.doing[persona] = Doing()
        return {persona}

    def rebuild(self, task_id: str, steps: list[dict[str, Any]],
                partial: dict[str, Any] | None) -> set[str]:
        """A UI that connected mid-task: replay the steps so far, then the partial turn."""
        changed = self._new_task(task_id)
        for s in steps:
            changed |= self.on_step(s)
        if partial:
            changed |= self.on_token({**partial, "task_id": task_id})
        return changed

    # -- helpers -----------------------------------------------------------------------
    def _new_task(self, tid: str) -> set[str]:
        self.task_id = tid
        self.route = None
        self.measured = 0
        return set()

    def _run(self, node: str, rnd: int | None, speaking: bool = False) -> set[str]:
        """``node`` runs now: its persona thinks (or speaks); the others go idle."""
        self.node = node
        who = self.node_persona.get(node, "") if node else ""
        if who and rnd is None and node in ("brick", "robin", "forge"):
            rnd = self.measured + 1
        changed = set()
        for name in list(self._busy):
            if name != who and name not in self._tuning:
                self.doing[name] = Doing()
                self._busy.discard(name)
                changed.add(name)
        if who and who not in self._tuning:
            status = "speaking" if speaking else NODE_DOING.get(node, "thinking")
            if node in ("brick", "robin") and not speaking:
                status = "thinking"
            if self._loading_model and not speaking:
                status = "loading model"
            new = Doing(status, rnd, node, self.task_id)
            if self.doing.get(who) != new:
                self.doing[who] = new
                changed.add(who)
            self._busy.add(who)
        return changed
