"""The characterological codex: each persona's principles, versioned.

The codex changes only through an amendment that a human approves: `propose()` stores
a pending :class:`Amendment`; `decide()` with the proposal's id and the codex version
the human saw applies it (or closes it). Each approval makes a new codex version with
its history (who, when, why). Rejected amendments are remembered so the same change is
not proposed again.
"""
from __future__ import annotations

import difflib
import threading
import time
import tomllib
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import EventBus


class CodexError(ValueError):
    """A codex operation was refused (unknown persona, stale or repeated decision...)."""


@dataclass
class PersonaCodex:
    role: str
    description: str
    principles: dict[str, str]


@dataclass
class Amendment:
    id: str
    persona: str
    principle_id: str
    current_text: str
    proposed_text: str
    rationale: str
    origin: str  # "philosopher" | "user"
    sources: list[str] = field(default_factory=list)  # task ids behind it
    base_version: int = 0
    created_at: float = field(default_factory=time.time)
    status: str = "pending"  # pending | approved | rejected
    decided_at: float | None = None
    decided_by: str | None = None
    decision_reason: str | None = None

    def diff(self) -> str:
        return "\n".join(difflib.unified_diff(
            self.current_text.splitlines(), self.proposed_text.splitlines(),
            f"{self.persona}.{self.principle_id} (current)",
            f"{self.persona}.{self.principle_id} (proposed)", lineterm=""))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "diff": self.diff()}


@dataclass
class CodexVersion:
    version: int
    at: float
    by: str
    reason: str
    persona: str | None = None
    principle_id: str | None = None
    old_text: str | None = None
    new_text: str | None = None
    proposal_id: str | None = None
    imported: list[dict[str, Any]] | None = None   # a persona's history from a persona file


def _signature(persona: str, principle_id: str, text: str) -> str:
    return f"{persona}|{principle_id}|{' '.join(text.lower().split())}"


