"""`python -m a4ps COMMAND` / `a4ps COMMAND`: the command line.

Each command is a small function taking (args, settings); heavy parts are imported
inside it so `a4ps --help` stays instant. Subcommands are grouped by the part they
drive; add a new one by writing ``_cmd_x`` and registering it in :func:`build_parser`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .config import Settings, SettingsError, load_settings


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from .client import DaemonClient, DaemonUnavailable
    try:
        with DaemonClient.from_settings(settings) as client:
            status = client.request("system.status", {}, timeout=args.timeout)
    except DaemonUnavailable as e:
        print(f"daemon: not running ({e})")
        return 1
    import json
    print(json.dumps(status, indent=2, default=str))
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

    return parser


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
