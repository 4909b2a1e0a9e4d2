"""`infinitetalk dashboard [--config FILE] [--host H] [--port P]`: serve the dashboard under uvicorn.

Settings come from the daemon's config file (`[dashboard]` table, `state_dir`, `outbox`); the
flags override them. `--ledger`/`--outbox` point at a ledger and outbox directly, without a
config. Only the standard library is imported at module level: the app is imported in `run`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only; imported for real inside the functions
    from daemon.config import Settings
    from dashboard.config import DashboardConfig

#: seconds uvicorn waits for open connections at shutdown before cancelling them
GRACEFUL_SHUTDOWN_S = 3

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="read-only live dashboard (queue, progress, videos) over HTTP",
        description="Serve the read-only dashboard. It reads the daemon's ledger and outbox; "
        "it keeps running while the daemon is stopped.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default: $INFINITETALK_CONFIG, then ./infinitetalk.toml)",
    )
    parser.add_argument("--host", help="bind address (default: [dashboard] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default: [dashboard] port, 8000)")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept this Host header name (e.g. a reverse proxy's); repeatable",
    )
    parser.add_argument(
        "--ledger", type=Path, help="ledger file to read instead of <state_dir>/ledger.sqlite3"
    )
    parser.add_argument("--outbox", type=Path, help="outbox folder instead of the config's")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> tuple[Settings, DashboardConfig]:
    """(daemon Settings, DashboardConfig) from the config file plus the command-line overrides."""
    from daemon.config import load_settings
    from dashboard.config import from_settings

    settings = load_settings(args.config)
    cfg = from_settings(
        settings,
        host=args.host,
        port=args.port,
        ledger_path=args.ledger.resolve() if args.ledger else None,
        outbox=args.outbox.resolve() if args.outbox else None,
        extra_hosts=tuple(args.allow_host) or None,
    )
    return settings, cfg


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from daemon.config import ConfigError
    from daemon.logs import configure_logging
    from dashboard.app import create_app

    try:
        settings, cfg = build_config(args)
    except (ConfigError, ValueError) as e:
        configure_logging("info")
        logger.error("%s", e)
        return 78  # EX_CONFIG
    configure_logging(settings.log_level)
    if not cfg.is_local and not cfg.token:
        logger.warning(
            "the dashboard binds %s without an access token: anyone who can reach it "
            "sees the queue and the videos; set [dashboard] token",
            cfg.host,
        )
    logger.info(
        "dashboard on http://%s:%d/ reading %s (outbox %s)", cfg.host, cfg.port, cfg.ledger_path, cfg.outbox
    )
    uvicorn.run(
        create_app(cfg),
        host=cfg.host,
        port=cfg.port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
        proxy_headers=False,
        log_config=None,
    )
    return 0
