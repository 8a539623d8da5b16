"""`python -m a4ps COMMAND` / `a4ps COMMAND`: the command line.

Each command is a small function taking (args, settings); heavy parts are imported
inside it so `a4ps --help` stays instant. Subcommands are grouped by the part they
drive; add a new one by writing ``_cmd_x`` and registering it in :func:`build_parser`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Any, Callable, TextIO

from .config import CODEX_PATH, Settings, SettingsError, load_settings
from .models.threads import apply_openmp_policy
from .client import DaemonClient, DaemonError, DaemonUnavailable
from .codex import Codex, CodexError
from .cognition.checkpoints import CheckpointStoreError
from .daemon import Daemon, DaemonError as DaemonStartError
from .fine_tuning.commands import add_commands as add_finetune_commands
from .image import ImageError, ImageStore
from .image_commands import add_commands as add_image_commands
from .lock import DataLock, DataLockHeld, describe_holder
from .offline import DaemonBusy, image_lock
from .tasks import TaskQueueError
from .tasks_postgres import TaskQueueUnavailable
from .tools.commands import add_commands as add_tool_commands
from .ui.launch import run_ui


# _HEAVY: the System, the memory store and the embedders are imported inside the
# commands that build them (the only project imports kept in functions here): they
# pull numpy and every part, and a command that only talks to the daemon (`a4ps
# status`, `a4ps ask`) must start in well under half a second (test_import_cost.py).

def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with DaemonClient.from_settings(settings) as client:
            status = client.request("system.status", {}, timeout=args.timeout)
    except DaemonUnavailable as e:
        print(f"daemon: not running ({e})")
        return 1
    import json
    print(json.dumps(status, indent=2, default=str))
    failure = (status.get("image") or {}).get("save_error") if isinstance(status, dict) else None
    if failure:
        print(f"a4ps status: WARNING the image is not being saved: {failure.get('error')} "
              f"({failure.get('attempts')} attempts; {failure.get('hint')})", file=sys.stderr)
    return 0


def _cmd_ui(args: argparse.Namespace, settings: Settings) -> int:
    return run_ui(settings, stop_daemon_on_exit=args.stop_daemon_on_exit,
                  start=not args.no_start, config_path=args.config)


def _cmd_daemon(args: argparse.Namespace, settings: Settings) -> int:
    try:
        lock = DataLock.for_data_dir(settings.data_dir).acquire(   # refuse fast
            kind="daemon", command_addr=settings.bus.command_addr,
            event_addr=settings.bus.event_addr)
    except DataLockHeld as e:
        print(f"a4ps daemon: {e}", file=sys.stderr)
        return 1
    # a store named in the settings that cannot be used (docs/scaling.md): say which
    from .memory import MemoryStoreError       # (see _HEAVY)
    from .system import System
    stores = (TaskQueueUnavailable, CheckpointStoreError, MemoryStoreError)
    try:
        system = System(settings, lock=lock)
    except stores as e:
        lock.release()
        print(f"a4ps daemon: {e}", file=sys.stderr)
        return 1
    except BaseException:
        lock.release()
        raise
    try:
        return Daemon(system, lock=lock, shutdown_grace_s=args.grace,
                      from_snapshot=args.from_snapshot).run()
    except (DaemonStartError, *stores) as e:
        print(f"a4ps daemon: {e}", file=sys.stderr)
        return 1
    finally:
        lock.release()


# -- ask / memory (the cognitive core) ----------------------------------------------

def _say(out: TextIO, who: str, text: str) -> None:
    import textwrap
    lines = textwrap.wrap(text, 100) or [""]
    print(f"{who:<18}{lines[0]}", file=out)
    for line in lines[1:]:
        print(f"{'':<18}{line}", file=out)


def _print_step(p: dict[str, Any], out: TextIO | None = None) -> None:
    """One ``task.step`` as a transcript line: persona, round, dissonance, text."""
    out = out or sys.stdout
    node, rnd, d = p.get("node"), p.get("round"), p.get("dissonance")
    if node == "alfred_route":
        _say(out, "ALFRED", f"route: {p.get('text')} ({p.get('reason') or ''})")
    elif node == "recall":
        _say(out, "memory", f"{p.get('memories', 0) or 0} memories recalled")
    elif node in ("brick", "robin"):
        _say(out, f"{p.get('persona')} [round {rnd}]", p.get("text") or "(no usable reply)")
    elif node == "measure":
        shown = "n/a" if d is None else f"{d:.3f}"
        _say(out, f"dissonance [{rnd}]", shown + (f"  -> {p['stop']}" if p.get("stop") else ""))
    elif node in ("tool_request", "forge"):
        _say(out, "forge", p.get("text") or "")
    elif node == "remember" and p.get("memory_id"):
        _say(out, "memory", f"remembered as {p['memory_id']}")
    if p.get("problem"):
        _say(out, "  ! problem", p["problem"])


class _Transcript:
    """What `a4ps ask` prints while a task runs: each persona's words as they are
    generated (``task.token`` deltas, in ``seq`` order), then the step summaries.

    A turn whose tokens were streamed is not printed again when its ``task.step``
    arrives (only a problem it reports is); a turn that streamed nothing (a backend
    that does not stream, events missed) is printed whole from the step, as before.
    """

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.turn: tuple[Any, ...] | None = None          # (node, persona, round) being streamed
        self.streamed: set[tuple[Any, ...]] = set()
        self.next_seq: dict[str, int] = {}       # task_id -> next seq expected
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def token(self, p: dict[str, Any]) -> None:
        with self._lock:
            task, seq = str(p.get("task_id")), p.get("seq")
            if not isinstance(seq, int):
                self._write(p)
                return
            expected = self.next_seq.setdefault(task, seq)
            if seq < expected:
                return                              # a duplicate
            self.pending.setdefault(task, {})[seq] = p
            while self.next_seq[task] in self.pending[task]:
                self._write(self.pending[task].pop(self.next_seq[task]))
                self.next_seq[task] += 1

    def _write(self, p: dict[str, Any]) -> None:
        key = (p.get("node"), p.get("persona"), p.get("round"))
        if key != self.turn:
            self._end_line()
            who = f"{p.get('persona')} [round {p.get('round')}]" if p.get("round") \
                else str(p.get("persona") or p.get("node") or "")
            self.out.write(f"{who:<18}")
            self.turn = key
            self.streamed.add(key)
        text = str(p.get("text") or "").replace("\n", "\n" + " " * 18)
        self.out.write(text)
        self.out.flush()

    def _end_line(self) -> None:
        if self.turn is not None:
            self.out.write("\n")
            self.out.flush()
            self.turn = None

    def step(self, p: dict[str, Any]) -> None:
        with self._lock:
            self._end_line()
            key = (p.get("node"), p.get("persona"), p.get("round"))
            if key in self.streamed and p.get("node") not in ("alfred_route", "measure"):
                if p.get("problem"):
                    _say(self.out, "  ! problem", p["problem"])
                return
            _print_step(p, self.out)

    def close(self) -> None:
        with self._lock:
            self._end_line()


def _print_result(result: dict[str, Any], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    rounds = result.get("rounds") or []
    if result.get("status") != "ok" or result.get("error"):
        print(f"\ntask {result.get('task_id')} failed: {result.get('error')}", file=out)
        return 1
    fd = result.get("final_dissonance")
    shown = "n/a" if fd is None else f"{fd:.3f}"
    how = (f"{len(rounds)} round(s), final dissonance {shown}" if rounds
           else f"route {result.get('route')}")
    print(f"\nALFRED's answer ({how}):\n{result.get('answer', '')}", file=out)
    return 0


def _ask_local(text: str, args: argparse.Namespace, settings: Settings) -> int:
    import uuid
    view = _Transcript()
    from .system import System                 # (see _HEAVY)
    system = System(settings)
    try:
        system.start(services=False)      # takes the data directory's lock
    except DataLockHeld as e:
        # a second writer would overwrite the image the daemon owns: refuse, and say
        # why the daemon was not reached instead
        holder = e.holder
        where = f"on {settings.bus.command_addr}"
        if holder.get("kind") == "daemon":
            listens = holder.get("command_addr")
            why = (f"it listens on {listens}, not {settings.bus.command_addr}: set "
                   "bus.command_addr (A4PS_BUS__COMMAND_ADDR) to match"
                   if listens and listens != settings.bus.command_addr else
                   f"it did not answer {where}; it may be busy starting or stuck "
                   "(see `a4ps status`)")
            print(f"a4ps ask: {describe_holder(holder)} owns {settings.data_dir}, and {why}. "
                  "Not running in-process: that would be a second writer on its image.",
                  file=sys.stderr)
        else:
            print(f"a4ps ask: {describe_holder(holder)} is using {settings.data_dir}; wait "
                  "for it to finish, or use another data directory (--data-dir)",
                  file=sys.stderr)
        return 1
    try:
        if not args.json:
            system.bus.subscribe("task.token", lambda e: view.token(e.payload))
            system.bus.subscribe("task.step", lambda e: view.step(e.payload))
        result = system.graph.run(f"ask-{uuid.uuid4().hex[:12]}", text, route=args.route)
    finally:
        view.close()
        system.stop()
    if args.json:
        import json
        print(json.dumps(result, indent=2, default=str))
        return 0 if result.get("status") == "ok" else 1
    return _print_result(result)


def _ask_daemon(client: DaemonClient, text: str, args: argparse.Namespace, settings: Settings) -> int:
    import time
    if args.route:
        print("a4ps: --route is ignored by the daemon (ALFRED decides)", file=sys.stderr)
    view = _Transcript()
    with client.subscriber(topics=["task.token", "task.step", "task.done",
                                   "task.failed"]) as events:
        time.sleep(0.3)  # let the SUB socket join before the first step is published
        reply = client.request("task.submit", {"text": text})
        task_id = reply.get("id") if isinstance(reply, dict) else reply
        print(f"submitted task {task_id} to the daemon", file=sys.stderr)
        deadline, next_check = time.monotonic() + args.timeout, time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for ev in events.poll(timeout_ms=200):
                if ev.payload.get("task_id") != task_id:
                    continue
                if ev.topic == "task.token" and not args.json:
                    view.token(ev.payload)
                elif ev.topic == "task.step" and not args.json:
                    view.step(ev.payload)
                elif ev.topic in ("task.done", "task.failed"):
                    view.close()
                    result = ev.payload.get("result") or {
                        "task_id": task_id, "status": "failed", "error": ev.payload.get("error")}
                    return _finish_daemon(result, args)
            if time.monotonic() >= next_check:  # events can be missed; the queue cannot
                next_check = time.monotonic() + 2.0
                try:
                    task = client.request("task.get", {"id": task_id})
                except DaemonError:
                    continue
                if task.get("status") in ("done", "failed", "cancelled"):
                    view.close()
                    result = task.get("result") or {
                        "task_id": task_id, "status": "failed",
                        "error": task.get("error") or task.get("status")}
                    return _finish_daemon(result, args)
    print(f"a4ps: task {task_id} still running after {args.timeout:g}s; it continues in the "
          f"daemon (see `a4ps status`)", file=sys.stderr)
    return 1


def _finish_daemon(result: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        import json
        print(json.dumps(result, indent=2, default=str))
        return 0 if result.get("status") == "ok" else 1
    return _print_result(result)


def _cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    """Run one task: through the daemon if one answers, else in this process (only when
    no daemon holds the data directory: one writer per image)."""
    text = " ".join(args.text).strip()
    if not text:
        print("a4ps ask: say what you want, e.g. a4ps ask \"why is the sky blue?\"", file=sys.stderr)
        return 2
    if not args.local:
        client = DaemonClient.if_running(settings, timeout=10.0)
        if client is not None:
            with client:
                return _ask_daemon(client, text, args, settings)
    return _ask_local(text, args, settings)


def _cmd_memory_search(args: argparse.Namespace, settings: Settings) -> int:
    import datetime as dt
    query = " ".join(args.query).strip()
    if not query:
        print("a4ps memory search: give a query", file=sys.stderr)
        return 2
    try:
        from .memory import MemoryManager          # (see _HEAVY)
        from .models.embeddings import make_embedder
        memory = MemoryManager(settings, make_embedder(settings))
        hits = memory.search(query, k=args.k, kind=args.kind)
    except (ValueError, RuntimeError) as e:
        print(f"a4ps memory search: {e}", file=sys.stderr)
        return 2
    if not hits:
        print(f"nothing remembered about {query!r} (memory at {settings.memory_uri})")
        return 0
    for i, h in enumerate(hits, 1):
        ts = getattr(h, "ts", None)
        when = dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "?"
        d = getattr(h, "dissonance", None)
        head = (f"{i}. {when}  {getattr(h, 'persona', '') or '-'}  task {getattr(h, 'task_id', '') or '-'}"
                + (f"  dissonance {d:.2f}" if isinstance(d, (int, float)) else ""))
        print(head)
        for line in (h.text or "").splitlines():
            print(f"   {line}")
    return 0


# -- codex: show, history, propose (through the daemon when one runs, else the image) ----

def _codex_daemon(settings: Settings, cmd: str, args: dict[str, Any],
                  timeout: float) -> dict[str, Any] | None:
    """The daemon's reply to ``cmd``, or None when no daemon answers (then work in-process)."""
    client = DaemonClient.if_running(settings, timeout=timeout)
    if client is None:
        return None
    with client:
        try:
            reply: dict[str, Any] = client.request(cmd, args, timeout=timeout)
        except DaemonUnavailable:
            return None
        return reply


