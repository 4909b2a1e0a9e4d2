"""`[cluster] executor = "ray"` that cannot start: a clear message and a sysexits status, no
traceback. The first test needs no Ray at all (it hides the package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.proc import free_port

pytestmark = pytest.mark.timeout(120)


def _ray_config(d: Daemon, **keys: Any) -> None:
    lines = [f"{k} = {json.dumps(v)}" for k, v in {"executor": "ray", "num_gpus": 0, **keys}.items()]
    d.config.write_text(d.config.read_text() + "\n[cluster]\n" + "\n".join(lines) + "\n")


def _run(d: Daemon) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "daemon", "daemon", "--config", str(d.config), "--pipeline-factory"]
    args.append("tests.daemon.service.fake_pipeline:make")
    return subprocess.run(args, env=d.environment(), capture_output=True, text=True, timeout=90, cwd=d.root)


def test_no_ray_installed_is_a_config_error(tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    (hide / "ray").mkdir(parents=True)
    (hide / "ray" / "__init__.py").write_text("raise ImportError('ray hidden by the test')\n")
    d = Daemon(tmp_path / "tree", env={"PYTHONPATH": str(hide)})
    _ray_config(d)
    done = _run(d)
    assert done.returncode == 78, done.stderr
    assert "needs the ray package" in done.stderr and "pip install '.[ray]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_wrong_ray_address_is_unavailable(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    d = Daemon(tmp_path)
    _ray_config(d, ray_address=f"127.0.0.1:{free_port()}")
    done = _run(d)
    assert done.returncode == 69, done.stderr
    assert "cannot reach the Ray cluster at ray_address = '127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr
