"""`infinitetalk` command line: one sub-command per module, imported lazily.

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. Command modules import only the standard library at module level, so
`infinitetalk status` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command modules, in the order `--help` lists them
COMMAND_MODULES = (
    "daemon.service",  # daemon
    "dashboard.server",  # dashboard
    "daemon.render_cmd",  # render
    "daemon.commands",  # submit, status, cancel, retry, delete
    "daemon.weights_cmd",  # weights tiny|check|download
    "daemon.bench_cmd",  # bench
    "daemon.install",  # install-systemd
)


class _Version(argparse.Action):
    """`--version`, computed only when asked (the git lookup is a subprocess)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        from daemon.version import version_line

        print(version_line())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinitetalk",
        description="InfiniteTalk render service: hot-folder daemon, dashboard and tools.",
    )
    parser.add_argument(
        "--version",
        action=_Version,
        nargs=0,
        help="print the service version (and git commit in a checkout) and exit",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
