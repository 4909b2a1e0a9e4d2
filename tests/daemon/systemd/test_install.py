"""`infinitetalk install-systemd --root`: users, folders with owners and modes, units, config."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.install import InstallError, InstallOptions
from tests.helpers.proc import infinitetalk

IS_ROOT = os.geteuid() == 0

#: path -> (mode, owner, group) after a default installation
EXPECTED_TREE = {
    "srv/infinitetalk": (0o755, "root", "root"),
    "srv/infinitetalk/inbox": (0o2775, "infinitetalk", "infinitetalk-upload"),
    "srv/infinitetalk/outbox": (0o2750, "infinitetalk", "infinitetalk-upload"),
    "srv/infinitetalk/weights": (0o2750, "root", "infinitetalk"),
    "var/lib/infinitetalk": (0o750, "infinitetalk", "infinitetalk"),
    "etc/infinitetalk": (0o750, "root", "infinitetalk"),
    "etc/infinitetalk/infinitetalk.toml": (0o640, "root", "infinitetalk"),
    "etc/systemd/system/infinitetalk.service": (0o644, "root", "root"),
    "etc/systemd/system/infinitetalk-dashboard.service": (0o644, "root", "root"),
}


def _db(path: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines() if line}


def test_tree_modes_and_owners(installed_root: Path) -> None:
    passwd = _db(installed_root / "etc/passwd") if IS_ROOT else {}
    groups = _db(installed_root / "etc/group") if IS_ROOT else {}
    for rel, (mode, owner, group) in EXPECTED_TREE.items():
        st = (installed_root / rel).stat()
        assert stat.S_IMODE(st.st_mode) == mode, f"{rel}: {stat.S_IMODE(st.st_mode):04o} != {mode:04o}"
        if IS_ROOT:
            assert st.st_uid == (0 if owner == "root" else int(passwd[owner][2])), rel
            assert st.st_gid == (0 if group == "root" else int(groups[group][2])), rel


@pytest.mark.skipif(not IS_ROOT, reason="creating users (useradd --prefix) needs root")
def test_users_and_groups(installed_root: Path) -> None:
    passwd = _db(installed_root / "etc/passwd")
    groups = _db(installed_root / "etc/group")
    daemon, web = passwd["infinitetalk"], passwd["infinitetalk-web"]
    assert daemon[3] == web[3] == groups["infinitetalk"][2]  # both in the daemon's group
    assert daemon[5] == "/var/lib/infinitetalk" and daemon[6] == "/usr/sbin/nologin"
    assert web[6] == "/usr/sbin/nologin"
    assert int(daemon[2]) < 1000 and int(web[2]) < 1000  # system accounts
    assert set(groups["infinitetalk-upload"][3].split(",")) == {"infinitetalk", "infinitetalk-web"}


def test_config_points_at_the_installed_folders(installed_root: Path) -> None:
    settings = load_settings(installed_root / "etc/infinitetalk/infinitetalk.toml")
    assert settings.inbox == Path("/srv/infinitetalk/inbox")
    assert settings.outbox == Path("/srv/infinitetalk/outbox")
    assert settings.state_dir == Path("/var/lib/infinitetalk")
    assert settings.weights_dir == Path("/srv/infinitetalk/weights")
    assert (settings.max_queued, settings.max_running) == (20, 3)
    assert settings.dashboard.host == "127.0.0.1"


def test_running_again_keeps_the_config_and_changes_nothing_else(
    installed_root: Path, install_into: Callable[..., str]
) -> None:
    config = installed_root / "etc/infinitetalk/infinitetalk.toml"
    config.write_text(config.read_text().replace("max_queued = 20", "max_queued = 7"))
    before = {rel: (installed_root / rel).stat() for rel in EXPECTED_TREE}
    printed = install_into(installed_root)
    assert "kept the existing /etc/infinitetalk/infinitetalk.toml" in printed
    assert load_settings(config).max_queued == 7
    for rel, st in before.items():
        now = (installed_root / rel).stat()
        assert (now.st_mode, now.st_uid, now.st_gid) == (st.st_mode, st.st_uid, st.st_gid), rel
    if IS_ROOT:
        assert "user infinitetalk exists" in printed
        assert len(_db(installed_root / "etc/passwd")) == 2


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = infinitetalk("install-systemd", "--dry-run", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert list(root.iterdir()) == []
    out = result.stdout
    assert "warning: /opt/infinitetalk/.venv/bin/infinitetalk does not exist" in out
    for line in (
        "would: groupadd --system infinitetalk-upload",
        "would: install -d -o infinitetalk -g infinitetalk-upload -m 2775 /srv/infinitetalk/inbox",
        "would: write /etc/systemd/system/infinitetalk.service (0644 root:root)",
        "would: systemctl daemon-reload",
        "sudo systemctl enable --now infinitetalk infinitetalk-dashboard",
        "journalctl -u infinitetalk",
    ):
        assert line in out, line


def test_cli_installs_into_a_root(tmp_path: Path, make_fake_root: Callable[..., Path]) -> None:
    root = make_fake_root(tmp_path / "root")
    result = infinitetalk("install-systemd", "--root", str(root), "--upload-group", "dropbox")
    assert result.returncode == 0, result.stderr
    assert "skipped: --root given" in result.stdout  # no systemctl against the host
    assert "sudo usermod -aG dropbox ACCOUNT" in result.stdout
    assert (
        "SupplementaryGroups=dropbox video render"
        in (root / "etc/systemd/system/infinitetalk.service").read_text()
    )


def test_missing_program_is_an_error_naming_it(tmp_path: Path) -> None:
    result = infinitetalk("install-systemd", "--root", str(tmp_path), "--prefix", "/opt/nope")
    assert result.returncode == 1
    assert "/opt/nope/.venv/bin/infinitetalk does not exist" in result.stderr
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefix": Path("/home/alice/InfiniteTalk")}, "ProtectHome"),
        ({"data_dir": Path("srv")}, "absolute path"),
        ({"config": Path("/etc/my config.toml")}, "without spaces"),
        ({"user": "Render Bot"}, "'Render Bot'"),
        ({"web_user": "infinitetalk"}, "must differ"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(InstallError, match=message):
        InstallOptions(**options)  # type: ignore[arg-type]
