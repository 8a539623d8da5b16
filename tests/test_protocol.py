"""The wire codec: round trips, and every kind of bad input maps to a coded error."""
from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import msgpack
import pytest

from a4ps import protocol as p


def test_request_round_trip():
    body = p.encode_request("task.submit", {"text": "hi", "priority": 3}, "tok", "r1")
    req = p.decode_request(body)
    assert (req.v, req.id, req.token, req.cmd) == (p.PROTOCOL_VERSION, "r1", "tok", "task.submit")
    args = p.validate_args(req.cmd, req.args)
    assert isinstance(args, p.TaskSubmitArgs) and args.text == "hi" and args.priority == 3


def test_reply_round_trip_reduces_unknown_values():
    class Thing:
        def __repr__(self):
            return "<thing>"
    result = {"path": Path("/x/y"), "when": dt.datetime(2026, 1, 2, 3, 4, 5),
              "set": {1}, "obj": Thing(), "nan": float("nan"), "big": 2**70}
    r = p.decode_reply(p.encode_reply(p.Reply.success("a", result)))
    assert r.ok and r.id == "a"
    assert r.result["path"] == "/x/y"
    assert r.result["when"] == "2026-01-02T03:04:05"
    assert r.result["set"] == [1]
    assert r.result["obj"] == {"$repr": "<thing>"}
    assert r.result["big"] == str(2**70)
    err = p.decode_reply(p.encode_reply(p.Reply.failure("b", p.ErrorCode.NOT_FOUND, "no x")))
    assert not err.ok and err.error.code == "not_found" and err.error.message == "no x"


def test_event_round_trip():
    frames = p.encode_event("task.step", 7, 123.5, {"text": "x" * 200, "round": 1})
    assert frames[0] == b"task.step"
    ev = p.decode_event(frames)
    assert (ev.topic, ev.seq, ev.ts, ev.payload["round"]) == ("task.step", 7, 123.5, 1)


@pytest.mark.parametrize("body, code", [
    (b"\xc1", "bad_msgpack"),                             # never-used msgpack byte
    (b"\x82\xa1v", "bad_msgpack"),                          # truncated map
    (b"\x92\x01", "bad_request"),                          # an array, not a map
    (msgpack.packb([1, 2]), "bad_request"),                # not a map
    (msgpack.packb({"id": "x", "cmd": "a.b"}), "unauthorized"),  # no token
    (msgpack.packb({"v": 1, "id": "x", "token": "t", "cmd": "a.b", "args": [1]}), "bad_request"),
    (msgpack.packb({"v": 1, "id": "x", "token": "t", "cmd": "a.b", "zzz": 1}), "bad_request"),
    (msgpack.packb({"v": 99, "id": "x", "token": "t", "cmd": "a.b"}), "unsupported_version"),
    (b"\x81\xc4\x01a\x01", "bad_request"),                 # bytes key
])
def test_bad_requests_have_codes(body, code):
    with pytest.raises(p.ProtocolError) as e:
        p.decode_request(body)
    assert e.value.code == code


def test_bad_request_keeps_the_id_for_the_reply():
    with pytest.raises(p.ProtocolError) as e:
        p.decode_request(msgpack.packb({"v": 1, "id": "keep-me", "cmd": "x.y"}))
    assert e.value.request_id == "keep-me"


def test_too_large():
    body = p.encode_request("task.submit", {"text": "x" * 5000}, "t", "1")
    with pytest.raises(p.ProtocolError) as e:
        p.decode_request(body, max_bytes=1024)
    assert e.value.code == "too_large" and "1024" in e.value.message


def test_args_validation():
    with pytest.raises(p.ProtocolError) as e:
        p.validate_args("nope.cmd", {})
    assert e.value.code == "unknown_command" and "task.submit" in e.value.message
    with pytest.raises(p.ProtocolError) as e:
        p.validate_args("task.submit", {"text": ""})
    assert e.value.code == "invalid_args" and "text" in e.value.message
    with pytest.raises(p.ProtocolError) as e:
        p.validate_args("proto.update", {"name": "BRICK", "slots": {"a": 1}, "typo": 1})
    assert e.value.code == "invalid_args"
    with pytest.raises(p.ProtocolError):
        p.validate_args("codex.decide", {"proposal_id": "p", "version": "x", "approve": True})
    a = p.validate_args("task.list", {})
    assert a.limit == 50 and a.status is None
    for cmd in ("proto.list", "tool.list", "codex.get", "system.snapshot", "system.status",
                "system.save"):
        p.validate_args(cmd, {})
        with pytest.raises(p.ProtocolError):
            p.validate_args(cmd, {"unexpected": 1})


def test_register_command_extension_point():
    table = dict(p.COMMANDS)
    try:
        p.register_command("motivator.pause", p.PauseArgs)
        assert p.validate_args("motivator.pause", {"paused": False}).paused is False
        with pytest.raises(ValueError):
            p.register_command("nodot")
    finally:
        p.COMMANDS.clear()
        p.COMMANDS.update(table)


def test_random_bytes_never_raise_anything_but_protocol_error():
    rng = random.Random(5)
    for _ in range(3000):
        body = rng.randbytes(rng.randint(0, 64))
        try:
            p.decode_request(body, max_bytes=4096)
        except p.ProtocolError as e:
            assert e.code in {c.value for c in p.ErrorCode}


def test_decoded_event_is_a_normal_model():
    ev = p.decode_event(p.encode_event("log", 3, 1.5, {"message": "hi"}))
    assert ev == p.EventMessage(topic="log", seq=3, ts=1.5, payload={"message": "hi"})
    assert ev.model_dump() == {"topic": "log", "seq": 3, "ts": 1.5, "payload": {"message": "hi"}}


