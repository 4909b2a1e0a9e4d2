"""Run `infinitetalk dashboard` as a real uvicorn process for tests."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.proc import ROOT, terminate


def write_config(path: Path, *, state_dir: Path, outbox: Path, port: int, token: str = "") -> Path:
    path.write_text(
        f'state_dir = "{state_dir}"\noutbox = "{outbox}"\n\n[dashboard]\nhost = "127.0.0.1"\n'
        f'port = {port}\ntoken = "{token}"\n'
    )
    return path


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dashboard exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"dashboard at {url} not healthy after {timeout_s} s")


@contextmanager
def dashboard_server(
    config: Path,
    port: int,
    log: Path,
    *,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yield (base URL, process); the process is stopped (SIGTERM, then SIGKILL) afterwards.
    `wrap` turns the command line into another (e.g. one run inside `unshare`)."""
    argv = [sys.executable, "-m", "daemon", "dashboard", "--config", str(config)]
    with log.open("wb") as out:
        proc = subprocess.Popen(wrap(argv) if wrap else argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            yield url, proc
        finally:
            terminate(proc)
