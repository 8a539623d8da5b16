"""The wire protocol shared by the daemon, the CLI and the UI.

This module is the only place that knows msgpack and the shape of a message, so the
UI imports it and nothing else from the backend. Commands travel as REQ-framed
messages (an empty delimiter frame, then one msgpack body) to the daemon's ROUTER;
events are PUB frames ``[topic, msgpack({seq, ts, payload})]``. See docs/protocol.md.

Every decoding function raises :class:`ProtocolError` with one of the :class:`ErrorCode`
values, so the daemon can answer bad input with a coded error and keep serving.

Decoding a request is split in two so that no client can stall the daemon's bus
thread: :func:`read_envelope` (bus thread) reads only the envelope's short scalar
fields and notes where ``args`` lies in the body, without decoding it; after the token
check, :func:`decode_args` (a handler thread) decodes the args with limits on depth
and on the number of values, and :func:`validate_args` checks them against the
command's model in pydantic *strict* mode: ``"5"`` is not an int and ``true`` is not 1.
"""
from __future__ import annotations

import dataclasses
import enum
import io
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .values import plain  # the one reducer (wire defaults); re-exported for callers

PROTOCOL_VERSION = 1
MAX_ID_LEN = 128
MAX_TOKEN_LEN = 512
MAX_ARGS_DEPTH = 64          # nesting of maps/arrays inside args
MAX_ARGS_VALUES = 20_000     # keys + values inside args
ENVELOPE_KEYS = ("v", "id", "token", "cmd", "args")


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


class _Strict(BaseModel):
    """Wire input: unknown keys refused, no coercion (``"1"`` is not 1, ``true`` not 1)."""
    model_config = ConfigDict(extra="forbid", strict=True)


class RequestHead(_Strict):
    """The envelope's scalar fields; every one is required."""
    v: int
    id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    token: str = Field(max_length=MAX_TOKEN_LEN)
    cmd: str = Field(min_length=1, max_length=128)


class Request(RequestHead):
    args: dict[str, Any]


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

class Args(_Strict):
    """Base for command arguments: unknown keys are refused (typos fail loudly) and
    values are not coerced. ``validate_args`` is strict for any model, this base or not."""


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


class ProtoCloneArgs(Args):
    name: str = Field(min_length=1, max_length=256)
    new_name: str = Field(min_length=1, max_length=256)
    slots: dict[str, Any] | None = None


class TaskStepsArgs(Args):
    task_id: str | int


class ProtoUpdateArgs(Args):
    name: str = Field(min_length=1, max_length=256)
    slots: dict[str, Any] | None = None
    methods: dict[str, str] | None = None
    delete: list[str] | None = None
    expected_version: int | None = Field(None, ge=0)


class ProtoRevertArgs(Args):
    name: str = Field(min_length=1, max_length=256)
    method: str = Field(min_length=1, max_length=256)
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


def _ref(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# an id from image.snapshots (an int is taken as its digits), or a named snapshot's name
SnapshotRef = Annotated[str, BeforeValidator(_ref), Field(min_length=1, max_length=128)]


class ImageDiffArgs(Args):
    snapshot: SnapshotRef
    against: SnapshotRef | None = None     # None: the live image


class ImageRestoreArgs(Args):
    snapshot: SnapshotRef


class ImageSnapshotArgs(Args):
    name: str = Field(min_length=1, max_length=64)


class PersonaExportArgs(Args):
    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096)     # absolute, on the daemon's machine
    golden: bool = False                                 # include the persona's golden data
    overwrite: bool = False


class PersonaImportArgs(Args):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    path: str = Field(min_length=1, max_length=4096)
    as_name: str | None = Field(None, alias="as", min_length=1, max_length=64)