@pytest.mark.parametrize("frames", [
    [b"log"],
    [b"log", b"\xc1"],
    [b"\xff", msgpack.packb({"seq": 1, "ts": 1.0, "payload": {}})],
    [b"log", msgpack.packb({"seq": "1", "ts": 1.0, "payload": {}})],
    [b"log", msgpack.packb({"seq": 1, "ts": 1.0, "payload": [1]})],
    [b"log", msgpack.packb([1, 2])],
])
def test_bad_events_raise_protocol_error(frames):
    with pytest.raises(p.ProtocolError):
        p.decode_event(frames)


# -- issue 13: the wire is exactly what docs/protocol.md says --------------------------

def _req(**fields):
    return msgpack.packb(fields, use_bin_type=True)


GOOD = {"v": 1, "id": "r1", "token": "t", "cmd": "task.submit", "args": {"text": "hi"}}


@pytest.mark.parametrize("body, code", [
    (_req(**{k: v for k, v in GOOD.items() if k != "v"}), "bad_request"),      # no v
    (_req(**{k: v for k, v in GOOD.items() if k != "args"}), "bad_request"),   # no args
    (_req(**{k: v for k, v in GOOD.items() if k != "token"}), "unauthorized"),
    (_req(**{**GOOD, "v": "1"}), "bad_request"),
    (_req(**{**GOOD, "v": True}), "bad_request"),
    (_req(**{**GOOD, "v": 1.0}), "bad_request"),
    (_req(**{**GOOD, "id": 7}), "bad_request"),
    (_req(**{**GOOD, "id": ""}), "bad_request"),
    (_req(**{**GOOD, "cmd": ["task.submit"]}), "bad_request"),
    (_req(**{**GOOD, "args": None}), "bad_request"),
    (_req(**{**GOOD, "args": [1]}), "bad_request"),
    (_req(**{**GOOD, "extra": 1}), "bad_request"),
    (_req(**GOOD) + b"\x01", "bad_msgpack"),                 # trailing data after args
    (_req(**GOOD)[:-1], "bad_msgpack"),                        # truncated args
])
def test_envelope_is_strict(body, code):
    with pytest.raises(p.ProtocolError) as e:
        p.decode_request(body)
    assert e.value.code == code, e.value


@pytest.mark.parametrize("cmd, args", [
    ("task.submit", {"text": "hi", "priority": "5"}),
    ("task.submit", {"text": "hi", "priority": True}),
    ("task.submit", {"text": "hi", "priority": 5.0}),
    ("task.submit", {"text": b"hi"}),
    ("task.list", {"limit": True}),
    ("task.list", {"limit": "10"}),
    ("codex.decide", {"proposal_id": "p", "version": 1, "approve": 1}),
    ("motivator.pause", {"paused": "yes"}),
    ("proto.update", {"name": "BRICK", "methods": {"m": 42}}),
    ("proto.update", {"name": "BRICK", "delete": ("a",)}),
])
def test_args_are_not_coerced(cmd, args):
    with pytest.raises(p.ProtocolError) as e:
        p.validate_args(cmd, args)
    assert e.value.code == "invalid_args"


def test_args_decoding_is_bounded():
    def env_for(args_body: bytes) -> p.Envelope:
        head = msgpack.packb({"v": 1, "id": "x", "token": "t", "cmd": "proto.update"})
        body = bytes([0x85]) + head[1:] + msgpack.packb("args") + args_body
        env = p.read_envelope(body)
        p.check_envelope(env)
        return env
    deep: list = []
    node = deep
    for _ in range(100):
        node.append([])
        node = node[0]
    cases = [
        (msgpack.packb({"slots": {"x": deep}}), "invalid_args", "nested deeper"),
        (msgpack.packb({"slots": {f"k{i}": i for i in range(25_000)}}), "invalid_args",
         "more than"),
        (msgpack.packb({"slots": {1: "int key"}}), "invalid_args", "strings"),
        (msgpack.packb({"slots": msgpack.ExtType(5, b"x")}), "bad_msgpack", "extension"),
    ]
    for args_body, code, words in cases:
        with pytest.raises(p.ProtocolError) as e:
            p.decode_args(env_for(args_body))
        assert e.value.code == code and words in e.value.message and e.value.request_id == "x"
    ok = {"name": "BRICK", "slots": {"a": [1, {"b": None}], "c": b"\x00", "d": 1.5}}
    assert p.decode_args(env_for(msgpack.packb(ok, use_bin_type=True))) == ok


def test_envelope_is_read_without_decoding_the_args():
    """Failure 9: the bus thread decoded 150k keys before checking the token."""
    import time
    big = {f"k{i}": i for i in range(150_000)}
    body = msgpack.packb({"v": 1, "id": "x", "token": "wrong", "cmd": "proto.update",
                          "args": {"name": "BRICK", "slots": big}})
    assert len(body) > 1_000_000
    t0 = time.perf_counter()
    for _ in range(20):
        env = p.read_envelope(body)
    per = (time.perf_counter() - t0) / 20
    assert env.token == "wrong" and env.cmd == "proto.update"
    assert per < 0.005, per           # microseconds in fact: args are not touched
    # args first: skipped (a C-speed walk), and the envelope is still read
    first = msgpack.packb({"args": {"slots": big}, "v": 1, "id": "y", "token": "t",
                           "cmd": "proto.update"})
    env = p.read_envelope(first)
    assert env.request_id == "y" and env.args_end is not None
    dup = b"\x82" + msgpack.packb("id") + msgpack.packb("a") + msgpack.packb("id") \
        + msgpack.packb("b")
    with pytest.raises(p.ProtocolError, match="twice"):
        p.read_envelope(dup)
