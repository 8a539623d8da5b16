"""Graph checkpoints on a real PostgreSQL server (``cognition.checkpointer = "postgres://…"``):
resume after a crash in-process and after a SIGKILL, on another data directory (another
machine, as far as the graph can tell), and clear errors for bad settings."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import graph_parts
from a4ps.cognition.checkpoints import CheckpointStoreError, redact
from a4ps.config import SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
LOGIC = ["apples divide into equal integer shares by arithmetic",
         "remainder modulo three leaves one apple unassigned",
         "optimal allocation maximises total utility precisely"]
FEEL = ["friendship matters more than fairness between people",
        "kindness and gratitude make everyone feel welcome",
        "listening with warmth heals hurt hearts tonight"]


class Crash(BaseException):
    """Stands in for the process dying: not an Exception, so nothing catches it."""


def test_crash_mid_task_resumes_from_postgres_on_another_data_dir(tmp_path, bus, pg_dsn):
    log: list[str] = []
    inner = graph_parts.script(brick=lambda n: LOGIC[n - 1], robin=lambda n: FEEL[n - 1],
                               log=log)
    state = {"crash_at": 5}      # route, B1, R1, B2, then die inside R2

    def reply(messages):
        if len(log) + 1 == state["crash_at"]:
            state["crash_at"] = None
            raise Crash()
        return inner(messages)

    first = load_settings(data_dir=tmp_path / "a", cognition={"checkpointer": pg_dsn})
    p = graph_parts.build(first, bus, reply, memory=False, max_rounds=3,
                          dissonance_threshold=0.05)
    assert p.graph.checkpointer_url == pg_dsn and p.graph.checkpointer_path is None
    with pytest.raises(Crash):
        p.graph.run("t-crash", "share apples")
    p.graph.close()
    assert not (tmp_path / "a" / "checkpoints").exists()     # nothing went to SQLite

    # "another machine": a new graph on another data dir, the same database
    second = load_settings(data_dir=tmp_path / "b", cognition={"checkpointer": pg_dsn})
    p2 = graph_parts.build(second, bus, reply, memory=False, max_rounds=3,
                           dissonance_threshold=0.05)
    try:
        assert p2.graph.has_checkpoint("t-crash")
        assert list(p2.graph.checkpoint("t-crash").next) == ["robin"]
        log.clear()
        r = p2.graph.run("t-crash", "share apples", resume=True)
        assert log == ["ROBIN", "BRICK", "ROBIN", "ALFRED/choice"]  # nothing before R2 re-ran
        assert r["status"] == "ok" and [x["round"] for x in r["rounds"]] == [1, 2, 3]
        assert not p2.graph.has_checkpoint("t-crash")
        p2.graph.forget("t-crash")
        assert p2.graph.checkpoint("t-crash") is None
    finally:
        p2.graph.close()


def test_bad_checkpointer_settings_are_refused_clearly(tmp_path, bus):
    with pytest.raises(SettingsError, match=r"cognition.checkpointer.*PostgreSQL URL"):
        load_settings(data_dir=tmp_path, cognition={"checkpointer": "mysql://x/y"})
    from ports import free_port
    url = f"postgres://bob:s3cret@127.0.0.1:{free_port()}/a4ps"     # nothing listens
    s = load_settings(data_dir=tmp_path, cognition={"checkpointer": url})
    p = graph_parts.build(s, bus, graph_parts.script(), memory=False)
    with pytest.raises(CheckpointStoreError, match=r"cannot reach PostgreSQL") as err:
        p.graph.run("t", "hello")
    assert "s3cret" not in str(err.value) and "bob:***@" in str(err.value)
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


@pytest.mark.slow   # two fresh interpreters (~3 s of imports each) and a slow fake model
def test_sigkill_mid_task_then_resume_on_postgres(tmp_path, pg_dsn):
    """tests/test_graph.py's SIGKILL test, with the checkpoints in PostgreSQL and the
    resumed run on a data directory that never held any."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "A4PS_COGNITION__CHECKPOINTER": pg_dsn}
    worker = [sys.executable, str(ROOT / "tests" / "graph_worker.py")]
    calls = first_dir / "calls.log"
    first = graph_parts.kill_worker_mid_task(worker + [str(first_dir), "t-kill"], calls, env)
    first_pid = first[0].split()[0]
    assert len(first) < 8, "the worker finished before it was killed"
    assert not (first_dir / "checkpoints").exists()

    out = subprocess.run(worker + [str(second_dir), "t-kill", "--resume"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = (second_dir / "calls.log").read_text().splitlines()
    second = [ln.split()[1] for ln in lines]
    second_pid = lines[0].split()[0]
    # the resumed run did not start over: no new routing, and fewer calls than a full task
    assert "ALFRED/route" not in second
    assert len(first) + len(second) <= 8 + 1      # at most the node in flight ran twice
    result = json.loads((second_dir / f"result-{second_pid}.json").read_text())
    assert result["status"] == "ok"
    assert [x["round"] for x in result["rounds"]] == [1, 2, 3]
    # turns from before the kill came back from PostgreSQL (the route is a decision, not a
    # turn, so BRICK's round-1 turn comes first, as in tests/test_graph.py)
    assert result["turns"][0]["persona"] == "BRICK"
    assert result["turns"][0]["text"].startswith(f"[{first_pid}]")
    assert not (second_dir / "checkpoints").exists()
    shutil.rmtree(first_dir)


def test_two_graphs_set_up_the_same_fresh_database_at_once(tmp_path, bus, pg_dsn):
    """Two daemons starting together: the saver's migrations must not collide."""
    import threading
    graphs = [graph_parts.build(load_settings(data_dir=tmp_path / n,
                                              cognition={"checkpointer": pg_dsn}),
                                bus, graph_parts.script(), memory=False).graph
              for n in ("a", "b", "c")]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(graphs))

    def open_it(g):
        barrier.wait()
        try:
            g.graph
        except BaseException as e:      # noqa: BLE001 - collected for the assert
            errors.append(e)
    threads = [threading.Thread(target=open_it, args=(g,)) for g in graphs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert graphs[0].run("t1", "hello")["status"] == "ok"
        assert graphs[1].checkpoint("t1") is not None        # shared store
    finally:
        for g in graphs:
            g.close()


def test_a_checkpoint_store_failure_fails_the_task_instead_of_leaving_it_running(data_dir,
                                                                                    pg_dsn):
    from a4ps.system import System
    from ports import free_port
    s = load_settings(data_dir=data_dir, models={"backend": "scripted",
                                                 "embedding_backend": "hash"},
                      cognition={"checkpointer": pg_dsn})
    with System(s).start(services=False) as system:
        # the database goes away while the daemon runs
        system.graph.close()
        system.graph.checkpointer_url = f"postgres://a4ps@127.0.0.1:{free_port()}/gone"
        task = system.tasks.submit("hello")
        claimed = system.tasks.claim()
        assert claimed.id == task.id
        system.run_task(claimed)
        done = system.tasks.get(task.id)
        assert done.status == "failed" and "cannot reach PostgreSQL" in done.error


@pytest.mark.parametrize("store", ["tasks", "cognition", "memory"])
def test_the_daemon_refuses_to_start_on_a_store_it_cannot_use(tmp_path, monkeypatch, capsys,
                                                              store):
    from a4ps.cli import main
    from ports import free_port
    gone = f"postgres://a4ps:pw@127.0.0.1:{free_port()}/gone"
    env = {"tasks": {"A4PS_TASKS__QUEUE": gone},
           "cognition": {"A4PS_COGNITION__CHECKPOINTER": gone},
           "memory": {"A4PS_MEMORY__URI": "s3://no-bucket/x", "A4PS_MEMORY__STORAGE_OPTIONS":
                      f'{{"aws_endpoint": "http://127.0.0.1:{free_port()}", '
                      f'"allow_http": "true", "aws_region": "us-east-1", '
                      f'"aws_access_key_id": "k", "aws_secret_access_key": "s", '
                      f'"client_max_retries": "0"}}'}}[store]
    for k, v in {"A4PS_MODELS__BACKEND": "scripted", "A4PS_MODELS__EMBEDDING_BACKEND": "hash",
                 **env}.items():
        monkeypatch.setenv(k, v)
    assert main(["--data-dir", str(tmp_path / "d"), "daemon"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("a4ps daemon: ") and "Traceback" not in err
    assert {"tasks": "task queue at postgres://a4ps:***@", "cognition": "graph checkpoints",
            "memory": "cannot open the memory at s3://no-bucket/x"}[store] in err
    assert "pw@" not in err