COMMANDS: dict[str, type[BaseModel]] = {
    "task.submit": TaskSubmitArgs,
    "task.cancel": TaskIdArgs,
    "task.get": TaskIdArgs,
    "task.list": TaskListArgs,
    "proto.list": NoArgs,
    "proto.get": ProtoNameArgs,
    "proto.update": ProtoUpdateArgs,
    "proto.clone": ProtoCloneArgs,
    "proto.remove": ProtoNameArgs,
    "task.steps": TaskStepsArgs,
    "proto.revert_method": ProtoRevertArgs,
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
    "image.snapshots": NoArgs,
    "image.diff": ImageDiffArgs,
    "image.restore": ImageRestoreArgs,
    "image.snapshot": ImageSnapshotArgs,
    "persona.export": PersonaExportArgs,
    "persona.import": PersonaImportArgs,
}


def check_args_model(cmd: str, args_model: type[BaseModel]) -> None:
    """A command's args model must refuse unknown keys (strictness of values is applied
    by :func:`validate_args` whatever the model says)."""
    if not cmd or "." not in cmd:
        raise ValueError(f"command name {cmd!r} must look like 'part.verb'")
    if not (isinstance(args_model, type) and issubclass(args_model, BaseModel)):
        raise ValueError(f"{cmd}: the args model must be a pydantic model, got {args_model!r}")
    if args_model.model_config.get("extra") != "forbid":
        raise ValueError(f"{cmd}: args model {args_model.__name__} must forbid unknown keys "
                         "(derive it from protocol.Args)")


def register_command(cmd: str, args_model: type[BaseModel] = NoArgs) -> None:
    """Extension point: later parts add commands (e.g. ``motivator.pause``)."""
    check_args_model(cmd, args_model)
    COMMANDS[cmd] = args_model


def validate_args(cmd: str, args: dict[str, Any] | None,
                  table: dict[str, type[BaseModel]] | None = None) -> BaseModel:
    """Check ``args`` against the command's model in strict mode; raises ProtocolError."""
    table = COMMANDS if table is None else table
    model = table.get(cmd)
    if model is None:
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                            f"unknown command {cmd!r}; known: {', '.join(sorted(table))}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError(ErrorCode.INVALID_ARGS, f"{cmd}: args must be a map")
    try:
        return model.model_validate(args, strict=True)
    except ValidationError as e:
        raise ProtocolError(ErrorCode.INVALID_ARGS, f"{cmd}: {_describe(e)}") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.INVALID_ARGS, f"{cmd}: args are nested too deeply") from None


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(args)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


# -- msgpack codec -----------------------------------------------------------------


def _default(value: Any) -> Any:
    reduced = plain(value)
    if reduced is value:  # plain() could not do better; stop msgpack recursing
        return repr(value)
    return reduced


def pack(obj: Any) -> bytes:
    """msgpack bytes; values msgpack can't hold are reduced with :func:`plain`."""
    try:
        return bytes(msgpack.packb(obj, use_bin_type=True, default=_default))
    except (TypeError, ValueError, OverflowError):
        return bytes(msgpack.packb(plain(obj), use_bin_type=True))


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


def encode_request(cmd: str, args: dict[str, Any] | None, token: str, request_id: str) -> bytes:
    """A request body; ``args`` goes last, so the daemon never has to walk past it."""
    return pack({"v": PROTOCOL_VERSION, "id": request_id, "token": token,
                 "cmd": cmd, "args": args or {}})


# -- reading a request in two steps (bus thread, then handler thread) ----------------

def _kind(first_byte: int) -> str:
    """'map', 'array' or 'scalar', from a msgpack value's first byte."""
    if 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF):
        return "map"
    if 0x90 <= first_byte <= 0x9F or first_byte in (0xDC, 0xDD):
        return "array"
    return "scalar"


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


