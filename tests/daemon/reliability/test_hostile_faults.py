"""Hostile faults, round 2: bad numbers in the config, kills that must not use up a job's
attempts, a render worker stopped with SIGSTOP, and the wall clock stepping under the daemon.

Each test runs the real daemon (`python -m daemon daemon`, tiny model) through the harness. The
wall clock is stepped with `tests/daemon/reliability/fakeclock` (on PYTHONPATH it shifts `time.time()`
by the seconds written in a file, leaving `time.monotonic()` alone, as `date -s` does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon.reliability import harness
from tests.daemon.reliability.harness import drop
from tests.helpers.daemon import Daemon, pid_running
from tests.helpers.proc import wait_until

FAKECLOCK = Path(__file__).resolve().parent / "fakeclock"


def retries(d: Daemon, job_id: str) -> list[dict[str, object]]:
    """The job's `retry` events (one per counted failed attempt), with their data."""
    rows = d.query("SELECT data_json FROM events WHERE job_id = ? AND kind = 'retry' ORDER BY id", (job_id,))
    return [json.loads(r["data_json"]) for r in rows]


def with_line(config: str, line: str) -> str:
    """The config text with `line` ("key = value") replacing that top-level key."""
    key = line.split("=")[0].strip()
    kept = [x for x in config.splitlines() if x.split("=")[0].strip() != key]
    at = kept.index("[defaults]")
    return "\n".join([*kept[:at], line, "", *kept[at:]]) + "\n"


def log_since(d: Daemon, mark: int) -> str:
    return d.log.read_text(errors="replace")[mark:]


