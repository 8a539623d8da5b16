"""CLI commands of self-improvement: ``a4ps curate``, ``a4ps finetune PERSONA``,
``a4ps models lineage PERSONA``, ``a4ps models rollback PERSONA``.

With a daemon running they ask it (``curator.run``, ``finetune.run``,
``models.lineage``, ``models.rollback``) and print its progress events; otherwise they
work on the living image directly under the daemon's lock. Registered by
:func:`add_commands` from :func:`a4ps.cli.build_parser`; heavy imports stay inside the
commands.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..client import DaemonClient, DaemonError, DaemonUnavailable
from ..offline import DaemonBusy, offline_system
from .errors import FinetuneError

if TYPE_CHECKING:
    from ..config import Settings

_NO_DAEMON = object()


def _via_daemon(settings: Settings, cmd: str, args: dict[str, Any], *, timeout: float,
                on_event: Callable[[str, dict[str, Any]], None] | None = None) -> Any:
    """The daemon's result for ``cmd``, or ``_NO_DAEMON`` when none answers.

    While a long command runs, ``on_event`` gets the daemon's events (progress)."""
    client = DaemonClient.if_running(settings, timeout=timeout)
    if client is None:
        return _NO_DAEMON
    with client:
        try:
            return client.request_watching(cmd, args, on_event, timeout=timeout)
        except (DaemonError, DaemonUnavailable) as e:
            raise SystemExit(f"a4ps: the daemon refused {cmd}: {e}") from None


@contextlib.contextmanager
def _offline_system(settings: Settings, what: str) -> Iterator[Any]:
    """:func:`a4ps.offline.offline_system`, a busy daemon ending the command with its
    message (exit 1) as these commands always have."""
    try:
        with offline_system(settings, what) as system:
            yield system
    except DaemonBusy as e:
        raise SystemExit(f"a4ps {what}: {e}") from None


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _set_line(label: str, e: dict[str, Any] | None) -> str:
    if not e:
        return f"{label:22}-"
    ci = (f"  gain {100 * e['gain']:+.1f}% (95% CI {100 * e['ci_low']:+.1f}%..{100 * e['ci_high']:+.1f}%)"
          if e.get("gain") is not None else "")
    return (f"{label:22}{_fmt(e.get('current_mean')):>12}{_fmt(e.get('new_mean')):>12}"
            f"  n={e.get('n')}{ci}")


def _print_comparison(r: dict[str, Any]) -> None:
    c = r.get("comparison") or {}
    print(f"persona {r['persona']}  version v{r.get('version')}  backend {r.get('backend') or '-'}"
          f"  steps {r.get('steps')}  {r.get('seconds')}s")
    if r.get("ok"):
        print(f"trained on {r.get('train_size')} rows"
              + (f" ({r['leaked']} dropped: they are evaluation items)" if r.get("leaked") else "")
              + f"; train loss {_fmt(r.get('first_loss'))} -> {_fmt(r.get('last_loss'))}   "
              f"adapter {r.get('adapter_dir')} ({(r.get('adapter_bytes') or 0) / 1e6:.1f} MB)")
    if c:
        print(f"{'answer loss':22}{'current':>12}{'candidate':>12}")
        print(_set_line("held-out rows", c.get("heldout")))
        print(_set_line("capability suite", c.get("suite")))
        if c.get("judge"):
            j = c["judge"]
            print(f"{'ALFRED score':22}{_fmt(j.get('current_mean'), 2):>12}"
                  f"{_fmt(j.get('new_mean'), 2):>12}  {j.get('scored')}/{j.get('asked')} pairs scored")
        for chk in c.get("checks") or []:
            print(f"  [{'pass' if chk['passed'] else 'FAIL'}] {chk['check']}: {chk['detail']}")
        print(f"models: {c.get('current_model')}  vs  {c.get('candidate_model')}")
    if r.get("stages"):
        print("wall time: " + ", ".join(f"{k} {v}s" for k, v in r["stages"].items() if v is not None))
    print(("SWAPPED: " if r.get("swapped") else "NOT SWAPPED: ") + str(r.get("reason")))


def _cmd_curate(args: argparse.Namespace, settings: Settings) -> int:
    report = _via_daemon(settings, "curator.run", {"finetune": not args.no_finetune},
                         timeout=settings.finetune.timeout_s, on_event=_progress_event)
    if report is _NO_DAEMON:
        with _offline_system(settings, "curate") as system:
            report = system.curator.run_once(finetune=not args.no_finetune).to_dict()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    scored = report.get("scored") or []
    if not scored:
        print(report.get("note") or "nothing to curate")
    for s in scored:
        if s.get("skipped"):
            mark, err = "skipped", f": {s['skipped']}"
        else:
            mark = (f"kept ({s.get('route')})" if s.get("kept")
                    else ("no score" if s.get("error") else "not kept"))
            why = s.get("error") or (None if s.get("kept") else s.get("reason"))
            err = f": {why}" if why else ""
        print(f"{str(s.get('memory_id'))[:12]:12}  task {str(s.get('task_id'))[:14]:14}  "
              f"score {_fmt(s.get('score'), 2):>4}  vote {s.get('vote') or '-':5}  {mark}{err}")
    print(f"added {report.get('added')} to train, {report.get('held_out', 0)} held out; golden set "
          f"{report.get('dataset_size')}/{settings.curator.trigger_size}; eval set "
          f"{report.get('eval_size', 0)}; votes {report.get('votes')}")
    if report.get("triggered"):
        print(f"fine-tune triggered for {report.get('persona')}; dataset archived to "
              f"{report.get('archived_to')}")
        if report.get("finetune"):
            _print_comparison(report["finetune"])
    elif report.get("note") and scored:
        print(report["note"])
    return 0