_CONTAINER = object()   # an envelope field that held a map or an array


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A request read by :func:`read_envelope`: its scalar fields, and where the
    still-undecoded ``args`` lie in ``body`` (``args_end`` None: to the end)."""
    fields: dict[str, Any]
    body: bytes
    args_start: int | None
    args_end: int | None

    @property
    def request_id(self) -> str:
        rid = self.fields.get("id")
        return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LEN else ""

    @property
    def token(self) -> str | None:
        token = self.fields.get("token")
        return token if isinstance(token, str) else None

    @property
    def cmd(self) -> str:
        cmd = self.fields.get("cmd")
        return cmd if isinstance(cmd, str) else ""


def read_envelope(body: bytes, max_bytes: int | None = None) -> Envelope:
    """Bus thread: size check, then the envelope's shape, reading only its scalar
    fields. The args are not decoded (a 1 MiB map costs nothing here). Raises
    ProtocolError(too_large | bad_msgpack | bad_request)."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise ProtocolError(ErrorCode.BAD_FRAME, "message body must be bytes")
    body = bytes(body)
    if max_bytes is not None and len(body) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"message is {len(body)} bytes; the limit is {max_bytes} "
                            "(bus.max_message_bytes)")
    if not body or body[0] == 0xC1:
        raise ProtocolError(ErrorCode.BAD_MSGPACK, "body is not valid msgpack")
    if _kind(body[0]) != "map":
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request must be a msgpack map "
                            "{v, id, token, cmd, args}")
    u = msgpack.Unpacker(io.BytesIO(body), raw=False, ext_hook=_no_ext, read_size=4096,
                         max_buffer_size=max(len(body), 4096))
    fields: dict[str, Any] = {}
    args_start = args_end = None
    try:
        n = u.read_map_header()
        if n > len(ENVELOPE_KEYS) + 3:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"request map has {n} keys; a request "
                                f"has exactly {', '.join(ENVELOPE_KEYS)}")
        for i in range(n):
            if _kind(body[u.tell()]) != "scalar":
                raise ProtocolError(ErrorCode.BAD_REQUEST, "request keys must be strings")
            key = u.unpack()
            if not isinstance(key, str):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "request keys must be strings")
            if key in fields or (key == "args" and args_start is not None):
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"request key {key!r} appears twice")
            pos = u.tell()
            if key == "args":
                args_start = pos
                if i == n - 1:
                    break      # the rest of the body is args: decode_args checks its end
                u.skip()
                args_end = u.tell()
            elif _kind(body[pos]) != "scalar":
                u.skip()
                fields[key] = _CONTAINER
            else:
                fields[key] = u.unpack()
        else:
            if u.tell() != len(body):
                raise ProtocolError(ErrorCode.BAD_MSGPACK, "extra data after the request map")
    except ProtocolError as e:
        e.request_id = e.request_id or Envelope(fields, body, None, None).request_id
        raise
    except (IndexError, msgpack.OutOfData):
        raise ProtocolError(ErrorCode.BAD_MSGPACK, "the request is truncated",
                            Envelope(fields, body, None, None).request_id) from None
    except Exception as e:  # FormatError, StackError, UnicodeDecodeError, ext types ...
        raise ProtocolError(ErrorCode.BAD_MSGPACK,
                            f"body is not valid msgpack ({type(e).__name__})",
                            Envelope(fields, body, None, None).request_id) from None
    return Envelope(fields, body, args_start, args_end)


def check_envelope(env: Envelope) -> RequestHead:
    """After the token check (bus thread, cheap): every envelope field present and of
    its type, nothing else; ``v`` is this protocol's."""
    rid = env.request_id
    unknown = sorted(k for k in env.fields if k not in ENVELOPE_KEYS)
    if unknown:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid request: unknown field(s) "
                            f"{', '.join(unknown)}; a request has {', '.join(ENVELOPE_KEYS)}", rid)
    head = {k: (None if v is _CONTAINER else v) for k, v in env.fields.items()}
    if "v" not in head:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid request: v: field required "
                            f"(this side speaks v{PROTOCOL_VERSION})", rid)
    try:
        req = RequestHead.model_validate(head, strict=True)
    except ValidationError as e:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid request: {_describe(e)}",
                            rid) from None
    if req.v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {req.v} is not supported; this side speaks "
                            f"v{PROTOCOL_VERSION}: upgrade the older side", rid)
    if env.args_start is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "invalid request: args: field required "
                            "(send {} for a command without arguments)", rid)
    if env.args_start >= len(env.body):
        raise ProtocolError(ErrorCode.BAD_MSGPACK, "the request is truncated", rid)
    if _kind(env.body[env.args_start]) != "map":
        raise ProtocolError(ErrorCode.BAD_REQUEST, "invalid request: args must be a map", rid)
    return req


