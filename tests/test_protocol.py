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
