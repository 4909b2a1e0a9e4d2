"""`infinitetalk daemon`: placeholder until its owner lands it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("daemon", help="foreground service (systemd notify protocol) (not yet implemented)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("infinitetalk daemon: not implemented yet")