class Codex:
    """Versioned persona principles with a human-approval amendment lifecycle."""

    def __init__(self, personas: dict[str, PersonaCodex], bus: EventBus | None = None):
        self._lock = threading.RLock()
        self._bus = bus
        self.version = 1
        self.personas = personas
        self.history: list[CodexVersion] = [CodexVersion(1, time.time(), "seed", "initial codex")]
        self.proposals: dict[str, Amendment] = {}
        self._rejected: set[str] = set()

    @classmethod
    def from_toml(cls, path: Path, bus: EventBus | None = None) -> Codex:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            personas = {
                name: PersonaCodex(
                    role=p["role"], description=p.get("description", ""),
                    principles={pr["id"]: pr["text"] for pr in p.get("principles", [])})
                for name, p in data["personas"].items()}
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as e:
            raise CodexError(f"cannot read codex {path}: {e!r}") from None
        return cls(personas, bus)

    def attach(self, bus: EventBus | None) -> None:
        self._bus = bus

    # -- reading -------------------------------------------------------------------
    def persona(self, name: str) -> PersonaCodex:
        try:
            return self.personas[name]
        except KeyError:
            raise CodexError(f"the codex has no persona {name!r}; known: {sorted(self.personas)}") from None

    def system_prompt(self, name: str) -> str:
        with self._lock:
            p = self.persona(name)
            rules = "\n".join(f"- {t}" for t in p.principles.values())
            return f"You are {p.description}\nYour principles:\n{rules}"

    def pending(self) -> list[Amendment]:
        with self._lock:
            return [a for a in self.proposals.values() if a.status == "pending"]

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": self.version,
                "personas": {n: asdict(p) for n, p in self.personas.items()},
                "pending": [a.to_dict() for a in self.pending()],
                "history": [asdict(h) for h in self.history],
            }

    # -- amendments ----------------------------------------------------------------
    def was_rejected(self, persona: str, principle_id: str, text: str) -> bool:
        return _signature(persona, principle_id, text) in self._rejected

    def propose(self, persona: str, principle_id: str, proposed_text: str, rationale: str, *,
                origin: str = "philosopher", sources: list[str] | None = None) -> Amendment:
        """Store a pending amendment. A new principle id adds a principle."""
        proposed_text = (proposed_text or "").strip()
        if not proposed_text:
            raise CodexError("an amendment needs a non-empty proposed text")
        if not (rationale or "").strip():
            raise CodexError("an amendment needs a rationale")
        if not principle_id or not principle_id.replace("_", "").isalnum():
            raise CodexError(f"principle id {principle_id!r} must be letters, digits or '_'")
        with self._lock:
            current = self.persona(persona).principles.get(principle_id, "")
            if current.strip() == proposed_text:
                raise CodexError(f"{persona}.{principle_id} already says that")
            sig = _signature(persona, principle_id, proposed_text)
            if sig in self._rejected:
                raise CodexError(f"this amendment to {persona}.{principle_id} was rejected before")
            for a in self.pending():
                if _signature(a.persona, a.principle_id, a.proposed_text) == sig:
                    raise CodexError(f"the same amendment is already pending as {a.id}")
            amendment = Amendment(
                id=uuid.uuid4().hex[:12], persona=persona, principle_id=principle_id,
                current_text=current, proposed_text=proposed_text, rationale=rationale.strip(),
                origin=origin, sources=list(sources or []), base_version=self.version)
            self.proposals[amendment.id] = amendment
        self._publish("codex.proposed", amendment.to_dict())
        return amendment

    def decide(self, proposal_id: str, version: int, approve: bool, *, by: str,
               reason: str = "") -> Amendment:
        """Apply or close a pending amendment; refuse stale or repeated decisions."""
        if approve:   # subscribers act first (the System pins a pre-amendment snapshot)
            self._publish("codex.approving", {"proposal_id": proposal_id, "version": version})
        with self._lock:
            a = self.proposals.get(proposal_id)
            if a is None:
                raise CodexError(f"no amendment with id {proposal_id!r}")
            if a.status != "pending":
                raise CodexError(f"amendment {proposal_id} was already {a.status}")
            if version != self.version:
                raise CodexError(f"stale decision: the codex is at version {self.version}, "
                                 f"not {version}; reload and decide again")
            if approve and a.base_version != self.version:
                current = self.personas[a.persona].principles.get(a.principle_id, "")
                if current != a.current_text:
                    raise CodexError(f"amendment {proposal_id} was drafted against version "
                                     f"{a.base_version} and {a.persona}.{a.principle_id} "
                                     "has changed since; reject it and propose again")
            a.decided_at, a.decided_by, a.decision_reason = time.time(), by, reason
            if approve:
                a.status = "approved"
                self.personas[a.persona].principles[a.principle_id] = a.proposed_text
                self.version += 1
                self.history.append(CodexVersion(
                    self.version, a.decided_at, by, reason or a.rationale, a.persona,
                    a.principle_id, a.current_text, a.proposed_text, a.id))
            else:
                a.status = "rejected"
                self._rejected.add(_signature(a.persona, a.principle_id, a.proposed_text))
            payload = {**a.to_dict(), "approved": approve, "codex_version": self.version}
        self._publish("codex.decided", payload)
        return a

    def add_persona(self, name: str, persona: PersonaCodex, *, by: str, reason: str,
                    imported: list[dict[str, Any]] | None = None) -> CodexVersion:
        """A new persona with its principles (a person importing a persona file: that is
        the human decision). Makes a new codex version carrying its earlier history."""
        with self._lock:
            if name in self.personas:
                raise CodexError(f"the codex already has a persona {name!r}")
            self.personas[name] = persona
            self.version += 1
            entry = CodexVersion(self.version, time.time(), by, reason, persona=name,
                                 imported=[dict(h) for h in imported or []])
            self.history.append(entry)
        return entry

    def history_diffs(self) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for h in self.history:
                diff = "\n".join(difflib.unified_diff(
                    (h.old_text or "").splitlines(), (h.new_text or "").splitlines(),
                    "before", "after", lineterm="")) if h.new_text is not None else ""
                out.append({**asdict(h), "diff": diff})
            return out

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        if self._bus is not None:
            self._bus.publish(topic, payload)

    # -- image -----------------------------------------------------------------------
    def image_state(self) -> dict[str, Any]:
        with self._lock:
            return {"version": self.version,
                    "personas": {n: asdict(p) for n, p in self.personas.items()},
                    "history": [asdict(h) for h in self.history],
                    "proposals": {k: asdict(a) for k, a in self.proposals.items()},
                    "rejected": sorted(self._rejected)}

    def restore_image(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.version = state["version"]
            self.personas = {n: PersonaCodex(**p) for n, p in state["personas"].items()}
            self.history = [CodexVersion(**h) for h in state["history"]]
            self.proposals = {k: Amendment(**a) for k, a in state["proposals"].items()}
            self._rejected = set(state.get("rejected", ()))

    def __getstate__(self) -> dict[str, Any]:
        return self.image_state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lock = threading.RLock()
        self._bus = None
        self.restore_image(state)
