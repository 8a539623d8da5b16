"""The wire protocol shared by the daemon, the CLI and the UI.

This module is the only place that knows msgpack and the shape of a message, so the
UI imports it and nothing else from the backend. Commands travel as REQ-framed
messages (an empty delimiter frame, then one msgpack body) to the daemon's ROUTER;
events are PUB frames ``[topic, msgpack({seq, ts, payload})]``. See docs/protocol.md.

Every decoding function raises :class:`ProtocolError` with one of the :class:`ErrorCode`
values, so the daemon can answer bad input with a coded error and keep serving.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import math
from pathlib import PurePath
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1
MAX_ID_LEN = 128


class ErrorCode(str, enum.Enum):
    BAD_FRAME = "bad_frame"            # wrong number/shape of ZeroMQ frames
    BAD_MSGPACK = "bad_msgpack"        # body is not msgpack
    BAD_REQUEST = "bad_request"        # msgpack, but not a valid request envelope
    UNKNOWN_COMMAND = "unknown_command"
    UNAUTHORIZED = "unauthorized"      # missing or wrong token
    TOO_LARGE = "too_large"            # over bus.max_message_bytes
    INVALID_ARGS = "invalid_args"      # args fail the command's model
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"              # stale version, duplicate, wrong state
    INTERNAL = "internal"              # a bug on the daemon side; it kept serving
    UNSUPPORTED_VERSION = "unsupported_version"
    UNAVAILABLE = "unavailable"        # the part behind the command is not configured

    def __str__(self) -> str:
        return self.value


class ProtocolError(Exception):
    """Bad input on the wire. ``request_id`` is set when the envelope gave one."""

    def __init__(self, code: ErrorCode | str, message: str, request_id: str = "") -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# -- envelopes ---------------------------------------------------------------------

class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Request(_Wire):
    v: int = PROTOCOL_VERSION
    id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    token: str = Field(max_length=512)
    cmd: str = Field(min_length=1, max_length=128)
    args: dict[str, Any] = Field(default_factory=dict)


class ErrorInfo(_Wire):
    code: str
    message: str


class Reply(_Wire):
    v: int = PROTOCOL_VERSION
    id: str = ""
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None

    @classmethod
    def success(cls, request_id: str, result: Any) -> Reply:
        return cls(id=request_id, ok=True, result=result)

    @classmethod
    def failure(cls, request_id: str, code: ErrorCode | str, message: str) -> Reply:
        return cls(id=request_id, ok=False, error=ErrorInfo(code=str(code), message=message))


class EventMessage(_Wire):
    topic: str
    seq: int
    ts: float
    payload: dict[str, Any] = Field(default_factory=dict)


# -- per-command argument models ---------------------------------------------------

class Args(_Wire):
    """Base for command arguments: unknown keys are refused (typos fail loudly)."""


class NoArgs(Args):
    pass


class TaskSubmitArgs(Args):
    text: str = Field(min_length=1, max_length=100_000)
    priority: int | None = Field(None, ge=0, le=1000)


class TaskIdArgs(Args):
    id: str | int


class TaskListArgs(Args):
    status: Literal["queued", "running", "done", "failed", "cancelled"] | None = None
    limit: int = Field(50, ge=1, le=1000)


class ProtoNameArgs(Args):
    name: str = Field(min_length=1, max_length=256)


class ProtoUpdateArgs(Args):
    name: str = Field(min_length=1, max_length=256)
    slots: dict[str, Any] | None = None
    methods: dict[str, str] | None = None
    delete: list[str] | None = None
    expected_version: int | None = Field(None, ge=0)


class CodexDecideArgs(Args):
    proposal_id: str
    version: int = Field(ge=0)
    approve: bool
    reason: str | None = Field(None, max_length=10_000)


class CodexProposeArgs(Args):
    persona: str = Field(min_length=1, max_length=64)
    principle_id: str = Field(min_length=1, max_length=64)
    proposed_text: str = Field(min_length=1, max_length=20_000)
    rationale: str = Field(min_length=1, max_length=20_000)


class PauseArgs(Args):
    paused: bool = True


class CurateArgs(Args):
    finetune: bool = True


class FinetuneArgs(Args):
    persona: str = Field(min_length=1, max_length=64)
    steps: int | None = Field(None, ge=1, le=100_000)
    dataset: str | None = Field(None, min_length=1, max_length=4096)
    heldout: str | None = Field(None, min_length=1, max_length=4096)


class PersonaArgs(Args):
    persona: str = Field(min_length=1, max_length=64)


COMMANDS: dict[str, type[BaseModel]] = {
    "task.submit": TaskSubmitArgs,
    "task.cancel": TaskIdArgs,
    "task.get": TaskIdArgs,
    "task.list": TaskListArgs,
    "proto.list": NoArgs,
    "proto.get": ProtoNameArgs,
    "proto.update": ProtoUpdateArgs,
    "tool.list": NoArgs,
    "codex.get": NoArgs,
    "codex.decide": CodexDecideArgs,
    "codex.propose": CodexProposeArgs,
    "system.snapshot": NoArgs,
    "system.status": NoArgs,
    "system.save": NoArgs,
    "system.ping": NoArgs,
    "motivator.pause": PauseArgs,
    "curator.run": CurateArgs,
    "finetune.run": FinetuneArgs,
    "models.lineage": PersonaArgs,
    "models.rollback": PersonaArgs,
}


def register_command(cmd: str, args_model: type[BaseModel] = NoArgs) -> None:
    """Extension point: later parts add commands (e.g. ``motivator.pause``)."""
    if not cmd or "." not in cmd:
        raise ValueError(f"command name {cmd!r} must look like 'part.verb'")
    COMMANDS[cmd] = args_model


def validate_args(cmd: str, args: dict[str, Any] | None,
                  table: dict[str, type[BaseModel]] | None = None) -> BaseModel:
    """Check ``args`` against the command's model; raises ProtocolError."""
    table = COMMANDS if table is None else table
    model = table.get(cmd)
    if model is None:
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                            f"unknown command {cmd!r}; known: {', '.join(sorted(table))}")
    try:
        return model.model_validate(args or {})
    except ValidationError as e:
        raise ProtocolError(ErrorCode.INVALID_ARGS, f"{cmd}: {_describe(e)}") from None


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(args)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


