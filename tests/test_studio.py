"""LangGraph Studio: ``langgraph.json`` loads the graph the way the LangGraph API does,
its input/output schemas are not null, and every run in one server process shares one
System, started without background services, on its own data directory and under that
directory's daemon lock."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from a4ps.cognition.graph import NODES

ROOT = Path(__file__).resolve().parent.parent


def load_like_langgraph_api(monkeypatch) -> tuple[object, dict]:
    """What ``langgraph_api.graph._graph_from_spec`` does with a ``path:variable`` spec:
    the env from ``langgraph.json``, the module executed from its file under a
    path-derived name, the variable looked up, and a function treated as a factory."""
    cfg = json.loads((ROOT / "langgraph.json").read_text())
    for k, v in (cfg.get("env") or {}).items():
        monkeypatch.setenv(k, v)
    path, _, variable = cfg["graphs"]["contrapunto"].rpartition(":")
    modname = path.replace("/", "__").replace(".py", "").replace(" ", "_").lstrip(".")
    spec = importlib.util.spec_from_file_location(modname, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, modname, module)
    spec.loader.exec_module(module)
    value = module.__dict__[variable]
    return value, cfg


def test_langgraph_json_graph_has_non_null_input_and_output_schemas(monkeypatch, data_dir):
    value, cfg = load_like_langgraph_api(monkeypatch)
    assert cfg["env"]["A4PS_DATA_DIR"] == "data/studio"     # never the daemon's data/
    monkeypatch.setenv("A4PS_DATA_DIR", str(data_dir))
    def no_system(*a, **k):
        raise AssertionError("drawing the graph must not build the System")
    assert callable(value)
    monkeypatch.setitem(value.__globals__, "System", no_system)   # the factory's own binding
    graph = value()             # a factory: the server calls it per request
    assert graph is value()     # ... and gets the same compiled graph each time
    schema_in, schema_out = graph.get_input_jsonschema(), graph.get_output_jsonschema()
    assert schema_in and schema_out
    assert {"task", "task_id"} <= set(schema_in["properties"])
    assert {"answer", "decisions", "rounds"} <= set(schema_out["properties"])
    assert set(NODES) <= set(graph.get_graph().nodes)
    assert graph.checkpointer is None       # the server brings its own


def test_cognition_never_imports_system_or_studio():
    code = ("import sys, a4ps.cognition.graph, a4ps.cognition.decisions; "
            "print('a4ps.system' in sys.modules, 'a4ps.studio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


@pytest.fixture
def studio_env(monkeypatch, data_dir):
    """A real System on scripted models and the hashing embedder (no model download)."""
    monkeypatch.setenv("A4PS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("A4PS_MODELS__BACKEND", "scripted")
    monkeypatch.setenv("A4PS_MODELS__EMBEDDING_BACKEND", "hash")
    return data_dir


def test_runs_share_one_system_without_services_under_the_lock(studio_env):
    from a4ps.config import load_settings
    from a4ps.lock import LOCK_NAME, DataLock, DataLockHeld
    from a4ps.studio import StudioHost
    built = []

    def make_system(settings):
        from a4ps.system import System
        s = System(settings)
        built.append(s)
        return s
    host = StudioHost(load_settings(), make_system=make_system)
    try:
        graph = host.graph()
        assert built == []
        first = graph.invoke({"task_id": "s-1", "task": "What is three times four?"})
        threads = threading.active_count()
        second = host.graph().invoke({"task_id": "s-2", "task": "Why is the sky blue?"})
        assert first["status"] == "ok" and second["status"] == "ok"
        assert second["decisions"][0]["kind"] == "route"
        assert len(built) == 1 and host.systems_built == 1
        assert host.cognitive._runs == {}      # nothing kept per run
        assert threading.active_count() <= threads      # no new threads per run
        system = built[0]
        names = {t.name for t in threading.enumerate()}
        assert not names & {"a4ps-curator", "a4ps-motivator", "a4ps-philosopher"}
        assert not system.curator.running
        assert system.settings.data_dir == studio_env
        with pytest.raises(DataLockHeld):     # a daemon cannot open this data dir now
            DataLock(studio_env / LOCK_NAME).acquire()
    finally:
        host.close()
    assert built[0].state.value == "stopped"
    DataLock(studio_env / LOCK_NAME).acquire().release()     # released on close


def test_a_daemon_holding_the_data_dir_stops_studio_with_a_clear_error(studio_env):
    from a4ps.config import load_settings
    from a4ps.lock import LOCK_NAME, DataLock, DataLockHeld
    from a4ps.studio import StudioHost
    held = DataLock(studio_env / LOCK_NAME).acquire("daemon", command_addr="tcp://127.0.0.1:5555")
    host = StudioHost(load_settings())
    try:
        with pytest.raises(DataLockHeld, match="the a4ps daemon .* is using"):
            host.graph().invoke({"task_id": "s-x", "task": "hello"})
    finally:
        held.release()
        host.close()


def test_langgraph_api_is_git_ignored():
    out = subprocess.run(["git", "check-ignore", "-q", ".langgraph_api/x"], cwd=ROOT)
    assert out.returncode == 0
