"""OpenAIBackend with the real `openai` client against tests/openai_standin.py.

The stand-in is a protocol-level server (it runs no model); these tests check what our
backend sends and how it reads what comes back: streaming, cancel closing the stream,
finish reasons, decisions through ``response_format``, and the typed errors.
"""
from __future__ import annotations

import json
import socket
import threading

import pytest

from a4ps.events import EventRecorder
from a4ps.models.errors import (BackendUnavailable, DecisionError, GenerationCancelled,
                                ModelNotFound, ModelTimeout)
from a4ps.models.manager import ModelManager
from a4ps.models.openai_backend import OpenAIBackend, drop_optional_nulls, strict_schema
from openai_standin import OpenAIStandIn  # tests/ is on sys.path (rootdir conftest)

MSG = [{"role": "user", "content": "hello there friend"}]


@pytest.fixture
def server():
    with OpenAIStandIn(models=["qwen-3b", "llama-8b"]) as srv:
        yield srv


@pytest.fixture
def openai_settings(settings, server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)    # honoured like OLLAMA_HOST
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings.models.backend = "openai"
    settings.models.openai.timeout_s = 5.0
    settings.models.openai.max_retries = 0
    return settings


def _manager(settings, bus):
    from a4ps.models.embeddings import HashEmbedder
    return ModelManager(settings, bus, embedder=HashEmbedder())


def test_settings_select_the_backend_and_its_persona_map(openai_settings, bus):
    mm = _manager(openai_settings, bus)
    assert isinstance(mm.backend, OpenAIBackend) and mm.backend.base_url.endswith("/v1")
    openai_settings.models.openai_personas = {"ALFRED": "qwen-3b", "BRICK": "llama-8b",
                                              "ROBIN": "qwen-3b"}
    assert openai_settings.models.persona_model("BRICK") == "llama-8b"


