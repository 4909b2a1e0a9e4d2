"""`infinitetalk install-systemd`: placeholder until its owner lands it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("install-systemd", help="install the systemd units (not yet implemented)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("infinitetalk install-systemd: not implemented yet")