# ---------------------------------------------------------------------------- 11: config numbers


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("tick_s = inf", "tick_s must be a finite number"),
        ("max_file_mb = nan", "max_file_mb must be a finite number"),
        ("retry_backoff_s = -inf", "retry_backoff_s must be a finite number"),
        ("rescan_s = 1e308", "rescan_s must be <= 3600"),
        ("max_queued = 9223372036854775807", "max_queued must be <= 100000"),
    ],
)
def test_a_bad_number_stops_the_start_with_one_line(daemon_factory, line: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory("badnum")
    d.config.write_text(with_line(d.config.read_text(), line))
    d.start(wait_ready=False)
    assert d.proc is not None
    assert d.proc.wait(60) == 78
    text = log_since(d, 0)
    assert needle in text and "Traceback" not in text, text


@pytest.mark.timeout(240)
def test_sighup_with_bad_numbers_keeps_the_config_in_effect(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """tick_s = inf crashed the main loop (OverflowError); nan sizes stalled every job."""
    d: Daemon = daemon_factory("hup")
    d.start()
    good = d.config.read_text()
    assert d.proc is not None
    for n, line in enumerate(["tick_s = inf", "max_file_mb = nan", "settle_s = 1e400", "tick_s = 0"]):
        mark = len(d.log.read_text(errors="replace"))
        d.config.write_text(with_line(good, line))
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_until(
            lambda at=mark: "config not reloaded" in log_since(d, at), 30, f"the daemon to refuse {line!r}"
        )
        time.sleep(1.0)  # a few main-loop turns with whatever the daemon now uses
        d.assert_alive()
        said = [x for x in log_since(d, mark).splitlines() if "config not reloaded" in x]
        assert len(said) == 1 and line.split()[0] in said[0], said
        assert "Traceback" not in log_since(d, mark)
        drop(d, f"after{n}", 500 + n)  # the old config still renders jobs
        d.wait_state(f"after{n}", ["done"], timeout_s=120)
    d.config.write_text(good)
    assert d.stop() == 0


# ---------------------------------------------------------------------------- 13: attempts


@pytest.mark.timeout(420)
def test_daemon_kills_do_not_use_up_the_attempts(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """The probe: kill -9 of the daemon mid-render, three times, then of the worker once, with
    max_attempts = 3. Each daemon kill used to count an attempt (the start-up requeue kept it),
    so the worker kill failed the job `worker_crash` on its 5th attempt."""
    d: Daemon = daemon_factory("attempts", max_attempts=3)
    drop(d, "patient", 31, sample_steps=40)
    for _ in range(3):
        d.start()
        d.wait_state("patient", ["running"], timeout_s=120)
        time.sleep(0.5)
        d.kill9()
        harness.count("kill -9 daemon")
        [row] = d.jobs("patient")
        assert row["state"] == "running"
    d.start()
    d.wait_state("patient", ["running"], timeout_s=120)
    wait_until(d.worker_pid, 30, "the render worker")
    os.kill(d.worker_pid(), signal.SIGKILL)  # type: ignore[arg-type]
    harness.count("kill -9 worker")
    row = d.wait_state("patient", ["done"], timeout_s=240)
    crashes = retries(d, row["id"])
    assert [r.get("error_code") for r in crashes] == ["worker_crash"], crashes
    # one counted failure (the worker's death), so the job is done on its second attempt
    assert row["attempts"] == 2 == len(crashes) + 1, (row["attempts"], crashes)
    sidecar = json.loads(Path(row["output_json"]).read_text())
    assert sidecar["attempts"] == 2
    harness.check_invariants(d)
    assert d.stop() == 0


@pytest.mark.timeout(300)
def test_start_up_requeue_respects_the_attempt_cap(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """A job left running after 2 counted failures when max_attempts is lowered to 2 fails at
    the next start (`attempts_exhausted`) instead of running a 3rd time."""
    d: Daemon = daemon_factory("cap", max_attempts=5, retry_backoff_s=0.2)
    drop(d, "poison", 41, sample_steps=40)
    d.start()
    job_id = d.wait_state("poison", ["running"], timeout_s=120)["id"]
    for attempt in (1, 2):
        wait_until(
            lambda n=attempt: (
                d.jobs("poison")[0]["state"] == "running" and d.jobs("poison")[0]["attempts"] == n
            ),
            120,
            f"attempt {attempt} to run",
        )
        pid = wait_until(d.worker_pid, 30, "the render worker")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda n=attempt: len(retries(d, job_id)) == n, 60, f"retry {attempt} to be recorded")
    wait_until(lambda: d.jobs("poison")[0]["attempts"] == 3, 120, "the third attempt to start")
    d.wait_state("poison", ["running"], timeout_s=60)
    d.kill9()
    d.settings["max_attempts"] = 2
    d.write_config()
    d.start(wait_ready=False)
    row = d.wait_state("poison", ["failed"], timeout_s=120)
    assert row["error_code"] == "attempts_exhausted" and row["attempts"] == 3, row
    assert "2 failed attempts" in row["error_message"]
    d.wait_ready()
    harness.check_invariants(d)
    assert d.stop() == 0


# ---------------------------------------------------------------------------- 16: stopped worker


@pytest.mark.timeout(300)
def test_a_stopped_worker_is_killed_and_its_job_retried(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory("sigstop", worker_stall_s=6.0)
    drop(d, "frozen", 51, sample_steps=40)
    d.start()
    row = d.wait_state("frozen", ["running"], timeout_s=120)
    pid = wait_until(d.worker_pid, 30, "the render worker")
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    harness.count("SIGSTOP worker")
    try:
        wait_until(lambda: retries(d, row["id"]), 60, "the stalled attempt to be given up")
    finally:
        try:  # the daemon has killed it by now; if not, do not leave a stopped process behind
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    noticed_s = time.monotonic() - stopped_at
    [retry] = retries(d, row["id"])
    assert 6.0 <= noticed_s < 30, noticed_s
    harness.count("seconds from SIGSTOP to the retry (worker_stall_s = 6)", round(noticed_s))
    assert not pid_running(pid), "the stopped worker was not killed"
    done = d.wait_state("frozen", ["done"], timeout_s=240)
    assert done["attempts"] == 2
    assert retry.get("error_code") == "worker_stall", retry
    assert "sent no heartbeat" in d.log.read_text(errors="replace")
    harness.count("stalled workers killed")
    harness.check_invariants(d)
    assert d.stop() == 0


# ---------------------------------------------------------------------------- 15: clock steps


def _step_wall_clock(offset_file: Path, seconds: float) -> None:
    tmp = offset_file.with_suffix(".tmp")
    tmp.write_text(f"{seconds}\n")
    os.replace(tmp, offset_file)
    time.sleep(0.3)  # the fake clock reads the file again every 50 ms


def _clocked_daemon(daemon_factory, tmp_path: Path, name: str, **settings: object) -> tuple[Daemon, Path]:  # type: ignore[no-untyped-def]
    offset = tmp_path / "wall-offset"
    offset.write_text("0\n")
    d: Daemon = daemon_factory(name, **settings)
    d.env = {"PYTHONPATH": str(FAKECLOCK), "INFINITETALK_TEST_WALL_OFFSET_FILE": str(offset)}
    d.start()
    return d, offset


@pytest.mark.timeout(300)
def test_wall_clock_forward_does_not_reject_an_upload_in_progress(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """+2 h: an upload in progress was rejected `incomplete` at once (its age was measured on the
    wall clock against incomplete_timeout_s = 1 h)."""
    d, offset = _clocked_daemon(daemon_factory, tmp_path, "clockfwd", incomplete_timeout_s=3600.0)
    # an upload in progress: the job file names a voice track that is not there yet
    staged = d.inbox / ".slow.staging"
    harness.make_bundle(staged, seed=61, checksums=False)
    held = (staged / "voice.WAV").read_bytes()
    (staged / "voice.WAV").unlink()
    os.rename(staged, d.inbox / "slow")
    wait_until(
        lambda: "incomplete upload" in ((d.jobs("slow") or [{}])[0].get("waiting_reason") or ""),
        60,
        "the upload to wait for its voice track",
    )
    _step_wall_clock(offset, 2 * 3600.0)
    time.sleep(4.0)  # several scans (rescan_s = 2, and faster while a job waits)
    [row] = d.jobs("slow")
    assert row["state"] == "waiting", (row["state"], row["error_code"], row["error_message"])
    (d.inbox / "slow" / "voice.WAV").write_bytes(held)  # the upload finishes
    d.wait_state("slow", ["done"], timeout_s=120)
    harness.count("wall clock steps survived")
    harness.check_invariants(d)
    assert d.stop() == 0


@pytest.mark.timeout(300)
def test_wall_clock_back_a_day_does_not_delay_a_retry(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """-1 day: a retry due in seconds (stored as a wall-clock time) waited a day."""
    d, offset = _clocked_daemon(daemon_factory, tmp_path, "clockback", retry_backoff_s=6.0)
    drop(d, "retried", 62, sample_steps=40)
    d.wait_state("retried", ["running"], timeout_s=120)
    pid = wait_until(d.worker_pid, 30, "the render worker")
    os.kill(pid, signal.SIGKILL)
    d.wait_state("retried", ["retry_wait"], timeout_s=60)
    _step_wall_clock(offset, -86400.0)
    stepped = time.monotonic()
    d.wait_state("retried", ["queued", "running", "done"], timeout_s=60)
    assert time.monotonic() - stepped < 30
    done = d.wait_state("retried", ["done"], timeout_s=120)
    assert done["attempts"] == 2
    harness.count("wall clock steps survived")

    # across a restart: the due time stored in the ledger is a day ahead after the step; it is
    # taken as due one backoff (12 s for a second retry) after the daemon first sees it
    drop(d, "restarted", 63, sample_steps=40)
    d.wait_state("restarted", ["running"], timeout_s=120)
    os.kill(wait_until(d.worker_pid, 30, "the render worker"), signal.SIGKILL)
    d.wait_state("restarted", ["retry_wait"], timeout_s=60)
    d.kill9()
    _step_wall_clock(offset, -2 * 86400.0)
    [row] = d.jobs("restarted")
    daemon_now = time.time() - 2 * 86400.0  # the daemon's wall clock from now on
    assert row["state"] == "retry_wait" and row["next_attempt_at"] > daemon_now + 86400 - 60, row
    started = time.monotonic()
    d.start(wait_ready=False)
    d.wait_state("restarted", ["queued", "running", "done"], timeout_s=90)
    assert time.monotonic() - started < 60  # model load (~10-20 s here) + at most one backoff
    assert d.wait_state("restarted", ["done"], timeout_s=120)["attempts"] == 2
    harness.count("wall clock steps survived")
    harness.check_invariants(d)
    assert d.stop() == 0


def test_fakeclock_shifts_the_wall_clock_only(tmp_path: Path) -> None:
    """The test clock itself: time.time() moves with the file, time.monotonic() does not."""
    offset = tmp_path / "wall-offset"
    offset.write_text("86400\n")
    code = (
        "import time, json; t0 = time.time(); m0 = time.monotonic(); import os; "
        "print(json.dumps([t0, m0, time.time_ns() / 1e9]))"
    )
    env = {**os.environ, "PYTHONPATH": str(FAKECLOCK), "INFINITETALK_TEST_WALL_OFFSET_FILE": str(offset)}
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    t0, _m0, ns = json.loads(out.stdout)
    assert 86400 - 5 < t0 - before < 86400 + 5 and abs(ns - t0) < 5