def _codex_local(settings: Settings) -> tuple[Codex, dict[str, Any], ImageStore]:
    """(codex, parts, store) from the image on disk; the seed codex when there is none."""
    store = ImageStore.from_settings(settings)
    loaded = store.load()
    codex = Codex.from_toml(CODEX_PATH)
    parts: dict[str, Any] = {"protos": {}}
    if loaded is not None:
        parts = loaded[0]
        if "codex" in parts:
            codex.restore_image(parts["codex"])
    return codex, parts, store


def _codex_view(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    try:
        view = _codex_daemon(settings, "codex.get", {}, args.timeout)
    except DaemonError as e:
        raise SystemExit(f"a4ps codex: the daemon refused: {e}")
    if view is None:
        view = _codex_local(settings)[0].to_dict()
    return view


def _diff(old: str | None, new: str | None) -> str:
    import difflib
    return "\n".join(difflib.unified_diff((old or "").splitlines(), (new or "").splitlines(),
                                          "before", "after", lineterm=""))


def _cmd_codex_show(args: argparse.Namespace, settings: Settings) -> int:
    view = _codex_view(args, settings)
    if args.json:
        import json
        print(json.dumps(view, indent=2, default=str))
        return 0
    print(f"codex version {view['version']}")
    for name, p in view["personas"].items():
        print(f"\n{name} ({p.get('role', '')}): {p.get('description', '')}")
        for pid, text in p.get("principles", {}).items():
            print(f"  {pid}: {text}")
    pending = view.get("pending") or []
    print(f"\n{len(pending)} pending amendment(s)" + (":" if pending else ""))
    for a in pending:
        print(f"\n  {a['id']}  {a['persona']}.{a['principle_id']}  (origin {a['origin']}, "
              f"drafted at v{a['base_version']})")
        print(f"  rationale: {a['rationale']}")
        for line in (a.get("diff") or _diff(a.get("current_text"), a.get("proposed_text"))).splitlines():
            print(f"    {line}")
    if pending:
        print("\napprove or reject in the UI, or with `a4ps codex approve ID` / "
              "`a4ps codex reject ID`")
    return 0


def _cmd_codex_history(args: argparse.Namespace, settings: Settings) -> int:
    import datetime as dt
    view = _codex_view(args, settings)
    rows = [{**h, "diff": h.get("diff") or (_diff(h.get("old_text"), h.get("new_text"))
                                           if h.get("new_text") is not None else "")}
            for h in view.get("history", [])]
    if args.json:
        import json
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for h in rows:
        when = dt.datetime.fromtimestamp(h["at"]).strftime("%Y-%m-%d %H:%M:%S") if h.get("at") else "?"
        what = f"  {h['persona']}.{h['principle_id']}" if h.get("persona") else ""
        print(f"v{h['version']}  {when}  by {h.get('by')}{what}: {h.get('reason', '')}")
        for line in h["diff"].splitlines():
            print(f"    {line}")
    return 0


def _cmd_codex_propose(args: argparse.Namespace, settings: Settings) -> int:
    text = " ".join(args.text).strip()
    wire = {"persona": args.persona, "principle_id": args.principle_id,
            "proposed_text": text, "rationale": args.rationale}
    try:
        a = _codex_daemon(settings, "codex.propose", wire, args.timeout)
    except DaemonError as e:
        print(f"a4ps codex propose: refused: {e.message}", file=sys.stderr)
        return 1
    where = "daemon"
    if a is None:
        where = "image"
        try:
            with image_lock(settings, "codex propose"):
                codex, parts, store = _codex_local(settings)
                try:
                    a = codex.propose(args.persona, args.principle_id, text, args.rationale,
                                      origin="user").to_dict()
                except CodexError as e:
                    print(f"a4ps codex propose: refused: {e}", file=sys.stderr)
                    return 1
                store.save({**parts, "codex": codex.image_state()})
        except DaemonBusy as e:
            print(f"a4ps codex propose: {e}", file=sys.stderr)
            return 1
    if isinstance(a, dict) and "amendment" in a and "id" not in a:
        a = a["amendment"]
    print(f"proposed {a['id']} ({where}): {a['persona']}.{a['principle_id']}")
    for line in (a.get("diff") or _diff(a.get("current_text"), a.get("proposed_text"))).splitlines():
        print(f"    {line}")
    print("pending: it takes effect only when a human approves it in the UI")
    return 0


def _match_proposal(pending: list[dict[str, Any]], given: str) -> dict[str, Any] | None:
    """The pending amendment whose id is ``given`` or starts with it (unambiguously)."""
    exact = [a for a in pending if a["id"] == given]
    if exact:
        return exact[0]
    hits = [a for a in pending if a["id"].startswith(given)] if len(given) >= 4 else []
    return hits[0] if len(hits) == 1 else None


def _cmd_codex_decide(args: argparse.Namespace, settings: Settings) -> int:
    """`a4ps codex approve|reject ID`: through the daemon if one runs, else on the image
    under the daemon lock (so no daemon starts on a half-written image)."""
    approve = args.codex_command == "approve"
    verb = "approve" if approve else "reject"
    try:
        view = _codex_daemon(settings, "codex.get", {}, args.timeout)
        if view is not None:
            a = _match_proposal(view.get("pending") or [], args.id)
            if a is None:
                print(f"a4ps codex {verb}: no pending amendment {args.id!r}; "
                      f"`a4ps codex show` lists them", file=sys.stderr)
                return 1
            out = _codex_daemon(settings, "codex.decide",
                                {"proposal_id": a["id"], "version": view["version"],
                                 "approve": approve, "reason": args.reason}, args.timeout)
            if out is not None:
                return _print_decision(out, "daemon")
    except DaemonError as e:
        print(f"a4ps codex {verb}: refused: {e.message}", file=sys.stderr)
        return 1
    try:
        with image_lock(settings, f"codex {verb}"):
            codex, parts, store = _codex_local(settings)
            a = _match_proposal([x.to_dict() for x in codex.pending()], args.id)
            if a is None:
                print(f"a4ps codex {verb}: no pending amendment {args.id!r}; "
                      f"`a4ps codex show` lists them", file=sys.stderr)
                return 1
            try:
                amendment = codex.decide(a["id"], codex.version, approve, by="user",
                                         reason=args.reason or "")
            except CodexError as e:
                print(f"a4ps codex {verb}: refused: {e}", file=sys.stderr)
                return 1
            # the personas' prompts follow the codex when the image is next loaded
            store.save({**parts, "codex": codex.image_state()})
            return _print_decision({**amendment.to_dict(), "codex_version": codex.version},
                                   "image")
    except DaemonBusy as e:
        print(f"a4ps codex {verb}: {e}", file=sys.stderr)
        return 1


def _print_decision(a: dict[str, Any], where: str) -> int:
    print(f"{a['status']} {a['id']} ({where}): {a['persona']}.{a['principle_id']}; "
          f"codex version {a.get('codex_version')}")
    return 0


# -- parser --------------------------------------------------------------------------

Command = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a4ps", description="A4PS / BAT OS living image")
    parser.add_argument("--config", help="settings file (default config/settings.toml)")
    parser.add_argument("--data-dir", help="data directory (overrides settings)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=fn)
        return p

    p = add("status", _cmd_status, "show a running daemon's status")
    p.add_argument("--timeout", type=float, default=5.0)

    # -- more commands are registered below by each part --------------------------

    p = add("ui", _cmd_ui, "the Kivy Morphic client (starts a daemon if none runs)")
    p.add_argument("--stop-daemon-on-exit", action="store_true",
                   help="closing the UI also stops the daemon it started")
    p.add_argument("--no-start", action="store_true",
                   help="don't start a daemon; wait for one to appear")

    p = add("daemon", _cmd_daemon, "run the backend: the living image, tasks, ZeroMQ server")
    p.add_argument("--grace", type=float, default=20.0,
                   help="seconds SIGTERM waits for the running task before checkpointing it")
    p.add_argument("--from-snapshot", metavar="SNAP",
                   help="start from this snapshot (id or name; the state before is kept)")

    p = add("ask", _cmd_ask, "run one task and print the dialogue and ALFRED's answer")
    p.add_argument("text", nargs="+", help="the task")
    p.add_argument("--local", action="store_true",
                   help="run in this process, not through a daemon (refused while a daemon "
                        "owns the data directory)")
    p.add_argument("--route", choices=["contrapunto", "direct", "tool"],
                   help="skip ALFRED's routing (local runs only)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the daemon")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("memory", help="what the system remembers")
    msub = p.add_subparsers(dest="memory_command", metavar="SUBCOMMAND", required=True)
    p = msub.add_parser("search", help="search long-term memory")
    p.set_defaults(func=_cmd_memory_search)
    p.add_argument("query", nargs="+")
    p.add_argument("-k", type=int, default=5, help="how many results")
    p.add_argument("--kind", help="only this kind (interaction, note, reflection)")

    p = sub.add_parser("codex", help="the characterological codex: show, history, propose, "
                                     "approve, reject")
    csub = p.add_subparsers(dest="codex_command", metavar="SUBCOMMAND", required=True)
    p = csub.add_parser("show", help="principles and pending amendments")
    p.set_defaults(func=_cmd_codex_show)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0)
    p = csub.add_parser("history", help="codex versions and their diffs")
    p.set_defaults(func=_cmd_codex_history)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0)
    p = csub.add_parser("propose", help="propose an amendment (pending until a human approves)")
    p.set_defaults(func=_cmd_codex_propose)
    p.add_argument("persona", help="ALFRED, BRICK or ROBIN")
    p.add_argument("principle_id", help="the principle to change, or a new id (letters, digits, _)")
    p.add_argument("text", nargs="+", help="the proposed principle text")
    p.add_argument("--rationale", "-r", required=True, help="why the codex should change")
    p.add_argument("--timeout", type=float, default=5.0)
    for verb, what in (("approve", "apply a pending amendment to the codex"),
                       ("reject", "close a pending amendment (it is never proposed again)")):
        p = csub.add_parser(verb, help=what)
        p.set_defaults(func=_cmd_codex_decide)
        p.add_argument("id", help="the amendment's id (or a unique prefix of it, 4+ characters)")
        p.add_argument("--reason", help="why (kept in the codex history)")
        p.add_argument("--timeout", type=float, default=5.0)

    add_tool_commands(sub)     # sandbox run FILE.py, tools list, tools show NAME

    add_finetune_commands(sub)  # curate, finetune PERSONA, models lineage|rollback PERSONA

    add_image_commands(sub)     # image list|diff|restore|snapshot, persona export|import

    return parser


def main(argv: list[str] | None = None) -> int:
    apply_openmp_policy()     # before anything loads an OpenMP runtime (torch, ctranslate2)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    try:
        settings = load_settings(args.config, **overrides)
    except SettingsError as e:
        print(f"a4ps: {e}", file=sys.stderr)
        return 2
    try:
        return args.func(args, settings) or 0
    except KeyboardInterrupt:
        return 130
    except (ImageError, DataLockHeld, TaskQueueError, OSError) as e:
        # start-up refusals a user can act on: one line naming the files, an exit
        # code (3: the image, 1: the rest), and the traceback only with -v
        if args.verbose:
            raise
        code = 3 if isinstance(e, ImageError) else 1
        print(f"a4ps {args.command}: {_one_line(e)} (exit {code}; -v shows the traceback)",
              file=sys.stderr)
        return code


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
