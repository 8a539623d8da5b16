"""A small multi-machine deployment on one host, for the scaling test and benchmark.

Real ``a4ps daemon`` processes, each with its own data directory (image, personas,
memory) and bus ports, sharing one PostgreSQL database for the task queue and the
graph checkpoints, and one inference server: tests/openai_standin.py (a protocol
STAND-IN for vLLM; it runs no model). The stand-in's "model" answers decisions with the
contrapunto route (or the smallest valid object) and free text with the scripted demo
persona (``a4ps.models.scripted.demo_reply``); each daemon uses its own name as API key,
so the stand-in's ``calls`` say which daemon asked what.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from a4ps.client import DaemonClient
from a4ps.config import PERSONAS, PROJECT_ROOT, load_settings
from a4ps.models.scripted import demo_reply, example_of

MODEL = "standin-model"
_JOB = re.compile(r"job-\d+")


def free_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _die_with_parent() -> None:
    """In the child: SIGKILL it if the test process dies first (Linux prctl)."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def standin_reply(model: str, messages: list[dict], body: dict) -> str:
    """What the stand-in inference server says (see the module docstring)."""
    fmt = body.get("response_format")
    if fmt:
        schema = fmt["json_schema"]["schema"]
        choice = schema.get("properties", {}).get("choice", {})
        if "enum" in choice:
            opts = choice["enum"]
            # the dialogue route, offered as "contrapunto" or as the word "talk"
            return json.dumps({"choice": next((o for o in ("contrapunto", "talk") if o in opts),
                                              opts[0])})
        return json.dumps(example_of(schema))
    return demo_reply(messages)


def describe_call(body: dict) -> tuple[str | None, str]:
    """(the job a chat request is about, what it is): ``"route"`` (ALFRED's choice of
    route), ``"answer"`` (ALFRED's choice among the dialogue's answers, the task's one
    synthesis), ``"decision"`` (any other schema decision, e.g. a tool request) or the
    persona whose free text was asked for (``"BRICK"``, ``"ROBIN"``, ``"ALFRED"``)."""
    # the task's job is the last one named in the last message: memories of earlier
    # jobs come before the task there (prompts put context first, the task last)
    last = str((body.get("messages") or [{}])[-1].get("content", ""))
    jobs = _JOB.findall(last)
    job = jobs[-1] if jobs else None
    fmt = body.get("response_format")
    m = re.search(r"You are (\w+)", str(body["messages"][0].get("content", "")))
    persona = m.group(1) if m else "?"
    if fmt:
        props = fmt.get("json_schema", {}).get("schema", {}).get("properties", {})
        options = props.get("choice", {}).get("enum")
        if options and ("contrapunto" in options or "talk" in options):   # route's words
            kind = "route"
        elif options and persona == "ALFRED":
            kind = "answer"
        else:
            kind = "decision"
    elif "Reply with one word" in str(body["messages"][-1].get("content", "")):
        kind = "route"
    else:
        kind = persona
    return job, kind


@dataclass
class DaemonProc:
    name: str
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen
    log_path: Path
    settings: Any = field(default=None)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon {self.name} exited {self.proc.returncode}:\n"
                                     f"{self.output()[-4000:]}")
            if self.settings.token_path.exists():
                try:
                    with DaemonClient.from_settings(self.settings, timeout=1) as c:
                        c.request("system.ping")
                        return
                except Exception:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"daemon {self.name} not ready in {timeout}s:\n"
                             f"{self.output()[-4000:]}")

    def client(self) -> DaemonClient:
        return DaemonClient.from_settings(self.settings, timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


class Deployment:
    """Start daemons sharing ``pg_dsn`` and the inference server at ``inference_url``."""

    def __init__(self, root: Path, pg_dsn: str, inference_url: str, *,
                 max_rounds: int = 1, env: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.pg_dsn = pg_dsn
        self.inference_url = inference_url
        self.max_rounds = max_rounds
        self.extra_env = dict(env or {})
        self.daemons: list[DaemonProc] = []

    def start_daemon(self, name: str, *, grace_s: float | None = None) -> DaemonProc:
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd_addr, ev_addr = free_addr(), free_addr()
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
               "A4PS_DATA_DIR": str(data_dir),
               "A4PS_BUS__COMMAND_ADDR": cmd_addr, "A4PS_BUS__EVENT_ADDR": ev_addr,
               "A4PS_BUS__HEARTBEAT_INTERVAL_S": "0.5",
               "A4PS_MODELS__BACKEND": "openai",
               "A4PS_MODELS__OPENAI__BASE_URL": self.inference_url,
               "A4PS_MODELS__OPENAI__API_KEY": name,
               "A4PS_MODELS__OPENAI__MAX_RETRIES": "0",
               "A4PS_MODELS__OPENAI_PERSONAS": json.dumps({p: MODEL for p in PERSONAS}),
               "A4PS_MODELS__EMBEDDING_BACKEND": "hash",
               "A4PS_TASKS__QUEUE": self.pg_dsn, "A4PS_TASKS__WORKER_NAME": name,
               "A4PS_COGNITION__CHECKPOINTER": self.pg_dsn,
               "A4PS_COGNITION__MAX_ROUNDS": str(self.max_rounds),
               "A4PS_CURATOR__ENABLED": "false", "A4PS_MOTIVATOR__ENABLED": "false",
               "A4PS_PHILOSOPHER__ENABLED": "false", "A4PS_FORGE__ENABLED": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.extra_env}
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:
            args = ["--grace", str(grace_s)] if grace_s is not None else []
            proc = subprocess.Popen([sys.executable, "-m", "a4ps", "daemon", *args],
                                    cwd=PROJECT_ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)
        settings = load_settings(data_dir=data_dir)
        settings.bus.command_addr, settings.bus.event_addr = cmd_addr, ev_addr
        d = DaemonProc(name, data_dir, env, proc, log_path, settings)
        self.daemons.append(d)
        return d

    def queue(self, worker_name: str = "observer") -> Any:
        """A queue connection of the test's own (to submit, watch and count)."""
        from a4ps.tasks_postgres import PostgresTaskQueue
        return PostgresTaskQueue(self.pg_dsn, worker_name=worker_name)

    def running_on(self, name: str) -> list[str]:
        """Ids of the tasks the daemon ``name`` is running now."""
        import psycopg
        with psycopg.connect(self.pg_dsn, autocommit=True) as c:
            return [r[0] for r in c.execute(
                "SELECT t.id FROM a4ps_tasks t JOIN a4ps_task_workers w ON t.owner = w.id "
                "WHERE t.status = 'running' AND w.name = %s", (name,))]

    def close(self) -> None:
        for d in self.daemons:
            d.kill()
