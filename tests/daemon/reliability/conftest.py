"""Fixtures of the reliability suite: an OpenSSH server on 127.0.0.1 and real daemon processes."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon.reliability import harness
from tests.helpers.daemon import STEADY, Daemon


@pytest.fixture(scope="session", autouse=True)
def _reliability_summary() -> Iterator[None]:
    """Write the figures of this run (uploads, interruptions, kills, faults, losses) at the end."""
    yield
    harness.write_summary()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.SshServer]:
    """`/usr/sbin/sshd -D -f <tmp config>` on a free 127.0.0.1 port, keys generated with ssh-keygen."""
    for tool in ("/usr/sbin/sshd", "ssh", "sftp", "scp", "rsync", "ssh-keygen"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: run scripts/system-deps (openssh-server, openssh-client, rsync)")
    proc, server = harness.start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def daemon_factory(tmp_path_factory: pytest.TempPathFactory, tiny_weights_dir: Path) -> Iterator[object]:
    """Make daemons of the tiny model (preset STEADY, waiting for the model on start) in fresh
    folders; every one still running is stopped afterwards."""
    made: list[Daemon] = []

    def make(name: str = "d", **settings: object) -> Daemon:
        d = Daemon(
            tmp_path_factory.mktemp(name),
            fake=False,
            weights_dir=tiny_weights_dir,
            config=settings,
            preset=STEADY,
            ready_on_start=True,
        )
        made.append(d)
        return d

    yield make
    for d in made:
        if d.alive():
            try:
                d.stop(timeout_s=30)
            except AssertionError:
                pass


@pytest.fixture()
def tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """`tmpfs(folder, size)` mounts a size-limited tmpfs at `folder` (the test is skipped where
    that is not allowed); all are unmounted afterwards, the last first."""
    made: list[Path] = []

    def mount(folder: Path, size: str) -> Path:
        harness.mount_tmpfs(folder, size)
        made.append(folder)
        return folder

    yield mount
    for folder in reversed(made):
        harness.umount(folder)
