"""The daemon unit's system-call rules do not break PyTorch; MemoryDenyWriteExecute= would.

systemd is not running here, so the filters the unit's settings ask for are installed in a child
process by tests/daemon/systemd/seccomp_filter.py (NoNewPrivileges + seccomp), then the child does the
worker's kind of work, also in a spawned grandchild (the render worker is spawned).
"""

from __future__ import annotations

import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.daemon.systemd.seccomp_filter import DENIED_GROUPS

ROOT = Path(__file__).resolve().parents[3]
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the test filter is x86-64 BPF")

CHILD = """
import sys
from tests.daemon.systemd.seccomp_filter import install, sysfs_probe, workload

if __name__ == "__main__":
    install(deny_groups=True, deny_write_execute={mdwe})
    print("probe", sysfs_probe(), flush=True)
    print("main:", workload("{device}"), flush=True)
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(1) as pool:
        print("spawned probe", pool.apply(sysfs_probe), flush=True)
        print("spawned:", pool.apply(workload, ("{device}",)), flush=True)
"""


def run_child(device: str, *, mdwe: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD.format(device=device, mdwe=mdwe)],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_denied_table_is_what_systemd_denies() -> None:
    if shutil.which("systemd-analyze") is None or not UNISTD.is_file():
        pytest.skip("needs systemd-analyze and the kernel headers (linux-libc-dev) to compare against")
    numbers = {
        m.group(1): int(m.group(2)) for m in re.finditer(r"#define __NR_(\w+) (\d+)", UNISTD.read_text())
    }
    unit = (ROOT / "systemd/infinitetalk.service").read_text()
    (line,) = [ln for ln in unit.splitlines() if ln.startswith("SystemCallFilter=~")]
    assert line.removeprefix("SystemCallFilter=~").split() == list(DENIED_GROUPS)
    for group, table in DENIED_GROUPS.items():
        listed = subprocess.run(
            ["systemd-analyze", "syscall-filter", "--no-pager", group],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = {
            ln.strip() for ln in listed.splitlines() if ln.strip() and not ln.strip().startswith(("#", "@"))
        }
        assert table == {n: numbers[n] for n in names if n in numbers}, group


def test_torch_runs_under_the_daemon_filter() -> None:
    result = run_child("cpu", mdwe=False)
    assert result.returncode == 0, result.stderr
    # the filter is really on (sysfs is in @obsolete: EPERM), in the spawned worker too
    assert "probe -1\n" in result.stdout and "spawned probe -1\n" in result.stdout
    assert "main: conv3d" in result.stdout and "spawned: conv3d" in result.stdout


def test_memory_deny_write_execute_breaks_torch() -> None:
    """Why the daemon unit has no MemoryDenyWriteExecute=yes (pytorch#143651): oneDNN builds its
    CPU kernels in memory that is writable and executable. If this starts passing, the setting
    can be turned on (and this test inverted)."""
    result = run_child("cpu", mdwe=True)
    assert result.returncode != 0
    assert "could not create a primitive" in result.stderr, result.stderr[-2000:]


@pytest.mark.gpu
def test_cuda_and_triton_run_under_the_daemon_filter() -> None:
    result = run_child("cuda", mdwe=False)
    assert result.returncode == 0, result.stderr
    assert "probe -1\n" in result.stdout and "spawned probe -1\n" in result.stdout
    assert "main: conv3d" in result.stdout and "compiled ok" in result.stdout
    assert "spawned: conv3d" in result.stdout


def test_dashboard_runs_with_memory_deny_write_execute(tmp_path: Path) -> None:
    """The dashboard unit does set MemoryDenyWriteExecute=yes: the dashboard must serve under it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "infinitetalk.toml"
    config.write_text(f'state_dir = "var"\ninbox = "inbox"\noutbox = "outbox"\n[dashboard]\nport = {port}\n')
    code = (
        "from tests.daemon.systemd.seccomp_filter import install\n"
        "install(deny_groups=True, deny_write_execute=True)\n"
        "from daemon.cli import main\n"
        f"main(['dashboard', '--config', {str(config)!r}])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status is None:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                time.sleep(0.2)
        assert status is not None and status < 500, status
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
