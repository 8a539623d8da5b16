"""A backend on any OpenAI-compatible chat server, through the official ``openai`` client.

vLLM (``vllm serve MODEL``), llama.cpp's ``llama-server`` and LM Studio's local server
all speak ``/v1/chat/completions``, so one backend moves inference onto a GPU machine
by configuration: ``models.backend = "openai"``, ``models.openai.base_url`` (or
``OPENAI_BASE_URL``), ``models.openai.api_key`` (or ``OPENAI_API_KEY``; local servers
ignore it) and the persona map ``models.openai_personas``.

The server owns its models: "loading" checks that it serves the model (``/v1/models``),
"unloading" only forgets it, and the memory budget does not apply (the server's GPU is
not ours to count). Free text streams (``stream=True``, ``on_token`` per chunk; setting
``cancel`` closes the stream, which makes vLLM abort the request). Decisions ask for
``response_format = json_schema`` (vLLM and llama.cpp constrain decoding to it; OpenAI
does in strict mode) and are then validated strictly; what does not validate is a
DecisionError. ``top_p`` is sent as is, ``repetition_penalty`` in the field
``models.openai.repetition_penalty_field`` (vLLM's name by default);
``no_repeat_ngram_size`` has no equivalent in the protocol and is ignored.

Failures become the typed errors the Ollama backend raises, with what to do next:
nothing listening -> BackendUnavailable, unknown model -> ModelNotFound, no answer
within ``models.openai.timeout_s`` -> ModelTimeout.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Sequence, cast

from a4ps.models.base import (CancelToken, Finish, Generation, Message, OnToken, Progress,
                              ServerBackend)
from a4ps.models.errors import (BackendUnavailable, InvalidRequest,
                                ModelError, ModelNotFound, ModelTimeout)
from a4ps.models.schema import parse_json_answer, validate_object

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletionMessageParam

    from a4ps.config import Settings

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
_START_HINT = ("start it (vLLM: `vllm serve MODEL --port 8000`; llama.cpp: "
               "`llama-server -m MODEL.gguf --port 8000`; LM Studio: start the local "
               "server) or point models.openai.base_url / OPENAI_BASE_URL at it")


class OpenAIBackend(ServerBackend):
    """Chat, stream and decide against an OpenAI-compatible server."""

    name = "openai"
    choice_method = "json-schema"

    def __init__(self, settings: Settings, client: openai.OpenAI | None = None) -> None:
        import openai
        self.settings = settings
        self.cfg = settings.models.openai
        self.base_url = (self.cfg.base_url or os.environ.get("OPENAI_BASE_URL")
                         or DEFAULT_BASE_URL)
        api_key = self.cfg.api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
        self.client = client or openai.OpenAI(base_url=self.base_url, api_key=api_key,
                                              timeout=self.cfg.timeout_s,
                                              max_retries=self.cfg.max_retries)
        self._resident: str | None = None

    # -- error translation --------------------------------------------------

    def _translate(self, e: Exception, what: str, model: str | None) -> Exception:
        import openai
        if isinstance(e, ModelError):
            return e
        # APITimeoutError is an APIConnectionError: test it first. A timeout while a
        # stream is being read surfaces as the transport's own exception, not wrapped.
        if isinstance(e, openai.APITimeoutError) or _is_transport_timeout(e):
            return ModelTimeout(
                f"the server at {self.base_url} did not answer {what} within "
                f"{self.cfg.timeout_s:g}s; it may be busy or still loading the model; "
                f"raise models.openai.timeout_s or use a smaller model")
        if isinstance(e, openai.APIConnectionError):
            return BackendUnavailable(
                f"cannot reach an OpenAI-compatible server at {self.base_url} ({what}): "
                f"is it running? {_START_HINT}")
        if isinstance(e, openai.NotFoundError):
            name = model or "the model"
            return ModelNotFound(
                f"the server at {self.base_url} has no model {name!r}: serve it there "
                f"(vLLM: `vllm serve {name}`) or fix models.openai_personas")
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return BackendUnavailable(
                f"the server at {self.base_url} refused the API key ({what}): set "
                f"models.openai.api_key or OPENAI_API_KEY")
        if isinstance(e, openai.APIStatusError):
            return ModelError(f"the server at {self.base_url} refused {what} "
                              f"({e.status_code}): {e.message}")
        return ModelError(f"{what} on {self.base_url} failed: {type(e).__name__}: {e}")

    # -- the raw API ---------------------------------------------------------

    def served_models(self) -> list[str] | None:
        """The model ids the server lists (None when it has no ``/v1/models``)."""
        import openai
        try:
            return [m.id for m in self.client.models.list()]
        except openai.NotFoundError:
            return None
        except Exception as e:
            raise self._translate(e, "list models", None) from e

    def _sampling(self, temperature: float | None, max_tokens: int | None,
                  stop: Sequence[str] | None, gen: dict[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if temperature is not None:
            kw["temperature"] = float(temperature)
        if max_tokens is not None:
            kw["max_tokens"] = int(max_tokens)
        if stop:
            kw["stop"] = list(stop)
        if gen.get("top_p") is not None:
            kw["top_p"] = float(gen["top_p"])
        field = self.cfg.repetition_penalty_field
        if field and gen.get("repetition_penalty") is not None:
            kw["extra_body"] = {field: float(gen["repetition_penalty"])}
        return kw

    # -- the ChatBackend protocol ----------------------------------------------

    def estimate_bytes(self, model: str) -> int | None:
        """None: the model lives in the server's memory, not under our budget."""
        return None

    def load(self, model: str, progress: Progress | None = None) -> dict[str, Any]:
        if progress:
            progress(0.1, f"asking {self.base_url} which models it serves")
        served = self.served_models()
        if served is not None and model not in served:
            listed = ", ".join(served) or "none"
            raise ModelNotFound(
                f"the server at {self.base_url} has no model {model!r} (it serves: "
                f"{listed}); serve it there (vLLM: `vllm serve {model}`) or fix "
                f"models.openai_personas")
        self._resident = model
        return {"served": served}

    def unload(self) -> None:
        """The server keeps its models; we only stop using this one."""
        self._resident = None

    def _model(self) -> str:
        if self._resident is None:
            raise ModelError("no model is selected on the OpenAI-compatible server; the "
                             "ModelManager loads one first")
        return self._resident

    def generate(self, messages: list[Message], *, temperature: float | None = None,
                 max_tokens: int | None = None, stop: list[str] | None = None,
                 on_token: OnToken | None = None, cancel: CancelToken | None = None,
                 **gen: Any) -> Generation:
        model = self._model()
        t0 = time.perf_counter()
        stream = self._call("chat", model, lambda: self.client.chat.completions.create(
            model=model, messages=_wire_messages(messages), stream=True,
            stream_options={"include_usage": True},
            **self._sampling(temperature, max_tokens, stop, gen)))
        first: float | None = None
        pieces: list[str] = []
        tokens = 0
        finish: Finish = "eos"
        try:
            for chunk in stream:     # errors (a read timeout) surface while iterating
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if chunk.usage is not None and chunk.usage.completion_tokens:
                    tokens = int(chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta else None
                    if text:
                        if first is None:
                            first = time.perf_counter() - t0
                        pieces.append(text)
                        if on_token is not None:
                            on_token(text)
                    if choice.finish_reason == "length":
                        finish = "length"
                    elif choice.finish_reason == "stop" and \
                            getattr(choice, "stop_reason", None) in (stop or []):
                        finish = "stop"          # vLLM names the stop string it hit
        except Exception as e:
            raise self._translate(e, "chat", model) from e
        finally:
            stream.close()       # on cancel: the server sees the client go and stops
        return Generation("".join(pieces).strip(), tokens or len(pieces),
                          time.perf_counter() - t0, first, finish)

    def structured(self, messages: list[Message], schema: dict[str, Any], *,
                   cancel: CancelToken | None = None) -> dict[str, Any]:
        """``response_format`` json_schema (strict), then strict validation."""
        model = self._model()
        wire, plan = strict_schema(schema)
        r = self._call("chat", model, lambda: self.client.chat.completions.create(
            model=model, messages=_wire_messages(messages), temperature=0.0,
            response_format={"type": "json_schema", "json_schema": {
                "name": "decision", "schema": wire, "strict": True}}))
        raw = ((r.choices[0].message.content if r.choices else None) or "").strip()
        return validate_object(drop_optional_nulls(parse_json_answer(model, raw), plan), schema)


def strict_schema(schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``schema`` as OpenAI's strict mode wants it, and the plan to undo the change.

    Strict mode needs every object closed (``additionalProperties: false``) and every
    property required; a property our schema leaves optional becomes ``anyOf [it,
    null]``, and :func:`drop_optional_nulls` removes those nulls from the answer again.
    Servers that constrain decoding without strict mode (vLLM, llama.cpp) accept it too.
    The plan is ``{"drop": [keys], "props": {key: plan}, "items": plan}``.
    """
    if not isinstance(schema, dict):
        raise InvalidRequest(f"schema must be a dict, got {type(schema).__name__}")
    wire = copy.deepcopy(schema)
    plan: dict[str, Any] = {}
    if wire.get("type") == "object" and isinstance(wire.get("properties"), dict):
        props = wire["properties"]
        required = set(wire.get("required", []))
        plan = {"drop": [k for k in props if k not in required], "props": {}}
        for key, sub in list(props.items()):
            sub_wire, sub_plan = strict_schema(sub)
            if sub_plan:
                plan["props"][key] = sub_plan
            props[key] = sub_wire if key in required else \
                {"anyOf": [sub_wire, {"type": "null"}]}
        wire["required"] = list(props)
        wire["additionalProperties"] = False
    elif wire.get("type") == "array" and isinstance(wire.get("items"), dict):
        wire["items"], item_plan = strict_schema(wire["items"])
        if item_plan:
            plan = {"items": item_plan}
    elif isinstance(wire.get("anyOf"), list):
        wire["anyOf"] = [strict_schema(a)[0] for a in wire["anyOf"]]
    return wire, plan


def drop_optional_nulls(value: Any, plan: dict[str, Any]) -> Any:
    """Undo :func:`strict_schema`: a null for a property that was optional is dropped."""
    if not plan:
        return value
    if isinstance(value, dict) and "drop" in plan:
        return {k: drop_optional_nulls(v, plan["props"].get(k, {}))
                for k, v in value.items() if not (v is None and k in plan["drop"])}
    if isinstance(value, list) and "items" in plan:
        return [drop_optional_nulls(v, plan["items"]) for v in value]
    return value


def _is_transport_timeout(e: BaseException) -> bool:
    """A read timeout from the HTTP transport the openai client uses (httpx or httpx2)."""
    return any(c.__name__ == "TimeoutException" and c.__module__.startswith("httpx")
               for c in type(e).__mro__)


def _wire_messages(messages: list[Message]) -> list[ChatCompletionMessageParam]:
    """Our checked ``{role, content}`` dicts as the client's message type (the same
    dicts: the manager has already refused unknown roles)."""
    return cast("list[ChatCompletionMessageParam]", messages)
