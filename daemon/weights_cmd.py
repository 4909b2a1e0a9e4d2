"""`infinitetalk weights`: placeholder until its owner lands it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("weights", help="write, check or download weights (not yet implemented)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("infinitetalk weights: not implemented yet")