# -- msgpack codec -----------------------------------------------------------------

def plain(value: Any, _depth: int = 0) -> Any:
    """Reduce any value to msgpack-friendly data (unknown objects become their repr)."""
    if _depth > 64:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str, bytes)):
        if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
            return str(value)
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): plain(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v, _depth + 1) for v in value]
    if isinstance(value, BaseModel):
        return plain(value.model_dump(mode="python"), _depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value), _depth + 1)
    if isinstance(value, enum.Enum):
        return plain(value.value, _depth + 1)
    if isinstance(value, (PurePath, _dt.datetime, _dt.date)):
        return str(value) if isinstance(value, PurePath) else value.isoformat()
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        try:
            return plain(to_dict(), _depth + 1)
        except Exception:
            pass
    return {"$repr": repr(value)}


def _default(value: Any) -> Any:
    reduced = plain(value)
    if reduced is value:  # plain() could not do better; stop msgpack recursing
        return repr(value)
    return reduced


def pack(obj: Any) -> bytes:
    """msgpack bytes; values msgpack can't hold are reduced with :func:`plain`."""
    try:
        return msgpack.packb(obj, use_bin_type=True, default=_default)
    except (TypeError, ValueError, OverflowError):
        return msgpack.packb(plain(obj), use_bin_type=True)


