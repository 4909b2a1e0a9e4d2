"""`infinitetalk install-systemd --ray-worker HEAD:PORT`: the Ray worker unit of a GPU host,
installed into a fake root and checked with the real `systemd-analyze verify` and `security`."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.install import InstallError, InstallOptions
from tests.daemon.systemd.test_units import exposure, parse_unit, seconds, verify
from tests.helpers.proc import infinitetalk

UNIT = "infinitetalk-ray-worker.service"
#: `systemd-analyze security` of the worker unit (2.0 when written; the daemon's bound is 4.0)
MAX_EXPOSURE = 2.5


def _ray_root(
    make_fake_root: Callable[..., Path], root: Path, prefix: Path = Path("/opt/infinitetalk")
) -> Path:
    """A fake root whose venv also has the `ray` executable the unit runs."""
    make_fake_root(root, prefix)
    ray = root / prefix.relative_to("/") / ".venv" / "bin" / "ray"
    ray.write_text("#!/bin/sh\nexit 0\n")
    ray.chmod(0o755)
    return root


@pytest.fixture
def worker_root(
    tmp_path: Path, make_fake_root: Callable[..., Path], install_into: Callable[..., str]
) -> Path:
    root = _ray_root(make_fake_root, tmp_path / "root")
    install_into(root, ray_worker="gpu-head.lan:6379")
    return root


def _unit(root: Path) -> dict[str, list[str]]:
    return parse_unit((root / "etc/systemd/system" / UNIT).read_text())


def test_the_worker_unit_verifies_with_no_output(worker_root: Path) -> None:
    result = verify(worker_root, UNIT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_worker_unit_is_hardened_like_the_others(worker_root: Path) -> None:
    assert exposure(worker_root, UNIT) <= MAX_EXPOSURE
    unit = _unit(worker_root)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
        "User": "infinitetalk",
        "Group": "infinitetalk",
    }.items():
        assert unit[f"Service.{key}"] == [value], key
    assert "char-nvidia-frontend rw" in unit["Service.DeviceAllow"]  # the GPUs, nothing else
    assert unit["Service.SystemCallFilter"][0].startswith("~@clock")
    assert "RAY_USAGE_STATS_ENABLED=0" in unit["Service.Environment"]  # nothing phones home


def test_the_worker_joins_the_given_head_and_keeps_rejoining(worker_root: Path) -> None:
    unit = _unit(worker_root)
    assert unit["Service.ExecStart"] == [
        "/opt/infinitetalk/.venv/bin/ray start --address=gpu-head.lan:6379 --block --disable-usage-stats"
    ]
    # any exit (the head lost, a Ray process killed) rejoins, and a long head outage is no give-up
    assert unit["Service.Restart"] == ["always"]
    assert seconds(unit["Service.RestartSec"][0]) >= 5
    assert unit["Unit.StartLimitIntervalSec"] == ["0"]
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_a_worker_host_gets_the_weights_folder_and_nothing_of_the_head(worker_root: Path) -> None:
    weights = worker_root / "srv/infinitetalk/weights"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o2750
    units = sorted(p.name for p in (worker_root / "etc/systemd/system").iterdir())
    assert units == [UNIT]
    for head_only in ("srv/infinitetalk/inbox", "srv/infinitetalk/outbox", "etc/infinitetalk"):
        assert not (worker_root / head_only).exists(), head_only


def test_other_paths_and_names_are_substituted_and_verify(
    tmp_path: Path, make_fake_root: Callable[..., Path], install_into: Callable[..., str]
) -> None:
    prefix = Path("/opt/it-render")
    root = _ray_root(make_fake_root, tmp_path / "root", prefix)
    install_into(root, prefix=prefix, user="render", data_dir=Path("/data/it"), ray_worker="[fd00::1]:6380")
    unit = _unit(root)
    assert unit["Service.ExecStart"][0].startswith(f"{prefix}/.venv/bin/ray start --address=[fd00::1]:6380 ")
    assert (unit["Service.User"], unit["Service.Group"]) == (["render"], ["render"])
    assert (root / "data/it/weights").is_dir()
    result = verify(root, UNIT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_cli_dry_run_prints_the_worker_steps_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = infinitetalk(
        "install-systemd", "--ray-worker", "10.0.0.5:6379", "--dry-run", "--root", str(root)
    )
    assert result.returncode == 0, result.stderr
    assert list(root.iterdir()) == []
    out = result.stdout
    for line in (
        "warning: /opt/infinitetalk/.venv/bin/ray does not exist",
        "with the ray extra (pip install '.[ray]')",
        "would: install -d -o root -g infinitetalk -m 2750 /srv/infinitetalk/weights",
        f"would: write /etc/systemd/system/{UNIT} (0644 root:root)",
        "would: systemctl daemon-reload",
        "sudo systemctl enable --now infinitetalk-ray-worker",
        "journalctl -u infinitetalk-ray-worker",
    ):
        assert line in out, line
    assert "inbox" not in out and "infinitetalk-dashboard" not in out


def test_cli_installs_the_worker_into_a_root(tmp_path: Path, make_fake_root: Callable[..., Path]) -> None:
    root = _ray_root(make_fake_root, tmp_path / "root")
    result = infinitetalk("install-systemd", "--ray-worker", "gpu-head:6379", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "skipped: --root given" in result.stdout  # no systemctl against the host
    assert "--address=gpu-head:6379 " in (root / "etc/systemd/system" / UNIT).read_text()
    if os.geteuid() == 0:
        assert "infinitetalk:" in (root / "etc/passwd").read_text()


def test_a_worker_without_ray_in_the_venv_is_an_error_naming_the_extra(
    tmp_path: Path, make_fake_root: Callable[..., Path]
) -> None:
    root = make_fake_root(tmp_path / "root")  # infinitetalk, but no ray, in the venv
    result = infinitetalk("install-systemd", "--ray-worker", "gpu-head:6379", "--root", str(root))
    assert result.returncode == 1
    assert "/opt/infinitetalk/.venv/bin/ray does not exist" in result.stderr
    assert "pip install '.[ray]'" in result.stderr
    assert not (root / "etc/systemd/system" / UNIT).exists()


@pytest.mark.parametrize(
    "address", ["gpu-head", "ray://gpu-head:10001", "gpu-head:0", "gpu-head:70000", "gpu head:6379", ""]
)
def test_bad_addresses_are_refused_naming_them(address: str) -> None:
    with pytest.raises(InstallError, match=f"HOST:PORT .*got {address!r}"):
        InstallOptions(ray_worker=address)
