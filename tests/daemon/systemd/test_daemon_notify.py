"""`infinitetalk daemon` speaks the notify protocol to a test socket standing in for systemd.

One real daemon process on the tiny model: READY=1 after the model is loaded, STATUS= with the
queue counts and caps, WATCHDOG=1 pings within the watchdog interval, SIGHUP reloads the caps
(RELOADING=1 then READY=1), a broken config on SIGHUP keeps the old caps, SIGTERM gives STOPPING=1
and a clean exit. A bad config exits 78, which the unit's RestartPreventExitStatus= relies on.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.proc import ROOT, infinitetalk

WATCHDOG_USEC = 2_000_000
CAPS_RE = re.compile(r"(\d+) running, (\d+) queued, (\d+) waiting.*\(caps (\d+) queued / (\d+) running\)")


@dataclass(frozen=True, slots=True)
class Message:
    at: float  #: time.monotonic() when received
    lines: tuple[str, ...]

    def get(self, key: str) -> str | None:
        for line in self.lines:
            if line.startswith(key + "="):
                return line.split("=", 1)[1]
        return None


class NotifyListener:
    """A bound AF_UNIX datagram socket; a thread stamps and collects every sd_notify message."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[Message] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while not self.closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(Message(time.monotonic(), tuple(data.decode().split("\n"))))

    def wait_for(
        self, pred: Callable[[Message], bool], timeout_s: float, proc: subprocess.Popen[str], after: int = 0
    ) -> int:
        """Index of the first message from `after` on satisfying `pred`; fails on timeout/exit."""
        deadline = time.monotonic() + timeout_s
        checked = after
        while time.monotonic() < deadline:
            for i in range(checked, len(self.messages)):
                if pred(self.messages[i]):
                    return i
                checked = i + 1
            if proc.poll() is not None:
                time.sleep(0.3)  # let the last datagrams arrive
                if not any(pred(m) for m in self.messages[checked:]):
                    break
                continue
            time.sleep(0.02)
        got = [m.lines for m in self.messages[after:]]
        pytest.fail(f"no matching sd_notify message within {timeout_s} s (exit {proc.poll()}); got {got}")

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=2)
        self.sock.close()


def write_config(path: Path, weights: Path, *, max_queued: int, max_running: int) -> None:
    path.write_text(
        f'inbox = "inbox"\noutbox = "outbox"\nstate_dir = "var"\nweights_dir = "{weights}"\n'
        f"max_queued = {max_queued}\nmax_running = {max_running}\ntick_s = 0.1\n"
    )


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(tmp_path / "notify.sock")
    yield lst
    lst.close()


def start_daemon(tmp_path: Path, config: Path, env_extra: dict[str, str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(env_extra)
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "daemon", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_daemon_notify_protocol(tmp_path: Path, tiny_weights_dir: Path, listener: NotifyListener) -> None:
    config = tmp_path / "infinitetalk.toml"
    write_config(config, tiny_weights_dir, max_queued=20, max_running=3)
    proc = start_daemon(
        tmp_path,
        config,
        {
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
        },
    )
    try:
        # READY=1 only once the model is loaded; its STATUS has the counts and the caps
        ready = listener.wait_for(lambda m: "READY=1" in m.lines, 180, proc)
        before = [m.get("STATUS") or "" for m in listener.messages[:ready]]
        assert any("loading" in text for text in before), before  # the status said so while loading
        status = listener.messages[ready].get("STATUS")
        assert status is not None and "loading" not in status, status
        match = CAPS_RE.search(status)
        assert match and match.group(4, 5) == ("20", "3"), status

        # watchdog pings keep coming, each well inside WatchdogSec
        first_ping = listener.wait_for(lambda m: "WATCHDOG=1" in m.lines, 10, proc, after=ready)
        time.sleep(2 * WATCHDOG_USEC / 1e6)
        pings = [m.at for m in listener.messages[first_ping:] if "WATCHDOG=1" in m.lines]
        assert len(pings) >= 3, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

        # SIGHUP with new caps: RELOADING=1 (with MONOTONIC_USEC), then READY=1 showing them
        mark = len(listener.messages)
        write_config(config, tiny_weights_dir, max_queued=5, max_running=1)
        proc.send_signal(signal.SIGHUP)
        reloading = listener.wait_for(lambda m: "RELOADING=1" in m.lines, 30, proc, after=mark)
        assert int(listener.messages[reloading].get("MONOTONIC_USEC") or 0) > 0
        reready = listener.wait_for(lambda m: "READY=1" in m.lines, 30, proc, after=reloading)
        match = CAPS_RE.search(listener.messages[reready].get("STATUS") or "")
        assert match and match.group(4, 5) == ("5", "1"), listener.messages[reready]

        # SIGHUP with a broken config: refused, the daemon keeps running with the caps it had
        mark = len(listener.messages)
        config.write_text("max_queued = 'many'\n")
        proc.send_signal(signal.SIGHUP)
        again = listener.wait_for(lambda m: "READY=1" in m.lines, 30, proc, after=mark)
        match = CAPS_RE.search(listener.messages[again].get("STATUS") or "")
        assert match and match.group(4, 5) == ("5", "1"), listener.messages[again]
        assert proc.poll() is None

        # SIGTERM: STOPPING=1, more stop time asked for, clean exit
        mark = len(listener.messages)
        proc.send_signal(signal.SIGTERM)
        listener.wait_for(lambda m: "STOPPING=1" in m.lines, 30, proc, after=mark)
        listener.wait_for(lambda m: m.get("EXTEND_TIMEOUT_USEC") is not None, 30, proc, after=mark)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_config_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "infinitetalk.toml"
    config.write_text("max_runing = 3\n")
    result = infinitetalk("daemon", "--config", str(config))
    assert result.returncode == 78, result.stderr
    assert "max_runing" in result.stderr
