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
import re
import signal
from pathlib import Path
from typing import Any

from a4ps.config import PERSONAS, PROJECT_ROOT
from a4ps.models.scripted import demo_reply, example_of
from daemon_process import DaemonProcess

MODEL = "standin-model"
_JOB = re.compile(r"job-\d+")


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


class Deployment:
    """Start daemons sharing ``pg_dsn`` and the inference server at ``inference_url``."""

    def __init__(self, root: Path, pg_dsn: str, inference_url: str, *,
                 max_rounds: int = 1, env: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.pg_dsn = pg_dsn
        self.inference_url = inference_url
        self.max_rounds = max_rounds
        self.extra_env = dict(env or {})
        self.daemons: list[DaemonProcess] = []

    def start_daemon(self, name: str, *, grace_s: float | None = None) -> DaemonProcess:
        """Spawn daemon ``name`` (call ``wait_ready``) through the one shared helper."""
        env = {"PYTHONPATH": str(PROJECT_ROOT),
               "A4PS_MODELS__BACKEND": "openai",
               "A4PS_MODELS__OPENAI__BASE_URL": self.inference_url,
               "A4PS_MODELS__OPENAI__API_KEY": name,
               "A4PS_MODELS__OPENAI__MAX_RETRIES": "0",
               "A4PS_MODELS__OPENAI_PERSONAS": json.dumps({p: MODEL for p in PERSONAS}),
               "A4PS_TASKS__QUEUE": self.pg_dsn, "A4PS_TASKS__WORKER_NAME": name,
               "A4PS_COGNITION__CHECKPOINTER": self.pg_dsn,
               "A4PS_COGNITION__MAX_ROUNDS": str(self.max_rounds),
               "A4PS_FORGE__ENABLED": "false", **self.extra_env}
        d = DaemonProcess(self.root / name, grace=20.0 if grace_s is None else grace_s,
                          services=False, embeddings="hash", env=env,
                          preexec_fn=_die_with_parent).spawn()
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
