"""CLI commands that move the living image through time or between machines:
``a4ps image list | diff SNAP [SNAP2] | restore SNAP | snapshot NAME`` and
``a4ps persona export NAME -o FILE | import FILE [--as NEWNAME]``.

With a daemon running they ask it (``image.*``, ``persona.*``: the daemon owns the
image); otherwise they work on ``data/`` directly, under the daemon's lock for anything
that writes. Registered by :func:`add_commands` from :func:`a4ps.cli.build_parser`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import difflib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from a4ps.client import DaemonClient, DaemonError, DaemonUnavailable
from a4ps.events import EventBus
from a4ps.image import ImageStore
from a4ps.offline import DaemonBusy, offline_system
from a4ps.persona_file_errors import PersonaFileError
from a4ps.snapshot_errors import SnapshotError
from a4ps.snapshots import TimeMachine

if TYPE_CHECKING:
    from .config import Settings

_NO_DAEMON = object()


class _Refused(Exception):
    """The daemon (or the local part) refused; the message is for the user."""


def _via_daemon(settings: Settings, cmd: str, args: dict[str, Any], timeout: float, *,
                progress_topic: str | None = None) -> Any:
    """The daemon's result, or ``_NO_DAEMON`` when none answers. With
    ``progress_topic``, that topic's events are shown while the command runs."""
    client = DaemonClient.if_running(settings, timeout=timeout)
    if client is None:
        return _NO_DAEMON

    def show(topic: str, payload: dict[str, Any]) -> None:
        if topic == progress_topic:
            _show_progress(payload.get("stage", ""), payload.get("done", 0),
                           payload.get("total", 0))
    with client:
        try:
            if progress_topic is None:
                return client.request(cmd, args, timeout=timeout)
            return client.request_watching(cmd, args, show, topics=[progress_topic],
                                           timeout=timeout)
        except DaemonError as e:
            raise _Refused(e.message) from None
        except DaemonUnavailable as e:
            raise _Refused(f"the daemon stopped answering ({e}); check `a4ps status`") from None


def _show_progress(stage: str, done: int, total: int) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    end = "\n" if done >= total else ""
    print(f"\r{stage}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end,
          file=sys.stderr, flush=True)


def _reader(settings: Settings) -> Any:
    """A read-only TimeMachine on the image files (list and diff need no System)."""
    store = ImageStore.from_settings(settings)

    def live() -> dict[str, Any]:
        loaded = store.load()
        if loaded is None:
            raise SnapshotError(f"no image in {settings.data_dir} yet: start A4PS once")
        return loaded[0]

    def read_only(*_a: Any, **_k: Any) -> Any:
        raise SnapshotError("this view of the image is read-only")
    return TimeMachine(store, EventBus(), live_parts=live, save=read_only, apply=read_only)