def test_generate_streams_with_sampling_knobs(openai_settings, bus, server):
    mm = _manager(openai_settings, bus)
    pieces: list[str] = []
    g = mm.generate("qwen-3b", MSG, temperature=0.3, max_tokens=50, stop=["###"],
                    on_token=pieces.append, top_p=0.9, repetition_penalty=1.2,
                    no_repeat_ngram_size=3)
    assert g.text == "echo: hello there friend" and "".join(pieces) == g.text
    assert len(pieces) == 4 and g.tokens == 4 and g.finish == "eos"
    assert g.ttft_s is not None and g.ttft_s <= g.seconds
    body = server.bodies()[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "qwen-3b" and body["messages"] == MSG
    assert (body["temperature"], body["max_tokens"], body["stop"], body["top_p"]) == \
        (0.3, 50, ["###"], 0.9)
    assert body["repetition_penalty"] == 1.2 and "no_repeat_ngram_size" not in body


def test_finish_reasons_length_and_stop(openai_settings, bus, server):
    mm = _manager(openai_settings, bus)
    g = mm.generate("qwen-3b", [{"role": "user", "content": "a b c d e f"}], max_tokens=3)
    assert g.finish == "length" and g.text == "echo: a b"
    g = mm.generate("qwen-3b", [{"role": "user", "content": "a b END c"}], stop=["END"])
    assert g.finish == "stop" and g.text == "echo: a b"


def test_switching_models_checks_the_server_lists_them(openai_settings, bus, server):
    rec = EventRecorder(bus)
    mm = _manager(openai_settings, bus)
    assert mm.chat("qwen-3b", "one") == "echo: one"
    assert mm.chat("llama-8b", "two") == "echo: two"
    assert [e.payload["model"] for e in rec.of("model.loaded")] == ["qwen-3b", "llama-8b"]
    assert [e.payload["model"] for e in rec.of("model.unloaded")] == ["qwen-3b"]
    assert len(server.bodies("/v1/models")) == 2 and mm.resident() == "llama-8b"


def test_cancel_closes_the_stream_mid_generation(openai_settings, bus, server):
    server.token_delay_s = 0.05
    words = " ".join(f"w{i}" for i in range(200))
    mm = _manager(openai_settings, bus)
    cancel = threading.Event()
    got: list[str] = []

    def on_token(piece: str) -> None:
        got.append(piece)
        if len(got) == 3:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        mm.generate("qwen-3b", [{"role": "user", "content": words}], on_token=on_token,
                    cancel=cancel)
    assert len(got) <= 4                      # stopped within about one token
    assert server.finished.wait(5)
    # the server saw the client go away long before the 200 words were sent
    assert server.aborted and server.aborted[0] < 20


def test_choose_and_structured_use_response_format(openai_settings, bus, server):
    def reply(model, msgs, body):
        schema = body["response_format"]["json_schema"]["schema"]
        if "choice" in schema["properties"]:
            return json.dumps({"choice": "tool"})
        return json.dumps({"name": "add_numbers", "description": "adds", "args": None})

    server.reply_fn = reply
    mm = _manager(openai_settings, bus)
    c = mm.choose("qwen-3b", "route this", ["direct", "contrapunto", "tool"])
    assert c.value == "tool" and c.method == "json-schema"
    fmt = server.bodies()[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["choice"]["enum"] == \
        ["direct", "contrapunto", "tool"]
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "description": {"type": "string"},
        "args": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "required": ["name", "description"]}
    value = mm.structured("qwen-3b", "which tool?", schema)
    # "args" was optional: strict mode made it nullable, and the null is dropped again
    assert value == {"name": "add_numbers", "description": "adds"}
    sent = server.bodies()[-1]["response_format"]["json_schema"]["schema"]
    assert sent["additionalProperties"] is False
    assert sent["required"] == ["name", "description", "args"]
    assert server.bodies()[-1]["temperature"] == 0.0


def test_a_decision_that_does_not_validate_is_a_decision_error(openai_settings, bus, server):
    mm = _manager(openai_settings, bus)
    server.reply_fn = lambda model, msgs, body: json.dumps({"choice": "maybe"})
    with pytest.raises(DecisionError, match="not one of"):
        mm.choose("qwen-3b", "route", ["direct", "tool"])
    server.reply_fn = lambda model, msgs, body: "sure, here you go"
    with pytest.raises(DecisionError, match="no JSON"):
        mm.structured("qwen-3b", "x", {"type": "object",
                                       "properties": {"n": {"type": "integer"}}})
    assert mm.stats()["decision_errors"] == 1      # choose's DecisionError is counted apart


def test_strict_schema_round_trip_keeps_nested_optionals():
    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"]}}},
        "required": ["items"]}
    wire, plan = strict_schema(schema)
    inner = wire["properties"]["items"]["items"]
    assert inner["required"] == ["a", "b"] and inner["additionalProperties"] is False
    assert inner["properties"]["b"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert drop_optional_nulls({"items": [{"a": "x", "b": None}, {"a": "y", "b": 2}]}, plan) \
        == {"items": [{"a": "x"}, {"a": "y", "b": 2}]}
    assert schema["properties"]["items"]["items"]["required"] == ["a"]   # not mutated


def test_missing_model_says_how_to_serve_it(openai_settings, bus, server):
    mm = _manager(openai_settings, bus)
    with pytest.raises(ModelNotFound, match=r"it serves: qwen-3b, llama-8b.*vllm serve mixtral"):
        mm.chat("mixtral", "x")
    # a server that lists nothing still answers 404 for the model on the chat call
    be = OpenAIBackend(openai_settings)
    be._resident = "mixtral"
    with pytest.raises(ModelNotFound, match="openai_personas"):
        be.generate(MSG)


def test_connection_refused_says_start_the_server(settings, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                   # nothing listens there now
    settings.models.openai.base_url = f"http://127.0.0.1:{port}/v1"
    settings.models.openai.max_retries = 0
    be = OpenAIBackend(settings)
    with pytest.raises(BackendUnavailable, match=r"is it running\?.*vllm serve"):
        be.load("qwen-3b")
    be._resident = "qwen-3b"
    with pytest.raises(BackendUnavailable, match="llama-server"):
        be.generate(MSG)


def test_timeouts_are_typed_before_and_during_the_stream(openai_settings, server):
    openai_settings.models.openai.timeout_s = 0.3
    be = OpenAIBackend(openai_settings)
    be.load("qwen-3b")
    server.chat_delay_s = 1.0                   # no answer at all within the timeout
    with pytest.raises(ModelTimeout, match="did not answer chat within 0.3s"):
        be.generate(MSG)
    server.chat_delay_s = 0.0
    server.token_delay_s = 1.0                  # the stream starts, then stalls
    with pytest.raises(ModelTimeout, match="models.openai.timeout_s"):
        be.generate([{"role": "user", "content": "a b c d"}])


def test_api_key_is_sent_and_a_wrong_one_is_explained(openai_settings, server, monkeypatch):
    server.api_key = "sk-local"
    openai_settings.models.openai.api_key = "sk-local"
    be = OpenAIBackend(openai_settings)
    be.load("qwen-3b")
    assert be.generate(MSG).text == "echo: hello there friend"
    openai_settings.models.openai.api_key = None
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with pytest.raises(BackendUnavailable, match="refused the API key"):
        OpenAIBackend(openai_settings).load("qwen-3b")


def test_a_whole_task_runs_on_the_openai_backend(openai_settings, server):
    """The System on an OpenAI-compatible server: personas take their models from
    models.openai_personas, and every call of one task reaches the server."""
    from a4ps.system import System
    from deployment import describe_call, standin_reply
    server.reply_fn = standin_reply
    openai_settings.models.embedding_backend = "hash"
    openai_settings.models.openai_personas = {"ALFRED": "qwen-3b", "BRICK": "llama-8b",
                                              "ROBIN": "qwen-3b"}
    openai_settings.cognition.max_rounds = 1
    with System(openai_settings).start(services=False) as system:
        assert system.protos.get("BRICK").model_name == "llama-8b"
        t = system.tasks.submit("job-1: how do we share 7 apples among 3 friends?")
        result = system.run_task(system.tasks.claim())
        assert system.tasks.get(t.id).status == "done" and result["answer"]
    asked = [describe_call(b) for b in server.bodies()]
    assert {job for job, _ in asked} == {"job-1"}
    models = {describe_call(b)[1]: b["model"] for b in server.bodies()}
    assert models["BRICK"] == "llama-8b" and models["ROBIN"] == "qwen-3b"
    # ALFRED's decisions (the route, the choice of answer) came from the server too,
    # asked of ALFRED's model under a JSON schema
    assert models["route"] == "qwen-3b" and models["answer"] == "qwen-3b"