def _cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    persona = args.persona.upper()
    request = {"persona": persona, "steps": args.steps,
               "dataset": str(Path(args.dataset).resolve()) if args.dataset else None,
               "heldout": str(Path(args.heldout).resolve()) if args.heldout else None}
    result = _via_daemon(settings, "finetune.run", request,
                         timeout=settings.finetune.timeout_s + 120, on_event=_progress_event)
    if result is not _NO_DAEMON:
        print()
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            _print_comparison(result)
        return 0 if result.get("ok") else 1
    with _offline_system(settings, "finetune") as system:
        dataset = Path(args.dataset) if args.dataset else system.curator.golden_path
        if not dataset.exists():
            print(f"a4ps finetune: no dataset at {dataset}; run `a4ps curate` until the golden "
                  f"set has samples, or pass --dataset FILE.jsonl", file=sys.stderr)
            return 2
        unsub = system.bus.subscribe("finetune.progress", lambda e: _progress(e.payload))
        try:
            report = system.finetuner.finetune(persona, dataset, steps=args.steps,
                                               heldout_path=args.heldout)
        finally:
            unsub()
    print()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _print_comparison(report.to_dict())
    return 0 if report.ok else 1


def _progress_event(topic: str, payload: dict[str, Any]) -> None:
    if topic == "finetune.progress":
        _progress(payload)


def _progress(p: dict[str, Any]) -> None:
    if p.get("stage") == "loading":
        print("loading the base model and the training stack", flush=True)
    elif p.get("stage") == "training":
        print(f"training with {p.get('backend')} ({p.get('why')})", flush=True)
    elif p.get("stage") == "gate":
        print(f"\ngate: {'passed' if p.get('passed') else 'refused'}", flush=True)
    elif str(p.get("stage") or "").startswith("eval_"):
        print(f"\nevaluating the {p['stage'][5:]} model: loss {_fmt(p.get('loss'))}", flush=True)
    elif p.get("loss") is not None and not p.get("stage"):
        print(f"\rstep {p.get('step')}/{p.get('max_steps')}  loss {p['loss']:.4f}", end="", flush=True)


def _cmd_lineage(args: argparse.Namespace, settings: Settings) -> int:
    persona = args.persona.upper()
    view = _via_daemon(settings, "models.lineage", {"persona": persona}, timeout=10)
    if view is not _NO_DAEMON:
        current, lineage = view["model_name"], view["lineage"]
    else:
        with _offline_system(settings, "models lineage") as system:
            if persona not in system.protos:
                print(f"a4ps models lineage: no persona {persona!r}", file=sys.stderr)
                return 2
            current = system.protos.get(persona).get("model_name")
            lineage = system.finetuner.lineage(persona)
    if args.json:
        print(json.dumps({"persona": persona, "model_name": current, "lineage": lineage},
                         indent=2, default=str))
        return 0
    print(f"{persona} uses {current}")
    if not lineage:
        print("no fine-tuned versions yet")
    for e in lineage:
        s = e.get("scores") or {}
        h = s.get("heldout") or {}
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.get("created_at") or 0))
        gain = (f"held-out {100 * h['gain']:+.1f}% [{100 * h['ci_low']:+.1f}..{100 * h['ci_high']:+.1f}]"
                if h.get("gain") is not None else "held-out -")
        print(f"  v{e.get('version'):<3} {e.get('status', '?'):12} {when}  data {e.get('dataset_size', '-'):>4}"
              f"  {gain}  judge {_fmt(s.get('judge_current'), 2)} -> {_fmt(s.get('judge_new'), 2)}"
              f"  {e.get('model_name')}")
        if s.get("reason"):
            print(f"       {s['reason']}")
    return 0


def _cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    persona = args.persona.upper()
    out = _via_daemon(settings, "models.rollback", {"persona": persona}, timeout=30)
    if out is _NO_DAEMON:
        with _offline_system(settings, "models rollback") as system:
            try:
                out = system.finetuner.rollback(persona)
            except FinetuneError as e:
                print(f"a4ps models rollback: {e}", file=sys.stderr)
                return 1
    print(f"{persona}: {out['from']} -> {out['to']} (v{out['version']})")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("curate", help="one curation pass now: ALFRED scores new interactions")
    p.set_defaults(func=_cmd_curate)
    p.add_argument("--no-finetune", action="store_true",
                   help="don't start a fine-tune even if the golden set reached the trigger size")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("finetune", help="fine-tune a persona now: train, gate, swap")
    p.set_defaults(func=_cmd_finetune)
    p.add_argument("persona", help="ALFRED, BRICK or ROBIN")
    p.add_argument("--steps", type=int, default=None, help="training steps (default finetune.max_steps)")
    p.add_argument("--dataset", help="a golden-set JSONL (default: the current golden set)")
    p.add_argument("--heldout", help="a JSONL of held-out rows to judge the candidate on, besides "
                                     "the curator's eval set (never trained on)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("models", help="persona model versions: lineage, rollback")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    q = msub.add_parser("lineage", help="a persona's model versions and their scores")
    q.set_defaults(func=_cmd_lineage)
    q.add_argument("persona")
    q.add_argument("--json", action="store_true")
    q = msub.add_parser("rollback", help="make the previous version live again")
    q.set_defaults(func=_cmd_rollback)
    q.add_argument("persona")
