"""`infinitetalk daemon`: the hot-folder render service in the foreground (systemd Type=notify).

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 78 (EX_CONFIG) on a bad config file or a
`weights_dir` holding no weights (unless `allow_tiny_model` / `--allow-tiny`; daemon/weights_guard.py),
75 (EX_TEMPFAIL) when another daemon already holds the state dir, 73 (EX_CANTCREAT) when the
state dir or the outbox cannot be written (read-only, permissions), 65 (EX_DATAERR) when the
ledger was deleted or replaced while the daemon ran (or is missing while claimed jobs exist),
1 when the model cannot be loaded; with `[cluster] executor = "ray"`, 78 when the ray package
is not installed and 69 (EX_UNAVAILABLE) when the Ray cluster cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EX_CONFIG = 78
EX_TEMPFAIL = 75
EX_CANTCREAT = 73
EX_DATAERR = 65


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "daemon",
        help="run the hot-folder render service in the foreground (systemd notify protocol)",
        description="Watch the inbox, render jobs with the resident model, publish to the outbox.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML config file (default: $INFINITETALK_CONFIG, then ./infinitetalk.toml)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the complete config (every key, its value and its doc) and exit",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="exit once every job found has finished (at least one); "
        "exit status 1 if one of them failed or was rejected",
    )
    parser.add_argument(
        "--allow-tiny",
        action="store_true",
        help="as allow_tiny_model = true: without weights in weights_dir, render with a tiny "
        "random-weight test model (noise; what scripts/demo passes)",
    )
    parser.add_argument("--pipeline-factory", default="", help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from daemon.config import ConfigError, load_settings, render_toml

    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        return _refused(f"bad config: {e}", EX_CONFIG)
    if args.allow_tiny:
        import dataclasses

        settings = dataclasses.replace(settings, allow_tiny_model=True)
    if args.print_config:
        sys.stdout.write(render_toml(settings, mask_secrets=True))
        return 0

    from daemon.cluster import ClusterError
    from daemon.errors import DaemonLocked, FolderUnusable, LedgerLost
    from daemon.logs import configure_logging
    from daemon.supervisor import Supervisor
    from daemon.weights_guard import WeightsMissing

    configure_logging(settings.log_level)
    supervisor = Supervisor(
        settings,
        config_path=settings.config_file,
        once=args.once,
        pipeline_factory=args.pipeline_factory or settings.pipeline_factory,
    )
    supervisor.install_signals()
    # the errors that keep the daemon from running: (error, what its line says first, exit status);
    # a ClusterError carries its own status
    refusals: tuple[tuple[type[Exception], str, int], ...] = (
        (DaemonLocked, "", EX_TEMPFAIL),
        (FolderUnusable, "cannot start: ", EX_CANTCREAT),
        (LedgerLost, "", EX_DATAERR),
        (WeightsMissing, "cannot start: ", EX_CONFIG),
    )
    try:
        return supervisor.run()
    except ClusterError as e:
        return _refused(f"cannot start: {e}", e.exit_code)
    except tuple(kind for kind, _, _ in refusals) as e:
        prefix, status = next((p, s) for kind, p, s in refusals if isinstance(e, kind))
        return _refused(f"{prefix}{e}", status)


def _refused(message: str, status: int) -> int:
    print(f"infinitetalk daemon: {message}", file=sys.stderr)
    return status
