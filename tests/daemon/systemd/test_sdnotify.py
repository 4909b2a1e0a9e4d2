"""daemon.sdnotify against real AF_UNIX datagram sockets (a path socket and an abstract one)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.sdnotify import Notifier, notify


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound DGRAM socket standing in for systemd, and the `$NOTIFY_SOCKET` value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env_value = path
    else:
        name = f"infinitetalk-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        env_value = "@" + name
    sock.settimeout(2.0)
    yield sock, env_value
    sock.close()


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_arrive_as_one_datagram_of_lines(listener: tuple[socket.socket, str]) -> None:
    sock, env_value = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": env_value})
    assert notifier.enabled
    assert notifier.ready("idle, 0 queued")
    assert _recv(sock) == ["READY=1", "STATUS=idle, 0 queued"]
    assert notifier.status("1 running,\n 4 queued")
    assert _recv(sock) == ["STATUS=1 running, 4 queued"]
    assert notifier.stopping()
    assert _recv(sock) == ["STOPPING=1"]
    assert notifier.extend_timeout(90)
    assert _recv(sock) == ["EXTEND_TIMEOUT_USEC=90000000"]
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading("reloading config")
    lines = _recv(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1" and lines[2] == "STATUS=reloading config"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_module_level_notify_reads_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env_value = listener
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    assert notify("READY=1")
    assert _recv(sock) == ["READY=1"]


def test_watchdog_interval_and_pings(listener: tuple[socket.socket, str]) -> None:
    sock, env_value = listener
    notifier = Notifier.from_env(
        {"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.watchdog_interval_s == pytest.approx(0.1)
    assert notifier.ping_if_due()  # first call: due at once
    assert _recv(sock) == ["WATCHDOG=1"]
    assert not notifier.ping_if_due()  # within 0.1 s of the last ping
    time.sleep(0.12)
    assert notifier.ping_if_due()
    assert _recv(sock) == ["WATCHDOG=1"]


def test_watchdog_of_another_pid_is_not_ours(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_env(env, pid=4242).watchdog_interval_s is None
    assert Notifier.from_env(env, pid=1).watchdog_interval_s == pytest.approx(0.5)
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "x"}).watchdog_interval_s is None


def test_without_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.ping_if_due()
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_missing_socket_returns_false_without_raising(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("still fine")


def test_bad_lines_are_refused(listener: tuple[socket.socket, str]) -> None:
    _, env_value = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": env_value})
    with pytest.raises(ValueError, match="READY"):
        notifier.notify("READY")
    with pytest.raises(ValueError, match="STATUS=a"):
        notifier.notify("STATUS=a\nREADY=1")
    with pytest.raises(ValueError, match="-1"):
        notifier.extend_timeout(-1)
