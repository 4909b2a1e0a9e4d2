"""The ledger in a folder the dashboard cannot write (systemd `ReadOnlyPaths=`), checked for real
with a read-only bind mount in a private mount namespace (needs root and `unshare`)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from daemon.ledger import Ledger
from tests.dashboard.server_proc import dashboard_server, write_config
from tests.dashboard.sse_client import frames, take
from tests.helpers.ledger import queue_job
from tests.helpers.proc import ROOT, free_port

pytestmark = pytest.mark.timeout(120)


READ = """
import json, sys
from pathlib import Path
from dashboard import reader
conn = reader.connect(Path(sys.argv[1]))
with reader.read_transaction(conn):
    print(json.dumps({"frozen": conn.frozen, "names": [j["name"] for j in reader.active_jobs(conn)],
                      "last": reader.last_event_id(conn)}))
"""


def _read_through_ro_mount(folder: Path, ledger: Path) -> dict[str, object]:
    script = (
        f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
        f"! touch {folder}/probe 2>/dev/null && {sys.executable} -c '{READ}' {ledger}"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.fixture
def can_mount(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only bind mount")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {tmp_path} {tmp_path}"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces unavailable here: {probe.stderr.decode().strip()}")


def test_read_only_state_dir_with_daemon_running_and_stopped(can_mount: None, tmp_path: Path) -> None:
    state = tmp_path / "var"
    path = state / "ledger.sqlite3"
    daemon = Ledger(path)
    queue_job(daemon, "first")
    queue_job(daemon, "second")
    # the daemon runs: -wal and -shm exist, a plain mode=ro connection sees every commit
    seen = _read_through_ro_mount(state, path)
    assert seen == {"frozen": False, "names": ["first", "second"], "last": 4}
    # the daemon stopped cleanly: no -wal/-shm, and SQLite could not create -shm in a read-only folder
    daemon.close()
    assert not Path(f"{path}-wal").exists()
    seen = _read_through_ro_mount(state, path)
    assert seen == {"frozen": True, "names": ["first", "second"], "last": 4}


def test_live_stream_from_a_read_only_state_dir(can_mount: None, tmp_path: Path, outbox: Path) -> None:
    """The dashboard runs with the state folder read-only (as under its systemd unit); the daemon
    has stopped cleanly. The page still shows the ledger, and follows the daemon when it returns."""
    state = tmp_path / "var"
    path = state / "ledger.sqlite3"
    daemon = Ledger(path)
    queue_job(daemon, "before")
    daemon.close()
    port = free_port()
    config = write_config(tmp_path / "infinitetalk.toml", state_dir=state, outbox=outbox, port=port)

    def in_read_only_namespace(argv: list[str]) -> list[str]:
        inner = f"mount --bind {state} {state} && mount -o remount,bind,ro {state} && exec {shlex.join(argv)}"
        return ["unshare", "-m", "sh", "-c", inner]

    with dashboard_server(config, port, tmp_path / "dash.log", wrap=in_read_only_namespace) as (url, _):
        assert [j["name"] for j in httpx.get(url + "/api/jobs").json()["jobs"]] == ["before"]
        with httpx.Client(timeout=30) as client, client.stream("GET", url + "/events") as response:
            stream = frames(response.iter_lines())
            snapshot = take(stream, 3)[-1]
            assert snapshot.event == "snapshot" and snapshot.id == "2"
            daemon = Ledger(path)  # the daemon starts again and takes a job
            try:
                job = queue_job(daemon, "after")
                got = take(stream, 2)
            finally:
                daemon.close()
    assert [f.event for f in got] == ["created", "queued"] and [f.id for f in got] == ["3", "4"]
    assert got[1].json()["job"]["id"] == job.id


def test_other_user_reads_through_a_read_only_shm(tmp_path_factory: pytest.TempPathFactory) -> None:
    """As deployed: the dashboard runs as another user that may read the daemon's files but not
    write the state folder. While the daemon runs it reads through the daemon's `-shm` (read-only
    to it); after a clean stop it falls back to the frozen ledger."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as another user")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="it-ro-", dir="/tmp"))  # pytest's tmp is 0700: nobody could not enter
    try:
        base.chmod(0o755)
        state = base / "var"
        state.mkdir(mode=0o755)
        path = state / "ledger.sqlite3"
        old = os.umask(0o022)
        try:
            daemon = Ledger(path)
        finally:
            os.umask(old)
        queue_job(daemon, "first")
        as_nobody = [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-c",
            READ,
            str(path),
        ]

        def read() -> dict[str, object]:
            result = subprocess.run(as_nobody, cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            return dict(json.loads(result.stdout))

        assert read() == {"frozen": False, "names": ["first"], "last": 2}
        queue_job(daemon, "second")  # a commit the reader must see through the shared -shm
        assert read() == {"frozen": False, "names": ["first", "second"], "last": 4}
        daemon.close()
        assert read() == {"frozen": True, "names": ["first", "second"], "last": 4}
        assert sorted(p.name for p in state.iterdir()) == ["ledger.sqlite3"]  # the reader created nothing
    finally:
        shutil.rmtree(base)
