"""ModelManager on the scripted backend: residency, budget, events, counters, locking."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from a4ps.events import EventRecorder
from a4ps.models.embeddings import HashEmbedder
from a4ps.models.errors import InvalidRequest, ModelError, ModelNotFound, ModelTooLarge
from a4ps.models.manager import ModelManager
from a4ps.models.scripted import ScriptedBackend


def make(settings, bus, **kw):
    backend = ScriptedBackend(**kw)
    return ModelManager(settings, bus, backend=backend, embedder=HashEmbedder()), backend


def test_chat_streams_and_returns_reply(settings, bus):
    mm, backend = make(settings, bus, replies=["The capital of France is Paris."])
    pieces: list[str] = []
    reply = mm.chat("a", [{"role": "user", "content": "capital of France?"}],
                    temperature=0.2, max_tokens=50, on_token=pieces.append)
    assert reply == "The capital of France is Paris."
    assert "".join(pieces) == reply
    assert backend.calls[0][0] == "a"
    assert backend.calls[0][2]["temperature"] == 0.2
    assert mm.resident() == "a"


def test_alternating_models_keeps_one_resident_and_counts(settings, bus):
    rec = EventRecorder(bus)
    mm, backend = make(settings, bus, replies=["x"])
    resident_counts = []
    for i in range(6):
        mm.chat("a" if i % 2 == 0 else "b", "hi")
        resident_counts.append(mm.resident())
    assert resident_counts == ["a", "b"] * 3
    s = mm.stats()
    assert s["loads"] == 6 and s["unloads"] == 5
    assert s["loads"] - s["unloads"] == 1
    # every load was preceded by the unload of the previous model
    topics = [e.topic for e in rec.events if e.topic != "model.loading"]
    assert topics == ["model.loaded"] + ["model.unloaded", "model.loaded"] * 5
    assert [e.payload["model"] for e in rec.of("model.unloaded")] == ["a", "b", "a", "b", "a"]
    # same model again: no reload
    mm.chat("b", "again")
    assert mm.stats()["loads"] == 6
    assert s["generations"] == 6 and s["tokens"] == 6


def test_events_carry_progress_and_seconds(settings, bus):
    rec = EventRecorder(bus)
    mm, _ = make(settings, bus, load_latency_s=0.05)
    mm.load("m")
    loading = rec.of("model.loading")
    assert loading[0].payload["progress"] == 0.0 and loading[0].payload["model"] == "m"
    assert any(0 < e.payload["progress"] < 1 for e in loading)
    loaded = rec.wait_for("model.loaded").payload
    assert loaded["model"] == "m" and loaded["seconds"] >= 0.05 and loaded["progress"] == 1.0
    mm.release()
    assert rec.wait_for("model.unloaded").payload["model"] == "m"
    assert mm.resident() is None
    mm.release()      # idempotent: nothing resident, nothing published
    assert len(rec.of("model.unloaded")) == 1


def test_budget_refuses_too_large_model_before_unloading(settings, bus):
    settings.models.memory_budget_gb = 1.0
    mm, _ = make(settings, bus, sizes={"big": 9_000_000_000, "small": 500_000_000})
    mm.chat("small", "hi")
    with pytest.raises(ModelTooLarge, match=r"big needs about 9\.0 GB.*memory_budget_gb"):
        mm.chat("big", "hi")
    assert mm.resident() == "small"          # the refused request unloaded nothing
    assert mm.stats()["unloads"] == 0


def test_generations_are_serialised(settings, bus):
    mm, _ = make(settings, bus, replies=["ok"], latency_s=0.05)
    active = []
    peak = []
    orig = mm.backend.generate

    def tracking(*a, **kw):
        active.append(1)
        peak.append(len(active))
        try:
            return orig(*a, **kw)
        finally:
            active.pop()
    mm.backend.generate = tracking
    threads = [threading.Thread(target=mm.chat, args=("a" if i % 2 else "b", "hi"))
               for i in range(6)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(peak) == 1
    assert time.perf_counter() - t0 >= 6 * 0.05
    assert mm.stats()["generations"] == 6


def test_bad_input_is_rejected_clearly(settings, bus):
    mm, _ = make(settings, bus)
    with pytest.raises(InvalidRequest, match="non-empty list"):
        mm.chat("a", [])
    with pytest.raises(InvalidRequest, match="unknown role 'wizard'"):
        mm.chat("a", [{"role": "wizard", "content": "x"}])
    with pytest.raises(InvalidRequest, match="max_tokens"):
        mm.chat("a", "hi", max_tokens=0)
    with pytest.raises(InvalidRequest, match="model must be"):
        mm.chat("", "hi")
    with pytest.raises(InvalidRequest, match="list of strings"):
        mm.embed("just a string")
    assert mm.resident() is None


def test_backend_failure_becomes_model_error_and_manager_survives(settings, bus):
    def boom(messages):
        if "fail" in messages[-1]["content"]:
            raise RuntimeError("kaput")
        return "fine"
    mm, _ = make(settings, bus, replies=boom, models=["a"])
    with pytest.raises(ModelError, match="generation failed: kaput"):
        mm.chat("a", "please fail")
    with pytest.raises(ModelNotFound):
        mm.chat("nope", "hi")
    assert mm.chat("a", "ok now") == "fine"
    assert mm.stats()["errors"] == 2


def test_on_token_exception_does_not_break_chat(settings, bus):
    mm, _ = make(settings, bus, replies=["one two three"])

    def bad(piece):
        raise ValueError("ui went away")
    assert mm.chat("a", "hi", on_token=bad) == "one two three"


def test_stop_and_max_tokens_reach_backend(settings, bus):
    mm, _ = make(settings, bus, replies=["alpha beta STOP gamma"])
    assert mm.chat("a", "hi", stop=["STOP"]) == "alpha beta"
    assert mm.chat("a", "hi", max_tokens=1) == "alpha"


def test_stats_are_plain_data(settings, bus):
    import json
    mm, _ = make(settings, bus, replies=["a b c d"], latency_s=0.01)
    mm.chat("a", "hi")
    s = mm.stats()
    json.dumps(s)
    for key in ("loads", "unloads", "load_seconds", "tokens", "tokens_per_s", "resident",
                "backend", "last_ttft_s"):
        assert key in s
    assert s["tokens"] == 4 and s["tokens_per_s"] > 0 and s["resident"] == "a"


def test_embed_shape_and_dim(settings, bus):
    mm, _ = make(settings, bus)
    v = mm.embed(["a cat", "a dog", "tax law"])
    assert v.shape == (3, mm.embedding_dim) == (3, 384) and v.dtype == np.float32
    assert mm.embed([]).shape == (0, 384)


def test_from_settings_picks_backend(settings, bus):
    from a4ps.models.embedded import EmbeddedBackend
    from a4ps.models.ollama_backend import OllamaBackend
    assert isinstance(ModelManager.from_settings(settings, bus).backend, EmbeddedBackend)
    settings.models.backend = "ollama"
    assert isinstance(ModelManager.from_settings(settings, bus).backend, OllamaBackend)