def decode_args(env: Envelope, *, max_depth: int = MAX_ARGS_DEPTH,
                max_values: int = MAX_ARGS_VALUES) -> dict[str, Any]:
    """Handler thread: decode the args with bounded work. Python-level steps (not one
    long C call) so the bus thread keeps getting the GIL; refuses more than
    ``max_depth`` levels of nesting or ``max_values`` keys+values, and map keys that
    are not strings. Raises ProtocolError(bad_msgpack | invalid_args)."""
    rid = env.request_id
    if env.args_start is None:
        return {}
    data = memoryview(env.body)[env.args_start:env.args_end]
    size = len(data)
    u = msgpack.Unpacker(raw=False, ext_hook=_no_ext, max_buffer_size=max(size, 1))
    u.feed(data)
    stack: list[list[Any]] = []     # [container, values left, pending map key]
    root: Any = None
    count = 0
    nokey = _CONTAINER
    try:
        while True:
            pos = u.tell()
            if pos >= size:
                raise ProtocolError(ErrorCode.BAD_MSGPACK, "args are truncated", rid)
            kind = _kind(data[pos])
            count += 1
            if count > max_values:
                raise ProtocolError(ErrorCode.INVALID_ARGS, f"args hold more than {max_values} "
                                    "values; send less per command", rid)
            value: dict[Any, Any] | list[Any]
            if kind == "map":
                n, value = u.read_map_header(), {}
            elif kind == "array":
                n, value = u.read_array_header(), []
            else:
                n, value = 0, u.unpack()
            if kind != "scalar" and len(stack) + 1 > max_depth:
                raise ProtocolError(ErrorCode.INVALID_ARGS, f"args are nested deeper than "
                                    f"{max_depth} levels", rid)
            if stack:
                top = stack[-1]
                if isinstance(top[0], dict):
                    if top[2] is nokey:
                        if not isinstance(value, str):
                            raise ProtocolError(ErrorCode.INVALID_ARGS,
                                                "map keys in args must be strings", rid)
                        top[2] = value
                        continue
                    top[0][top[2]] = value
                    top[2] = nokey
                else:
                    top[0].append(value)
                top[1] -= 1
            else:
                root = value
            if kind != "scalar" and n:
                stack.append([value, n, nokey])
            while stack and stack[-1][1] == 0:
                stack.pop()
            if not stack:
                break
        if u.tell() != size:
            raise ProtocolError(ErrorCode.BAD_MSGPACK, "extra data after the args", rid)
    except ProtocolError:
        raise
    except msgpack.OutOfData:
        raise ProtocolError(ErrorCode.BAD_MSGPACK, "args are truncated", rid) from None
    except Exception as e:   # FormatError, UnicodeDecodeError, ext types, huge headers...
        raise ProtocolError(ErrorCode.BAD_MSGPACK,
                            f"args are not valid msgpack ({type(e).__name__}: {e})", rid) from None
    if not isinstance(root, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "invalid request: args must be a map", rid)
    return root


def decode_request(data: bytes, max_bytes: int | None = None) -> Request:
    """The whole request in one go (clients, tests, stand-ins): envelope, a present
    token (its value is the server's to judge), fields, args."""
    env = read_envelope(data, max_bytes)
    if env.token is None:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing token: read it from the "
                            "daemon's data/daemon.token", env.request_id)
    head = check_envelope(env)
    args = decode_args(env)
    return Request.model_construct(v=head.v, id=head.id, token=head.token, cmd=head.cmd,
                                   args=args)


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
    return _new_event(topic, seq, float(ts), payload or {})  # type: ignore[no-any-return, arg-type]  # ts checked just above


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
