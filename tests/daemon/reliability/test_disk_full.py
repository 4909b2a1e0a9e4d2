"""Disk full, for real: the outbox or the state dir is a size-limited tmpfs (`mount -t tmpfs -o
size=...`, as root), filled to the last few KiB with a ballast file while a job is rendered or
taken. The job must fail or wait with a clear error, nothing half-written may be published, and
once the ballast is removed the daemon must carry on and render the job exactly once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.daemon.reliability import harness
from tests.daemon.reliability.harness import drop, visible
from tests.helpers.daemon import Daemon
from tests.helpers.proc import wait_until


@pytest.mark.timeout(240)
def test_outbox_full_then_space_returns(daemon_factory, tmpfs: harness.Mount) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory("outboxfull", max_attempts=30, retry_backoff_s=0.5, retry_backoff_max_s=1.0)
    tmpfs(d.outbox, "3m")
    ballast = harness.start_then_fill(d, d.outbox, 16 * 1024)  # too little for a video (~90 KB)
    drop(d, "full-outbox", 11)

    def failed_once() -> bool:
        d.assert_alive()
        return any(
            e["kind"] in ("retry", "failed")
            for e in d.query(
                "SELECT e.kind FROM events e JOIN jobs j ON j.id = e.job_id WHERE j.name = ?",
                ("full-outbox",),
            )
        )

    wait_until(failed_once, 90, "a render into the full outbox to fail")
    row = d.jobs("full-outbox")[-1]
    assert row["error_code"] == "disk_full", row
    assert "No space left" in (row["error_message"] or "") or "ENOSPC" in (row["error_message"] or ""), row
    # nothing half-written is visible: no video, poster or sidecar for the job
    assert not [n for n in visible(d) if n.startswith("full-outbox") and not n.endswith(".error.json")]
    time.sleep(2)
    d.assert_alive()
    ballast.unlink()
    row = d.wait_state("full-outbox", ["done"], timeout_s=120)
    assert Path(row["output_video"]).name == "full-outbox.mp4"
    d.wait_idle()
    harness.check_invariants(d)
    harness.tally(d)
    d.stop()


@pytest.mark.timeout(240)
def test_state_dir_full_then_space_returns(daemon_factory, tmpfs: harness.Mount) -> None:  # type: ignore[no-untyped-def]
    """The ledger and the claimed inputs live in the state dir: fill it while a job arrives."""
    d: Daemon = daemon_factory("statefull", max_attempts=30, retry_backoff_s=0.5, retry_backoff_max_s=1.0)
    tmpfs(d.state, "8m")
    ballast = harness.start_then_fill(d, d.state, 8 * 1024)
    drop(d, "full-state", 12)
    time.sleep(8)  # the daemon sees the job and cannot record or claim it
    d.assert_alive()
    assert "intake paused" in d.log.read_text(errors="replace"), d.log_tail()
    assert not (d.outbox / "full-state.mp4").exists()
    ballast.unlink()
    d.wait_state("full-state", ["done"], timeout_s=120)
    d.wait_idle()
    assert visible(d).count("full-state.mp4") == 1
    harness.check_invariants(d)
    harness.tally(d)
    d.stop()


@pytest.mark.timeout(300)
def test_state_dir_fills_while_a_job_renders(daemon_factory, tmpfs: harness.Mount) -> None:  # type: ignore[no-untyped-def]
    """The state dir fills mid-render: the render's checkpoint and the job's next state change
    cannot be written. The daemon stays up (ledger writes wait for space, logged), publishes
    nothing meanwhile, and once space returns the job ends done exactly once."""
    from tests.helpers.media import make_job_bundle

    d: Daemon = daemon_factory(
        "staterun",
        max_attempts=30,
        retry_backoff_s=0.5,
        retry_backoff_max_s=1.0,
        defaults={"sample_steps": 4},
    )
    tmpfs(d.state, "16m")
    d.start()
    staged = d.inbox / ".long.staging"
    make_job_bundle(staged, kind="image", duration_s=8.0, seed=13, image_size=(48, 40))
    os.rename(staged, d.inbox / "long")

    def rendering() -> bool:
        d.assert_alive()
        rows = d.jobs("long")
        return bool(rows) and rows[-1]["state"] == "running" and (rows[-1]["chunk"] or 0) >= 1

    wait_until(rendering, 90, "the long job to be rendering its first chunks")
    ballast = harness.fill(d.state, 0)
    harness.count("faults injected")

    def waiting() -> bool:
        d.assert_alive()
        return "ledger writes wait until space returns" in d.log.read_text(errors="replace")

    wait_until(waiting, 120, "a state change to wait for space")
    time.sleep(3)
    d.assert_alive()
    assert not (d.outbox / "long.mp4").exists()
    ballast.unlink()
    row = d.wait_state("long", ["done"], timeout_s=180)
    assert Path(row["output_video"]).name == "long.mp4"
    d.wait_idle()
    assert visible(d).count("long.mp4") == 1
    assert "ledger writes go on" in d.log.read_text(errors="replace"), d.log_tail()
    harness.check_invariants(d)
    harness.tally(d)
    d.stop()
