"""The systemd notify protocol (sd_notify), spoken without any dependency.

A service of `Type=notify` tells systemd about itself by sending one datagram of newline-separated
`KEY=VALUE` lines to the AF_UNIX socket named in `$NOTIFY_SOCKET` (a file path, or `@name` for the
Linux abstract namespace). Outside systemd the variable is unset and every call is a no-op.

    notifier = Notifier.from_env()
    notifier.ready("idle, 0 queued")          # READY=1 + STATUS=
    while running:
        ...
        notifier.status("1 running, 4 queued")
        notifier.ping_if_due()                # WATCHDOG=1 every WatchdogSec/2
    notifier.stopping("draining")             # STOPPING=1

The watchdog is enabled when `$WATCHDOG_USEC` is set and `$WATCHDOG_PID` is unset or names this
process; systemd's advice is to ping at half the interval, which `watchdog_interval_s` returns.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

#: systemd's own limit for one notification datagram is far larger; STATUS lines are kept short
MAX_STATUS_CHARS = 400


def _socket_address(raw: str) -> str | None:
    """`$NOTIFY_SOCKET` as an AF_UNIX address, or None for kinds this module does not speak (vsock)."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(text: str) -> str:
    """STATUS= must stay one line: a newline would start a new KEY=VALUE assignment."""
    flat = " ".join(text.split())
    return flat[:MAX_STATUS_CHARS]


class Notifier:
    """Sends sd_notify messages to one socket; every method returns whether a message was sent."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._last_ping = float("-inf")
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> Notifier:
        """Read `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` (from `os.environ` by default)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        if raw and address is None:
            logger.warning("NOTIFY_SOCKET=%r is not an AF_UNIX path or @abstract name; not notifying", raw)
        return cls(address, watchdog_usec=_watchdog_usec(env, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        """True when running under a notify socket (systemd, or a test standing in for it)."""
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None without a watchdog."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def notify(self, *lines: str) -> bool:
        """Send `lines` (each `KEY=VALUE`) as one datagram; False when not under systemd or on error."""
        if self.address is None:
            return False
        for line in lines:
            if "=" not in line or "\n" in line:
                raise ValueError(f"sd_notify lines are single KEY=VALUE assignments, got {line!r}")
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError as exc:
            # the service keeps running when the manager is gone; say so once, not every tick
            if not self._warned:
                logger.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is finished; systemd considers the unit started."""
        return self.notify("READY=1", *_status_lines(status))

    def status(self, text: str) -> bool:
        """STATUS=<text>: the one-line state `systemctl status` shows."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify("STOPPING=1", *_status_lines(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 (with MONOTONIC_USEC, as systemd >= 253 asks); send `ready()` when done."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}", *_status_lines(status))

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for `seconds` more of the current start/stop timeout."""
        if seconds <= 0:
            raise ValueError(f"extend_timeout needs a positive number of seconds, got {seconds!r}")
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def ping(self) -> bool:
        """WATCHDOG=1 now (also when no watchdog is configured, which systemd ignores)."""
        self._last_ping = time.monotonic()
        return self.notify("WATCHDOG=1")

    def ping_if_due(self) -> bool:
        """WATCHDOG=1 if half the watchdog interval has passed since the last ping; call it often."""
        interval = self.watchdog_interval_s
        if interval is None or self.address is None:
            return False
        if time.monotonic() - self._last_ping < interval:
            return False
        return self.ping()

    def watchdog_trigger(self) -> bool:
        """WATCHDOG=trigger: ask systemd to treat the service as hung now (for a detected deadlock)."""
        return self.notify("WATCHDOG=trigger")


def _status_lines(status: str | None) -> tuple[str, ...]:
    return () if status is None else (f"STATUS={_one_line(status)}",)


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None  # the watchdog belongs to another process (we were started by the main one)
    try:
        usec = int(raw)
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not an integer; watchdog pings disabled", raw)
        return None
    return usec if usec > 0 else None


def notify(*lines: str) -> bool:
    """One-off sd_notify from the environment: `notify("READY=1", "STATUS=idle")`."""
    return Notifier.from_env().notify(*lines)
