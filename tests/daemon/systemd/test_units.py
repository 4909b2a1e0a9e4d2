"""The two units: `systemd-analyze verify` prints nothing, exposure within bounds, key settings."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.config import Settings

ROOT = Path(__file__).resolve().parents[3]
UNITS = ("infinitetalk.service", "infinitetalk-dashboard.service")
MAX_EXPOSURE = {"infinitetalk.service": 4.0, "infinitetalk-dashboard.service": 2.0}


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *units],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def exposure(root: Path, unit: str) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", unit],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def parse_unit(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> values in order (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def seconds(value: str) -> float:
    """A systemd time span like `5min`, `10s`, `120` -> seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_installed_units_verify_with_no_output(installed_root: Path) -> None:
    result = verify(installed_root, *UNITS)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_units_with_other_paths_and_names_verify(
    tmp_path: Path, make_fake_root: Callable[..., Path], install_into: Callable[..., str]
) -> None:
    prefix = Path("/opt/it-render")
    root = make_fake_root(tmp_path / "root", prefix)
    install_into(
        root,
        prefix=prefix,
        config=Path("/etc/it/render.toml"),
        data_dir=Path("/data/it"),
        user="itk",
        web_user="itk-web",
        upload_group="itk-drop",
    )
    result = verify(root, *UNITS)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    daemon = parse_unit((root / "etc/systemd/system/infinitetalk.service").read_text())
    assert daemon["Service.ExecStart"] == [
        "/opt/it-render/.venv/bin/infinitetalk daemon --config /etc/it/render.toml"
    ]
    assert daemon["Service.User"] == ["itk"] and daemon["Service.Group"] == ["itk"]
    assert daemon["Service.SupplementaryGroups"] == ["itk-drop video render"]
    assert daemon["Service.ReadWritePaths"] == ["/data/it/inbox /data/it/outbox"]
    dash = parse_unit((root / "etc/systemd/system/infinitetalk-dashboard.service").read_text())
    assert dash["Service.User"] == ["itk-web"] and dash["Service.Group"] == ["itk"]
    assert dash["Service.ReadOnlyPaths"] == ["/var/lib/infinitetalk /data/it/outbox"]


def test_verify_catches_what_the_check_is_for(installed_root: Path) -> None:
    """The check can fail: a trailing comment and a missing ExecStart binary are both reported."""
    unit = installed_root / "etc/systemd/system/infinitetalk.service"
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixed  # only the main process"))
    assert "kill mode" in verify(installed_root, "infinitetalk.service").stderr
    (installed_root / "opt/infinitetalk/.venv/bin/infinitetalk").unlink()
    assert "is not executable" in verify(installed_root, "infinitetalk-dashboard.service").stderr


@pytest.mark.parametrize("unit", UNITS)
def test_exposure_is_within_bounds(installed_root: Path, unit: str) -> None:
    level = exposure(installed_root, unit)
    assert level <= MAX_EXPOSURE[unit], f"{unit}: exposure {level} > {MAX_EXPOSURE[unit]}"


def test_shipped_units_equal_the_default_installation(installed_root: Path) -> None:
    for unit in UNITS:
        assert (installed_root / "etc/systemd/system" / unit).read_text() == (
            ROOT / "systemd" / unit
        ).read_text()


def test_no_trailing_comments_in_shipped_units() -> None:
    for unit in UNITS:
        for n, line in enumerate((ROOT / "systemd" / unit).read_text().splitlines(), 1):
            if not line.startswith("#"):
                assert " #" not in line and "\t#" not in line, f"{unit}:{n}: trailing comment: {line!r}"


def test_daemon_unit_settings() -> None:
    unit = parse_unit((ROOT / "systemd/infinitetalk.service").read_text())
    s = Settings()
    assert unit["Service.Type"] == ["notify"] and unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert "78" in unit["Service.RestartPreventExitStatus"][0].split()
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Service.StateDirectory"] == ["infinitetalk"]
    assert unit["Service.User"] == ["infinitetalk"]
    assert unit["Service.KillMode"] == ["mixed"]
    # the daemon's own drain deadline fits inside systemd's stop timeout
    assert seconds(unit["Service.TimeoutStopSec"][0]) > s.stop_timeout_s + 30
    # weight loading gets minutes; the watchdog outlasts a multi-minute offloaded step
    assert seconds(unit["Service.TimeoutStartSec"][0]) >= 600
    assert seconds(unit["Service.WatchdogSec"][0]) >= 300
    # the GPU stays reachable: no PrivateDevices, no W^X enforcement (breaks PyTorch)
    assert "Service.PrivateDevices" not in unit and "Service.MemoryDenyWriteExecute" not in unit
    assert unit["Service.DevicePolicy"] == ["closed"]
    allowed = " ".join(unit["Service.DeviceAllow"])
    for node in ("/dev/nvidiactl", "char-nvidia-frontend", "char-nvidia-uvm"):
        assert node in allowed


def test_dashboard_unit_settings() -> None:
    unit = parse_unit((ROOT / "systemd/infinitetalk-dashboard.service").read_text())
    assert unit["Service.Type"] == ["exec"]
    assert unit["Service.Group"] == ["infinitetalk"]
    assert "/var/lib/infinitetalk" in unit["Service.ReadOnlyPaths"][0].split()
    assert "Service.ReadWritePaths" not in unit
    assert unit["Service.IPAddressAllow"] == ["localhost"] and unit["Service.IPAddressDeny"] == ["any"]
    assert unit["Service.PrivateDevices"] == ["yes"]
    assert "infinitetalk.service" in unit["Unit.After"][0] and "Unit.Requires" not in unit