def _local(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except SnapshotError as e:
        raise _Refused(str(e)) from None


def _when(ts: Any) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "?"


def _size(n: Any) -> str:
    n = int(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- image ---------------------------------------------------------------------------

def _cmd_image_list(args: argparse.Namespace, settings: Settings) -> int:
    out = _via_daemon(settings, "image.snapshots", {}, args.timeout)
    snaps = out["snapshots"] if out is not _NO_DAEMON else _local(_reader(settings).list)
    if args.json:
        print(json.dumps(snaps, indent=2, default=str))
        return 0
    if not snaps:
        print(f"no snapshots in {settings.data_dir} yet")
        return 0
    print(f"{'id':<20} {'saved':<19} {'gen':>5} {'trigger':<13} {'size':>10}  summary")
    for s in snaps:
        label = f"[{s['name']}] " if s.get("name") else ""
        print(f"{s['id']:<20} {_when(s.get('ts')):<19} {s.get('generation') or '-':>5} "
              f"{s.get('trigger') or '?':<13} {_size(s.get('size')):>10}  {label}"
              f"{s.get('summary') or ''}")
    print("\n`a4ps image diff ID` compares one with the live image; `a4ps image restore ID` "
          "makes it live (ids may be shortened to their last digits, or use a name)")
    return 0


def _short(value: Any, width: int = 70) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def print_diff(d: dict[str, Any], label_before: str, label_after: str, out: Any = None) -> None:
    out = out or sys.stdout
    protos = d.get("protos") or {}
    nothing = True
    for name in protos.get("added") or []:
        print(f"+ proto {name}", file=out)
        nothing = False
    for name in protos.get("removed") or []:
        print(f"- proto {name}", file=out)
        nothing = False
    for name, ch in (protos.get("changed") or {}).items():
        nothing = False
        print(f"~ proto {name}", file=out)
        if ch.get("parent"):
            print(f"    parent: {ch['parent']['before']} -> {ch['parent']['after']}", file=out)
        for slot, ba in (ch.get("slots") or {}).items():
            print(f"    slot {slot}: {_short(ba['before'])} -> {_short(ba['after'])}", file=out)
        for meth, ba in (ch.get("methods") or {}).items():
            print(f"    method {meth}:", file=out)
            for line in difflib.unified_diff((ba.get("before") or "").splitlines(),
                                             (ba.get("after") or "").splitlines(),
                                             label_before, label_after, lineterm=""):
                print(f"      {line}", file=out)
    codex = d.get("codex") or {}
    if codex.get("before_version") != codex.get("after_version") or codex.get("changed"):
        nothing = False
        print(f"codex v{codex.get('before_version')} -> v{codex.get('after_version')}", file=out)
        for c in codex.get("changed") or []:
            print(f"    {c['persona']}.{c['principle']}: {_short(c.get('before'))} -> "
                  f"{_short(c.get('after'))}", file=out)
    tools = d.get("tools") or {}
    if tools.get("added") or tools.get("removed"):
        nothing = False
        print("tools: " + " ".join([f"+{t}" for t in tools.get("added") or []] +
                                   [f"-{t}" for t in tools.get("removed") or []]), file=out)
    if nothing:
        print(f"no differences between {label_before} and {label_after}", file=out)


def _cmd_image_diff(args: argparse.Namespace, settings: Settings) -> int:
    wire = {"snapshot": args.snapshot, "against": args.against}
    d = _via_daemon(settings, "image.diff", wire, args.timeout)
    if d is _NO_DAEMON:
        d = _local(_reader(settings).diff, args.snapshot, args.against)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        print_diff(d, f"snapshot {args.snapshot}",
                   f"snapshot {args.against}" if args.against else "live")
    return 0


def _cmd_image_restore(args: argparse.Namespace, settings: Settings) -> int:
    timeout = settings.image.restore_wait_s + 60
    out = _via_daemon(settings, "image.restore", {"snapshot": args.snapshot}, timeout)
    where = "the running daemon"
    if out is _NO_DAEMON:
        where = str(settings.data_dir)
        with offline_system(settings, f"image restore {args.snapshot}") as system:
            out = _local(system.timemachine.restore, args.snapshot)
    print(f"restored snapshot {out['restored']} in {where}")
    print(f"the state before is snapshot {out['pre_restore']}: "
          f"`a4ps image restore {out['pre_restore']}` undoes this")
    return 0


def _cmd_image_snapshot(args: argparse.Namespace, settings: Settings) -> int:
    out = _via_daemon(settings, "image.snapshot", {"name": args.name}, args.timeout)
    if out is _NO_DAEMON:
        with offline_system(settings, f"image snapshot {args.name}") as system:
            out = _local(system.timemachine.snapshot, args.name)
    print(f"snapshot {out['id']} named {args.name!r} (kept until you delete it)")
    return 0


# -- persona -------------------------------------------------------------------------

def _persona_local(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except PersonaFileError as e:
        raise _Refused(str(e)) from None


def _cmd_persona_export(args: argparse.Namespace, settings: Settings) -> int:
    path = str(Path(args.output).expanduser().resolve())
    wire = {"name": args.name, "path": path, "golden": args.golden, "overwrite": args.force}
    out = _via_daemon(settings, "persona.export", wire, args.timeout)
    if out is _NO_DAEMON:
        with offline_system(settings, "persona export") as system:
            out = _persona_local(system.personas.export, args.name, path, golden=args.golden,
                                 overwrite=args.force)
    print(f"exported {out['persona']} to {out['path']} ({_size(out['bytes'])}): "
          f"{out['memories']} memories, {'an adapter' if out['adapter'] else 'no adapter'}"
          + (f", {out['golden']} golden rows" if args.golden else ""))
    return 0


def _cmd_persona_import(args: argparse.Namespace, settings: Settings) -> int:
    path = str(Path(args.file).expanduser().resolve())
    wire = {"path": path, "as": args.as_name}
    out = _via_daemon(settings, "persona.import", wire, args.timeout,
                      progress_topic="persona.progress")
    if out is _NO_DAEMON:
        with offline_system(settings, "persona import") as system:
            out = _persona_local(system.personas.import_, path, as_name=args.as_name,
                                 progress=_show_progress)
    print(f"imported {out['from_persona']} as {out['persona']}: {out['memories']} memories"
          + (" (re-embedded with this system's embedder)" if out["reembedded"] else "")
          + (f", adapter {out['adapter']}" if out.get("adapter") else "")
          + (f", golden data in {out['golden']}" if out.get("golden") else ""))
    print(f"{out['persona']} uses {out['model_name']}")
    return 0


Command = Callable[[argparse.Namespace, Any], int]


def _guard(fn: Command) -> Command:
    """Print a refusal as one line and exit 1 (never a traceback for bad input)."""
    def run(args: argparse.Namespace, settings: Settings) -> int:
        try:
            return fn(args, settings)
        except (_Refused, DaemonBusy) as e:
            print(f"a4ps {args.command}: {e}", file=sys.stderr)
            return 1
    return run


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("image", help="the living image's snapshots: list, diff, restore, snapshot")
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    q = isub.add_parser("list", help="every snapshot, newest first, with what changed")
    q.set_defaults(func=_guard(_cmd_image_list))
    q.add_argument("--json", action="store_true")
    q = isub.add_parser("diff", help="protos, slots, methods, codex and tools between two states")
    q.set_defaults(func=_guard(_cmd_image_diff))
    q.add_argument("snapshot", help="a snapshot id (or its last digits) or name")
    q.add_argument("against", nargs="?", help="another snapshot (default: the live image)")
    q.add_argument("--json", action="store_true")
    q = isub.add_parser("restore", help="make a snapshot live (the state before is kept)")
    q.set_defaults(func=_guard(_cmd_image_restore))
    q.add_argument("snapshot", help="a snapshot id (or its last digits) or name")
    q = isub.add_parser("snapshot", help="take a named snapshot that is never pruned")
    q.set_defaults(func=_guard(_cmd_image_snapshot))
    q.add_argument("name", help="letters, digits, '_', '-', '.'")
    for q in isub.choices.values():
        q.add_argument("--timeout", type=float, default=30.0,
                       help="seconds to wait for the daemon's answer")

    p = sub.add_parser("persona", help="a persona as one portable file: export, import")
    psub = p.add_subparsers(dest="persona_command", metavar="SUBCOMMAND", required=True)
    q = psub.add_parser("export", help="write a persona (proto, codex, memories, adapter) to a file")
    q.set_defaults(func=_guard(_cmd_persona_export))
    q.add_argument("name", help="the persona, e.g. BRICK")
    q.add_argument("-o", "--output", required=True, help="the file to write (e.g. brick.a4persona)")
    q.add_argument("--golden", action="store_true", help="include its golden data")
    q.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    q.add_argument("--timeout", type=float, default=600.0)
    q = psub.add_parser("import", help="check a persona file completely, then add the persona")
    q.set_defaults(func=_guard(_cmd_persona_import))
    q.add_argument("file")
    q.add_argument("--as", dest="as_name", metavar="NEWNAME",
                   help="import under another name (needed when the name is taken)")
    q.add_argument("--timeout", type=float, default=3600.0)
