"""The daemon as a real process: its heartbeat row, `status --check` before and after a real
`kill -9`, and the failure details (traceback and the worker's last log lines) stored with a
failure and copied into the outbox error JSON."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from daemon import heartbeat
from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle

pytestmark = pytest.mark.timeout(120)


def _bundle(d: Daemon, name: str, **settings: object) -> None:
    staging = d.inbox / f".{name}.tmp"
    make_job_bundle(staging, duration_s=1.0, seed=0, **settings)  # type: ignore[arg-type]
    os.rename(staging, d.inbox / name)


def _beat(d: Daemon) -> dict | None:  # type: ignore[type-arg]
    rows = d.query("SELECT at, pid, state, data_json FROM heartbeat WHERE id = 1")
    return rows[0] if rows else None


def _liveness(d: Daemon) -> heartbeat.Liveness:
    conn = sqlite3.connect(f"file:{d.state / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        return heartbeat.liveness(conn)
    finally:
        conn.close()


def test_heartbeat_every_few_seconds_and_status_check_after_kill_9(daemon: Daemon) -> None:
    daemon.start()
    first = daemon.wait_for(
        lambda: (b := _beat(daemon)) and b["state"] == "ready" and b, 60, "a ready heartbeat"
    )
    assert daemon.proc is not None and first["pid"] == daemon.proc.pid
    workers = json.loads(first["data_json"])["workers"]
    assert workers and workers[0]["model_loaded"] is True and workers[0]["device"] == "cpu"
    # rewritten at least every 5 s
    later = daemon.wait_for(
        lambda: (b := _beat(daemon)) and b["at"] > first["at"] and b, 6, "a newer heartbeat"
    )
    assert later["at"] - first["at"] <= 5.0
    live = _liveness(daemon)
    assert live.up and live.age_s is not None and live.age_s < 5
    ok = daemon.cli("status", "--check")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("daemon up (ready"), ok.stdout

    # a running job when the daemon is killed: status says the daemon is down and exits non-zero
    _bundle(daemon, "slow", prompt="SLOW job", sample_steps=40)
    daemon.wait_state("slow", "running")
    daemon.kill9()
    killed_at = time.time()
    deadline = time.monotonic() + 20
    while (down := daemon.cli("status", "--check")).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert time.time() - killed_at <= heartbeat.STALE_AFTER_S + 5
    assert down.returncode == 3 and "daemon DOWN since" in down.stdout, down.stdout
    listing = daemon.cli("status")
    assert "running?" in listing.stdout  # shown, but not as live


def test_clean_stop_says_stopped(daemon: Daemon) -> None:
    daemon.start()
    daemon.wait_for(lambda: (b := _beat(daemon)) and b["state"] == "ready", 60, "ready")
    assert daemon.stop() == 0
    assert _beat(daemon)["state"] == "stopped"  # type: ignore[index]
    out = daemon.cli("status", "--check")
    assert out.returncode == 3 and out.stdout.startswith("daemon stopped"), out.stdout


def test_failure_detail_in_the_ledger_and_the_error_json(daemon: Daemon) -> None:
    _bundle(daemon, "broken", prompt="BROKEN please")
    daemon.start()
    job = daemon.wait_state("broken", "failed")
    detail = json.loads(job["failure_detail"])
    assert "the fake pipeline is broken for this job" in detail["traceback"]
    assert "Traceback (most recent call last)" in detail["traceback"]
    assert any("fake render: chunk 1 of 3" in line for line in detail["log_tail"]), detail["log_tail"]
    assert detail["attempt"] == 1 and detail["worker"]["device"] == "cpu"
    error = json.loads(Path(job["output_json"]).read_text())
    assert error["failure"]["traceback"] == detail["traceback"]
    assert error["failure"]["log_tail"] == detail["log_tail"]
    # the counters survive retention: a failed job counted once by outcome and error code
    rows = daemon.query("SELECT name, label, value FROM counters")
    assert {"name": "jobs_finished", "label": "failed|render_error", "value": 1.0} in rows
