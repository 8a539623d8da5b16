"""CLI commands of the tools part: ``a4ps sandbox run``, ``a4ps tools list|show``.

Registered by :func:`add_commands` from :func:`a4ps.cli.build_parser`; imports stay
inside the commands so ``a4ps --help`` stays instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from a4ps.image import ImageStore
from a4ps.proto import ProtoManager
from a4ps.tools.registry import ToolNotFound, ToolRegistry, _s
from a4ps.tools.sandbox import SandboxError, SandboxUnavailable, make_sandbox

if TYPE_CHECKING:
    from ..config import Settings


def _cmd_sandbox_run(args: argparse.Namespace, settings: Settings) -> int:
    """Run a script in exactly the sandbox the forge uses; print what happened."""
    from pathlib import Path

    path = Path(args.file)
    try:
        code = path.read_text(encoding="utf-8")
    except OSError as e:
        print(f"a4ps sandbox run: cannot read {path}: {e}", file=sys.stderr)
        return 2
    sandbox = make_sandbox(settings)
    try:   # no probe first: the run itself says whether the sandbox starts (one container)
        res = sandbox.run(code, timeout=args.timeout)
    except SandboxUnavailable as e:
        print(str(e), file=sys.stderr)
        return 3
    except SandboxError as e:
        print(f"sandbox error: {e}", file=sys.stderr)
        return 3
    finally:
        sandbox.close()
    if args.json:
        print(json.dumps(res.model_dump(), indent=2))
    else:
        print("--- stdout ---")
        print(res.stdout, end="" if res.stdout.endswith("\n") or not res.stdout else "\n")
        print("--- stderr ---")
        print(res.stderr, end="" if res.stderr.endswith("\n") or not res.stderr else "\n")
        print("---")
        cpu = "?" if res.cpu_s is None else f"{res.cpu_s:.2f}s"
        print(f"exit status: {res.exit_code}" + (f" (signal {res.signal})" if res.signal else ""))
        print(f"timed out: {'yes' if res.timed_out else 'no'}")
        print(f"limit hit: {res.limit_hit or 'none'}")
        disk = "?" if res.disk_used_bytes is None else f"{res.disk_used_bytes / 1024:.0f} kB"
        sandbox_cpu = "" if res.sandbox_cpu_s is None else f" (sandbox {res.sandbox_cpu_s:.2f}s)"
        print(f"wall: {res.wall_s:.2f}s  cpu: {cpu}{sandbox_cpu}  max rss: {res.max_rss_kb or '?'} kB  "
              f"disk: {disk}  backend: {res.backend}")
    if res.exit_code is None:
        return 1
    return res.exit_code if 0 <= res.exit_code < 256 else 1


def _offline_registry(settings: Settings) -> ToolRegistry:
    """A read-only registry over the saved image (no daemon, no sandbox needed)."""

    protos = ProtoManager()
    loaded = ImageStore.from_settings(settings).load()
    if loaded is not None:
        protos.restore_image(loaded[0]["protos"])
    return ToolRegistry(protos, settings, None)


def _cmd_tools_list(args: argparse.Namespace, settings: Settings) -> int:
    tools = _offline_registry(settings).list()
    if args.json:
        print(json.dumps(tools, indent=2, default=str))
        return 0
    if not tools:
        print(f"no tools forged yet (image: {settings.image_path})")
        return 0
    for t in tools:
        tests = f"{t['tests_passed']}/{t['tests_total']} tests" if t["tests_total"] else "no tests"
        print(f"{t['signature']}  v{t['version']}  by {t['created_by']}  ({tests})")
        print(f"    {t['description']}")
    return 0


def _cmd_tools_show(args: argparse.Namespace, settings: Settings) -> int:
    reg = _offline_registry(settings)
    try:
        proto = reg.get_version(args.name, args.version) if args.version else reg.get(args.name)
    except (ToolNotFound, ValueError) as e:
        print(f"a4ps tools show: {e}", file=sys.stderr)
        return 1
    info = {**reg.describe(proto), "version": _s(proto, "version"),
            "source": _s(proto, "source"), "tests": _s(proto, "tests"),
            "test_results": _s(proto, "test_results")}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['signature']}  v{info['version']} (versions {info['versions']})  "
          f"by {info['created_by']}")
    print(info["description"])
    res = info["test_results"] or {}
    if res:
        print(f"tests: {res.get('passed')}/{res.get('total')} passed")
    print("--- source ---")
    print((info["source"] or "").rstrip())
    print("--- tests ---")
    print((info["tests"] or "(none)").rstrip())
    return 0


def add_commands(sub: Any) -> None:
    """Register ``sandbox run`` and ``tools list|show`` on the CLI's subparsers."""
    p = sub.add_parser("sandbox", help="the gVisor sandbox forged tools run in")
    ssub = p.add_subparsers(dest="sandbox_command", metavar="SUBCOMMAND", required=True)
    p = ssub.add_parser("run", help="run a Python file in the sandbox and print the result")
    p.set_defaults(func=_cmd_sandbox_run)
    p.add_argument("file", help="the Python script")
    p.add_argument("--timeout", type=float, default=None,
                   help="wall-clock seconds (default: sandbox.wall_time_s)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("tools", help="forged tools in the live image")
    tsub = p.add_subparsers(dest="tools_command", metavar="SUBCOMMAND", required=True)
    p = tsub.add_parser("list", help="every tool's current version")
    p.set_defaults(func=_cmd_tools_list)
    p.add_argument("--json", action="store_true")
    p = tsub.add_parser("show", help="one tool: signature, source, tests, results")
    p.set_defaults(func=_cmd_tools_show)
    p.add_argument("name")
    p.add_argument("--version", type=int, help="an older version")
    p.add_argument("--json", action="store_true")
