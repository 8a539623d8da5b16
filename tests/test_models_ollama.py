"""OllamaBackend with the real `ollama` client against tests/ollama_standin.py."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from a4ps.events import EventRecorder
from a4ps.models.errors import BackendUnavailable, ModelNotFound, ModelTimeout
from a4ps.models.manager import ModelManager
from a4ps.models.ollama_backend import OllamaBackend
from ollama_standin import OllamaStandIn  # tests/ is on sys.path (rootdir conftest)


@pytest.fixture
def server():
    with OllamaStandIn(models={"smollm2:135m": 100_000_000, "phi3:mini": 2_200_000_000,
                               "nomic-embed-text": 270_000_000}) as srv:
        yield srv


@pytest.fixture
def ollama_settings(settings, server, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", server.url)     # the client must honour OLLAMA_HOST
    settings.models.backend = "ollama"
    settings.models.ollama.timeout_s = 5.0
    return settings


def test_chat_non_streamed_with_options(ollama_settings, server):
    be = OllamaBackend(ollama_settings)
    reply = be.chat("smollm2:135m", [{"role": "user", "content": "hello there friend"}],
                    temperature=0.3, max_tokens=3, stop=["friend"])
    assert reply == "echo: hello there"
    body = [b for m, p, b in server.requests if p == "/api/chat"][-1]
    assert body["stream"] is False
    assert body["options"] == {"temperature": 0.3, "num_predict": 3, "stop": ["friend"]}
    assert body["keep_alive"] == "5m"


def test_stream_yields_pieces(ollama_settings, server):
    be = OllamaBackend(ollama_settings)
    pieces = list(be.stream("smollm2:135m", [{"role": "user", "content": "a b c"}]))
    assert len(pieces) == 4 and "".join(pieces) == "echo: a b c"


def test_embed_list_ps_and_unload_keep_alive_zero(ollama_settings, server):
    be = OllamaBackend(ollama_settings)
    v = be.embed("nomic-embed-text", ["one", "two"])
    assert v.shape == (2, 8) and v.dtype == np.float32
    names = {m["name"] for m in be.list()}
    assert {"smollm2:135m", "phi3:mini", "nomic-embed-text:latest"} <= names
    be.load("phi3:mini")
    assert [m["name"] for m in be.ps()] == ["phi3:mini"]
    be.unload()
    unload = [b for m, p, b in server.requests if p == "/api/chat"][-1]
    assert unload["keep_alive"] == 0 and not unload.get("messages")
    assert be.ps() == [] and be.resident() is None


def test_create_with_adapter_uploads_blobs_and_creates(ollama_settings, server, tmp_path):
    adir = tmp_path / "adapter"
    adir.mkdir()
    (adir / "adapter_model.safetensors").write_bytes(b"\x00fake-lora-weights" * 100)
    (adir / "adapter_config.json").write_text('{"r": 8}')
    (adir / "README.md").write_text("not uploaded")
    be = OllamaBackend(ollama_settings)
    tag = be.create_with_adapter("brick-tuned:v1", "smollm2:135m", adir)
    assert tag == "brick-tuned:v1"
    create = [b for m, p, b in server.requests if p == "/api/create"][-1]
    assert create["from"] == "smollm2:135m"
    assert set(create["adapters"]) == {"adapter_model.safetensors", "adapter_config.json"}
    assert all(d in server.blobs for d in create["adapters"].values())
    assert server.models["brick-tuned:v1"]["adapters"] == create["adapters"]
    # and the new tag answers
    assert be.chat("brick-tuned:v1", [{"role": "user", "content": "x"}]) == "echo: x"


def test_manager_on_ollama_switches_models_and_streams(ollama_settings, bus, server):
    from a4ps.models.embeddings import HashEmbedder
    rec = EventRecorder(bus)
    mm = ModelManager(ollama_settings, bus, embedder=HashEmbedder())
    assert isinstance(mm.backend, OllamaBackend)
    pieces = []
    assert mm.chat("smollm2:135m", "hi you", on_token=pieces.append) == "echo: hi you"
    assert "".join(pieces) == "echo: hi you"
    assert mm.chat("phi3:mini", "second") == "echo: second"
    # the first model was unloaded with keep_alive=0 before the second was loaded
    assert list(server.loaded) == ["phi3:mini"]
    assert [e.payload["model"] for e in rec.of("model.unloaded")] == ["smollm2:135m"]
    s = mm.stats()
    assert s["loads"] == 2 and s["unloads"] == 1 and s["tokens"] == 5


def test_generation_knobs_reach_ollama(ollama_settings, bus, server):
    mm = ModelManager(ollama_settings, bus)
    mm.chat("smollm2:135m", "hi", top_p=0.8, repetition_penalty=1.2, no_repeat_ngram_size=3)
    opts = [b for m, p, b in server.requests if p == "/api/chat" and b.get("messages")][-1]["options"]
    assert opts["top_p"] == 0.8 and opts["repeat_penalty"] == 1.2
    assert "no_repeat_ngram_size" not in opts      # no Ollama equivalent: ignored


def test_manager_budget_uses_ollama_sizes(ollama_settings, bus, server):
    ollama_settings.models.memory_budget_gb = 1.0
    mm = ModelManager(ollama_settings, bus)
    with pytest.raises(Exception, match="phi3:mini needs about 2.2 GB"):
        mm.chat("phi3:mini", "hi")


def test_missing_model_says_pull(ollama_settings, server):
    be = OllamaBackend(ollama_settings)
    with pytest.raises(ModelNotFound, match=r"run `ollama pull llama9:70b`"):
        be.chat("llama9:70b", [{"role": "user", "content": "x"}])
    with pytest.raises(ModelNotFound, match=r"run `ollama pull llama9:70b`"):
        list(be.stream("llama9:70b", [{"role": "user", "content": "x"}]))
    with pytest.raises(ModelNotFound, match=r"ollama pull"):
        ModelManager(ollama_settings, None).chat("llama9:70b", "x")


def test_connection_refused_says_ollama_serve(settings, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                   # nothing listens there now
    monkeypatch.setenv("OLLAMA_HOST", f"http://127.0.0.1:{port}")
    be = OllamaBackend(settings)
    with pytest.raises(BackendUnavailable, match=r"is Ollama running\? start it with `ollama serve`"):
        be.chat("smollm2:135m", [{"role": "user", "content": "x"}])
    with pytest.raises(BackendUnavailable, match="ollama serve"):
        list(be.stream("smollm2:135m", [{"role": "user", "content": "x"}]))
    with pytest.raises(BackendUnavailable, match="ollama serve"):
        be.list()


def test_timeout_is_reported(ollama_settings, server):
    ollama_settings.models.ollama.timeout_s = 0.3
    server.chat_delay_s = 1.0
    be = OllamaBackend(ollama_settings)
    with pytest.raises(ModelTimeout, match="did not answer chat within 0.3s"):
        be.chat("smollm2:135m", [{"role": "user", "content": "x"}])


def test_ollama_embedder_via_settings(ollama_settings, server):
    from a4ps.models.embeddings import make_embedder
    ollama_settings.models.embedding_backend = "ollama"
    ollama_settings.models.ollama.embed_model = "nomic-embed-text"
    emb = make_embedder(ollama_settings)
    v = emb.embed(["a", "b", "c"])
    assert v.shape == (3, 8) and emb.dim == 8
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
