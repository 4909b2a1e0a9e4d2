"""`infinitetalk bench`: placeholder until its owner lands it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("bench", help="GPU benchmark with random full-size weights (not yet implemented)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("infinitetalk bench: not implemented yet")
