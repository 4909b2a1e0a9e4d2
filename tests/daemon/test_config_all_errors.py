"""Config loading reports every problem of a file in one run, checks ranges and cross-key rules
at load (a dashboard port above 65535 fails when the daemon starts, not when the dashboard
binds), and `--print-config` hides the secrets; `infinitetalk --version` (issue 19)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon import version
from daemon.config import HIDDEN, ConfigError, load_settings, render_toml

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

BAD = """
max_queued = 0
quant = "fp4"
max_runing = 3

[dashboard]
port = 70000

[notify]
webhook_urls = ["ftp://example.org/hook"]
webhook_timeout_s = 0
"""


def _cli(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(ENV) if path is None else {**ENV, "PATH": path}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "infinitetalk.toml"
    cfg.write_text(BAD)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    text = str(info.value)
    assert text.startswith("6 problems:"), text
    for needle in (
        "max_queued must be > 0, got 0",
        "quant must be one of auto, none, fp8, got 'fp4'",
        "max_runing: unknown key",
        "dashboard.port must be <= 65535, got 70000",
        "notify.webhook_timeout_s must be >= 0.1, got 0.0",
        "notify.webhook_urls: 'ftp://example.org/hook' is not an http:// or https:// URL",
    ):
        assert needle in text, (needle, text)
    # the daemon exits 78 at start with all of them, one line each
    out = _cli("daemon", "--config", str(cfg))
    assert out.returncode == 78
    assert "6 problems" in out.stderr and "dashboard.port must be <= 65535" in out.stderr
    assert len([line for line in out.stderr.splitlines() if "infinitetalk.toml:" in line]) == 6


def test_one_problem_reads_as_before(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[dashboard]\nport = 65536\n")
    with pytest.raises(ConfigError, match=r"^\S+c\.toml: dashboard\.port must be <= 65535, got 65536"):
        load_settings(cfg)
    cfg.write_text("[dashboard]\nport = 65535\n")
    assert load_settings(cfg).dashboard.port == 65535


def test_keys_that_must_agree(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('min_audio_s = 30\nmax_audio_s = 10\n[dashboard]\nhost = " "\n')
    text = str(pytest.raises(ConfigError, load_settings, cfg).value)
    assert "2 problems" in text
    assert "min_audio_s (30) must not exceed max_audio_s (10)" in text
    assert "dashboard.host must not be empty" in text


def test_print_config_hides_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[dashboard]\ntoken = "tok-123456"\n[notify]\nwebhook_urls = ["https://hooks.example/x"]\n'
        'webhook_secret = "shh-abcdef"\n'
    )
    out = _cli("daemon", "--config", str(cfg), "--print-config")
    assert out.returncode == 0, out.stderr
    assert "tok-123456" not in out.stdout and "shh-abcdef" not in out.stdout
    printed = tomllib.loads(out.stdout)
    assert printed["dashboard"]["token"] == HIDDEN and printed["notify"]["webhook_secret"] == HIDDEN
    assert printed["notify"]["webhook_urls"] == ["https://hooks.example/x"]
    # unset secrets print as empty (nothing to hide); the installer's file keeps real values
    assert tomllib.loads(render_toml(load_settings(None), mask_secrets=True))["dashboard"]["token"] == ""
    assert 'token = "tok-123456"' in render_toml(load_settings(cfg))


def test_version_flag_with_and_without_git(tmp_path: Path) -> None:
    out = _cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"infinitetalk-service {version.version()}")
    if (ROOT / ".git").exists() and version.git_commit() is not None:
        assert f"(git {version.git_commit()})" in out.stdout
    # no git on the PATH: the version alone, exit 0
    bare = tmp_path / "bin"
    bare.mkdir()
    out = _cli("--version", path=str(bare))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"infinitetalk-service {version.version()}"
    # not a checkout at all
    assert version.git_commit(tmp_path) is None
