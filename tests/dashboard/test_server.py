"""`infinitetalk dashboard` under real uvicorn: serves, streams, and stops promptly on SIGTERM
with event streams open (a plain StreamingResponse would hold uvicorn's shutdown open)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from daemon.ledger import Ledger
from tests.dashboard.server_proc import dashboard_server, write_config
from tests.dashboard.sse_client import frames, take
from tests.helpers.ledger import queue_job
from tests.helpers.proc import free_port, infinitetalk

pytestmark = pytest.mark.timeout(90)


def test_serves_and_stops_promptly_with_open_streams(
    tmp_path: Path, ledger: Ledger, state_dir: Path, outbox: Path
) -> None:
    queue_job(ledger, "alice")
    port = free_port()
    config = write_config(tmp_path / "infinitetalk.toml", state_dir=state_dir, outbox=outbox, port=port)
    log = tmp_path / "dashboard.log"
    with dashboard_server(config, port, log) as (url, proc):
        jobs = httpx.get(url + "/api/jobs").json()["jobs"]
        assert [j["name"] for j in jobs] == ["alice"]
        assert "server" not in httpx.get(url + "/healthz").headers  # no server banner

        # two browsers keep /events open
        opened = threading.Barrier(3)
        received: list[list[str]] = [[], []]

        def listen(index: int) -> None:
            with httpx.Client(timeout=None) as c, c.stream("GET", url + "/events") as response:
                stream = frames(response.iter_lines())
                received[index] += [f.event for f in take(stream, 3)]
                opened.wait()
                for frame in stream:  # until the server ends the stream
                    received[index].append(frame.event)

        threads = [threading.Thread(target=listen, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        opened.wait(timeout=30)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        stop_s = time.monotonic() - started
        for t in threads:
            t.join(timeout=5)
    # uvicorn re-raises the SIGTERM it handled after a clean shutdown (systemd counts it as success)
    assert code in (0, -signal.SIGTERM), log.read_text()
    print(f"shutdown with two streams open: {stop_s:.2f} s")
    assert stop_s < 3.0, f"shutdown took {stop_s:.2f} s with two streams open"
    assert all(r[:3] == ["message", "ledger", "snapshot"] for r in received), received
    assert not any(t.is_alive() for t in threads)
    text = log.read_text()
    assert "dashboard on http://127.0.0.1:" in text and "Traceback" not in text
    assert "ERROR" not in text  # every stream ended with a complete response


def test_bad_settings_exit_78(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[dashboard]\nport = 70000\n")
    result = infinitetalk("dashboard", "--config", str(config))
    assert result.returncode == 78
    assert "70000" in result.stderr
