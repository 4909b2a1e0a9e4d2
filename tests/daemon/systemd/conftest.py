"""A fake root for `systemd-analyze verify --root`: the host's own units plus our installation.

`verify` resolves ExecStart= binaries and the units' dependencies (sysinit.target, ...) inside the
root it is given, so the fake root gets a copy of the host's unit directory, `/bin/kill` (our
ExecReload=) and a stand-in for the venv's `infinitetalk` executable; `install-systemd --root`
then writes the units, config, users and folders into it exactly as on a real machine.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.install import InstallOptions, install

HOST_UNITS = Path("/usr/lib/systemd/system")


def _make_fake_root(root: Path, prefix: Path = Path("/opt/infinitetalk")) -> Path:
    """Prepare `root` with the host's systemd units, /bin/kill and `<prefix>/.venv/bin/infinitetalk`."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: install the Debian package systemd (scripts/system-deps)")
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    shutil.copytree(HOST_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    shutil.copy2(shutil.which("kill") or "/bin/kill", root / "usr" / "bin" / "kill")
    exe = root / prefix.relative_to("/") / ".venv" / "bin" / "infinitetalk"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return root


def _install_into(root: Path, **options: object) -> str:
    """Run install-systemd into `root` in this process; returns what it printed."""
    out = io.StringIO()
    install(InstallOptions(root=root, **options), out)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.fixture
def make_fake_root() -> Callable[..., Path]:
    """`make_fake_root(root, prefix=Path("/opt/infinitetalk")) -> root`, ready for install + verify."""
    return _make_fake_root


@pytest.fixture
def install_into() -> Callable[..., str]:
    """`install_into(root, **InstallOptions fields) -> printed text`: install-systemd, in-process."""
    return _install_into


@pytest.fixture
def installed_root(tmp_path: Path) -> Path:
    """A fake root with the project installed by install-systemd with default options."""
    root = _make_fake_root(tmp_path / "root")
    _install_into(root)
    return root
