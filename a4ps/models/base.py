"""The model seam: what every chat backend returns and offers.

The :class:`~a4ps.models.manager.ModelManager` is the one door personas use; a backend
is the engine behind it (embedded, Ollama, the scripted fake). Two kinds of call:

* free text (``generate``) for what a persona *says*, streamed through ``on_token``
  and stoppable through ``cancel``;
* decisions (``choose`` for a closed choice, ``structured`` for a JSON-schema object)
  for everything the system *decides* from a model (route, tool request, judge score,
  persona vote, amendment draft). A decision is asked under constraint, so a small
  model cannot answer outside the allowed set; what cannot be validated is a
  :class:`~a4ps.models.errors.DecisionError`, never a silent default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Protocol, Sequence, runtime_checkable

from a4ps.models.errors import ModelError
from a4ps.models.schema import choice_schema

Message = dict[str, str]
Progress = Callable[[float, str], None]
OnToken = Callable[[str], None]
Finish = Literal["eos", "stop", "length", "cancelled", "repetition"]


@runtime_checkable
class CancelToken(Protocol):
    """Anything with ``is_set()`` (a ``threading.Event``): set it to stop a generation."""

    def is_set(self) -> bool: ...


@dataclass
class Generation:
    """What one generation produced: the text and the figures the manager counts."""
    text: str
    tokens: int
    seconds: float
    ttft_s: float | None
    finish: Finish = "eos"


@dataclass
class Choice:
    """A closed choice: ``value`` is always one of the options asked."""
    value: str
    scores: dict[str, float] = field(default_factory=dict)
    method: str = "constrained"


@runtime_checkable
class ChatBackend(Protocol):
    """One engine behind the ModelManager. Not thread-safe: the manager serialises calls."""

    name: str

    def resident(self) -> str | None: ...

    def estimate_bytes(self, model: str) -> int | None: ...

    def load(self, model: str, progress: Progress | None = None) -> dict[str, Any]: ...

    def unload(self) -> None: ...

    def generate(self, messages: list[Message], *, temperature: float | None = None,
                 max_tokens: int | None = None, stop: list[str] | None = None,
                 on_token: OnToken | None = None, cancel: CancelToken | None = None,
                 **gen: Any) -> Generation: ...

    def choose(self, messages: list[Message], options: Sequence[str], *,
               cancel: CancelToken | None = None) -> Choice: ...

    def structured(self, messages: list[Message], schema: dict[str, Any], *,
                   cancel: CancelToken | None = None) -> dict[str, Any]: ...


@runtime_checkable
class SwitchingBackend(Protocol):
    """A backend that can move from one resident model to another without an unload
    (the embedded one, between the base and its adapters)."""

    def can_switch(self, current: str | None, new: str) -> bool: ...


@runtime_checkable
class AdapterHost(Protocol):
    """A backend that registers base + LoRA adapter as a new model tag (Ollama); the
    fine-tuner and persona import use it."""

    def create_with_adapter(self, new_tag: str, base: str, adapter_dir: Path) -> str: ...


class ServerBackend:
    """What the backends on a model server (Ollama, OpenAI-compatible) share: every
    call's failure becomes a typed ModelError saying what to do next (``_translate``,
    per server), the selected model, and a closed choice asked as a JSON object whose
    one field is an enum of the options (``structured``, per server)."""

    choice_method: ClassVar[str]
    _resident: str | None

    def _translate(self, e: Exception, what: str, model: str | None) -> Exception:
        raise NotImplementedError

    def _call(self, what: str, model: str | None, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            raise self._translate(e, what, model) from e

    def resident(self) -> str | None:
        return self._resident

    def structured(self, messages: list[Message], schema: dict[str, Any], *,
                   cancel: CancelToken | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def choose(self, messages: list[Message], options: Sequence[str], *,
               cancel: CancelToken | None = None) -> Choice:
        value = self.structured(messages, choice_schema(options), cancel=cancel)
        return Choice(value["choice"], {}, self.choice_method)