def unpack(data: bytes, max_bytes: int | None = None) -> Any:
    """Decode msgpack; raises ProtocolError(bad_msgpack | too_large)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(ErrorCode.BAD_FRAME, "message body must be bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"message is {len(data)} bytes; the limit is {max_bytes} "
                            "(bus.max_message_bytes)")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ...
        raise ProtocolError(ErrorCode.BAD_MSGPACK,
                            f"body is not valid msgpack ({type(e).__name__})") from None


def _request_id(obj: Any) -> str:
    rid = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and len(str(rid)) <= MAX_ID_LEN:
        return str(rid)
    return ""


def encode_request(cmd: str, args: dict[str, Any] | None, token: str, request_id: str) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "id": request_id, "token": token,
                 "cmd": cmd, "args": args or {}})


def decode_request(data: bytes, max_bytes: int | None = None) -> Request:
    """Parse a request body. Errors carry the request id when one could be read."""
    obj = unpack(data, max_bytes)
    rid = _request_id(obj)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"request must be a map, got {type(obj).__name__}", rid)
    if isinstance(obj.get("id"), int) and not isinstance(obj.get("id"), bool):
        obj = {**obj, "id": str(obj["id"])}
    try:
        req = Request.model_validate(obj)
    except ValidationError as e:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid request: {_describe(e)}",
                            rid) from None
    if req.v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {req.v} is not supported; this side speaks "
                            f"v{PROTOCOL_VERSION}: upgrade the older side", req.id)
    return req


def encode_reply(reply: Reply) -> bytes:
    return pack({"v": reply.v, "id": reply.id, "ok": reply.ok,
                 "result": reply.result if reply.ok else None,
                 "error": reply.error.model_dump() if reply.error else None})


def decode_reply(data: bytes, max_bytes: int | None = None) -> Reply:
    obj = unpack(data, max_bytes)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "reply must be a map")
    try:
        return Reply.model_validate(obj)
    except ValidationError as e:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid reply: {_describe(e)}") from None


def encode_event(topic: str, seq: int, ts: float, payload: dict[str, Any]) -> list[bytes]:
    """PUB frames: ``[topic bytes, msgpack({seq, ts, payload})]``."""
    return [topic.encode(), pack({"seq": seq, "ts": ts, "payload": payload})]


def decode_event(frames: list[bytes]) -> EventMessage:
    if len(frames) != 2:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"event must have 2 frames, got {len(frames)}")
    try:
        topic = bytes(frames[0]).decode()
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_FRAME, "event topic is not UTF-8") from None
    body = unpack(frames[1])
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "event body must be a map")
    seq, ts, payload = body.get("seq"), body.get("ts"), body.get("payload")
    # checked by hand: this runs for every event the UI receives (full validation
    # would cost more than the decoding)
    if (type(seq) is not int or type(ts) not in (float, int)
            or not isinstance(payload, (dict, type(None)))):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            "invalid event: needs int seq, number ts and a map payload")
    return _new_event(topic, seq, float(ts), payload or {})


def _event_factory() -> Any:
    """A constructor for already-checked EventMessages, 3x cheaper than model_construct.

    It fills the instance the way pydantic 2 does; a probe at import compares it with
    a validated instance and falls back to model_construct if pydantic changed.
    """
    fields = ("topic", "seq", "ts", "payload")
    new, setattr_ = EventMessage.__new__, object.__setattr__

    def fast(topic: str, seq: int, ts: float, payload: dict[str, Any]) -> EventMessage:
        m = new(EventMessage)
        setattr_(m, "__dict__", {"topic": topic, "seq": seq, "ts": ts, "payload": payload})
        setattr_(m, "__pydantic_fields_set__", set(fields))
        setattr_(m, "__pydantic_extra__", None)
        setattr_(m, "__pydantic_private__", None)
        return m

    def safe(topic: str, seq: int, ts: float, payload: dict[str, Any]) -> EventMessage:
        return EventMessage.model_construct(topic=topic, seq=seq, ts=ts, payload=payload)

    try:
        probe, ref = fast("t", 1, 1.0, {"k": [1]}), EventMessage(topic="t", seq=1, ts=1.0,
                                                                 payload={"k": [1]})
        if (probe == ref and probe.model_dump() == ref.model_dump()
                and repr(probe) == repr(ref) and probe.model_copy().payload == ref.payload):
            return fast
    except Exception:
        pass
    return safe


_new_event = _event_factory()


# Topic the daemon publishes on its own (not from the EventBus).
HEARTBEAT = "heartbeat"
