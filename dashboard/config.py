"""What the dashboard needs to know: where the ledger and the outbox are, and how it is reached.

Built from the daemon's `Settings` (`from_settings`) or directly from paths (tests, or running the
dashboard against a copied ledger). Nothing here touches the disk.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: names a browser on the same machine uses for a loopback bind
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardConfig:
    ledger_path: Path  #: <state_dir>/ledger.sqlite3, opened read-only
    outbox: Path  #: videos and posters are served only from inside this folder
    host: str = "127.0.0.1"  #: the address uvicorn binds
    port: int = 8000
    token: str = ""  #: if set, every route but /healthz needs it (bearer header, cookie or ?token=)
    extra_hosts: tuple[str, ...] = ()  #: more Host header names to accept (a reverse proxy's name)
    poll_s: float = 0.5  #: how often each event stream looks for new ledger events
    ping_s: float = 15.0  #: SSE heartbeat period
    done_limit: int = 48  #: finished videos in the page's snapshot (newest first)
    problem_limit: int = 50  #: failed, rejected and cancelled jobs in the snapshot (newest first)
    allowed_hosts: tuple[str, ...] = field(default=())  #: derived from `host` when left empty

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"dashboard port must be 1..65535, got {self.port!r}")
        if self.poll_s <= 0 or self.ping_s < 0:
            raise ValueError(f"poll_s must be > 0 and ping_s >= 0, got {self.poll_s!r}, {self.ping_s!r}")
        if not self.allowed_hosts:
            hosts = allowed_hosts_for(self.host) + tuple(h.lower() for h in self.extra_hosts)
            object.__setattr__(self, "allowed_hosts", tuple(dict.fromkeys(hosts)))

    @property
    def is_local(self) -> bool:
        """True when the bind address is loopback-only."""
        return is_loopback(self.host)


def from_settings(settings: Any, **overrides: Any) -> DashboardConfig:
    """A config from the daemon's `Settings` (daemon/config.py); `overrides` win (CLI flags)."""
    values: dict[str, Any] = {
        "ledger_path": settings.ledger_path,
        "outbox": settings.outbox,
        "host": settings.dashboard.host,
        "port": settings.dashboard.port,
        "token": settings.dashboard.token,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DashboardConfig(**values)


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bracket(host: str) -> str:
    """IPv6 literals appear in Host headers in brackets."""
    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            return f"[{host.strip('[]')}]"
    except ValueError:
        pass
    return host


def allowed_hosts_for(bind: str) -> tuple[str, ...]:
    """Host header names that reach a server bound to `bind` (the DNS-rebinding allow-list).

    A loopback bind accepts only loopback names. A specific address accepts that address and the
    loopback names; a wildcard bind (0.0.0.0, ::) also accepts this machine's host names and their
    addresses. Anything else (a proxy's public name) must be added explicitly.
    """
    hosts = list(LOOPBACK_HOSTS)
    bare = bind.strip("[]")
    if is_loopback(bare):
        return tuple(hosts)
    if bare not in ("0.0.0.0", "::", ""):
        hosts.append(_bracket(bare).lower())
        return tuple(dict.fromkeys(hosts))
    names = {socket.gethostname(), socket.getfqdn()}
    for name in sorted(names):
        hosts.append(name.lower())
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:
            continue
        hosts.extend(_bracket(str(info[4][0])).lower() for info in infos)
    return tuple(dict.fromkeys(hosts))
