"""kill -9 of the daemon and of its render worker, at chosen and at random points.

Chosen points use strace's fault injection on the daemon's main process only: the syscall that
takes a job (the rename of the bundle out of the inbox) or publishes it (the first hard link
into the outbox) runs, then the process is held there while the test kills it. That lands the
kill exactly between the filesystem step and the ledger step that should follow it.

Random points: many rounds of "start, wait a random time, kill -9 the daemon or the worker",
with the default max_attempts = 3. Afterwards every job is done exactly once (or still queued),
its attempts count only the render-worker deaths it was under (a kill of the daemon is not the
job's fault), a job fails only after max_attempts of those, the outbox holds no partial or
orphan result, and the ledger and the folders agree (`harness.check_invariants`).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.reliability import harness
from tests.daemon.reliability.harness import drop
from tests.helpers.daemon import Daemon
from tests.helpers.proc import wait_until

SEED = int(os.environ.get("RELIABILITY_SEED", "20261125"))
HOLD_US = 20_000_000  # strace holds the daemon 20 s after the chosen syscall; the test kills it first

needs_strace = pytest.mark.skipif(
    not shutil.which("strace"),
    reason="strace is needed to stop the daemon at an exact syscall (apt-get install strace)",
)


def hold_after(syscalls: str, nth: int = 1) -> list[str]:
    """strace prefix: let the nth call of `syscalls` run, then hold the process before returning."""
    return [
        "strace",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        f"trace={syscalls}",
        "-e",
        f"inject={syscalls}:delay_exit={HOLD_US}:when={nth}",
    ]


def assert_done_once(d: Daemon, names: list[str]) -> None:
    for name in names:
        rows = d.jobs(name)
        done = [r for r in rows if r["state"] == "done"]
        assert len(done) == 1, (
            f"{name}: {[(r['id'], r['state'], r['error_code'], r['error_message']) for r in rows]}"
        )
        videos = sorted(p.name for p in d.outbox.glob(f"{name}*.mp4"))
        assert videos == [f"{name}.mp4"], f"{name} published as {videos}"


def _claim_renamed(d: Daemon) -> bool:
    return not (d.inbox / "claimed").exists() and any((d.state / "jobs").glob("*/input"))


def _in_outbox(file: str) -> Callable[[Daemon], bool]:
    return lambda d: (d.outbox / file).exists()


@needs_strace
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("name", "seed", "syscalls", "nth", "ran", "state"),
    [
        pytest.param(
            "claimed", 1, "rename,renameat,renameat2", 1, _claim_renamed, None, id="after-claim-rename"
        ),
        pytest.param(
            "published", 3, "link,linkat", 1, _in_outbox("published.mp4"), "running", id="after-video-link"
        ),
        pytest.param(
            "published", 5, "link,linkat", 3, _in_outbox("published.json"), "running", id="after-sidecar-link"
        ),
    ],
)
def test_kill9_right_after_a_filesystem_step(  # type: ignore[no-untyped-def]
    name: str,
    seed: int,
    syscalls: str,
    nth: int,
    ran: Callable[[Daemon], bool],
    state: str | None,
    daemon_factory,
    tmp_path: Path,
) -> None:
    """kill -9 after a filesystem step, before the ledger step that follows it: the bundle has left
    the inbox for the state dir and the ledger does not know yet (claim), or the video (or all
    three files) got its outbox name and the ledger does not say done (publish). The next start
    finishes the job, once."""
    d: Daemon = daemon_factory(f"{name}{nth}")
    drop(d, name, seed)
    d.wrapper = hold_after(syscalls, nth)
    d.start(wait_ready=False)
    wait_until(lambda: ran(d), 120, f"the daemon to run {syscalls} (call {nth}) for {name}")
    if state is not None:
        time.sleep(0.3)
        assert d.jobs(name)[0]["state"] == state
    d.kill9()
    harness.count("kill -9 daemon")
    harness.count("faults injected")
    d.wrapper = []
    d.start()
    d.wait_state(name, ["done"], timeout_s=120)
    d.wait_idle()
    assert_done_once(d, [name])
    harness.check_invariants(d)
    harness.tally(d)
    d.stop()


@pytest.mark.timeout(420)
def test_kill9_daemon_and_worker_at_random_points(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Rounds of start / random wait / kill -9 (daemon or worker) while jobs arrive; then finish."""
    rng = random.Random(SEED)
    d: Daemon = daemon_factory("random", max_running=2)  # max_attempts = 3, the default
    names: list[str] = []
    seed = 1000
    for _round in range(int(os.environ.get("RELIABILITY_KILL_ROUNDS", "8"))):
        for _ in range(rng.randint(1, 2)):
            seed += 1
            names.append(f"r{seed}")
            drop(d, names[-1], seed)
        d.start(wait_ready=False)
        victim = rng.choice(["daemon", "daemon", "worker"])
        if victim == "worker":
            d.wait_ready()
            time.sleep(rng.uniform(0.0, 4.0))
            pid = d.worker_pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                harness.count("kill -9 worker")
            time.sleep(rng.uniform(0.5, 3.0))  # the daemon notices, retries, starts a new worker
            d.assert_alive()
            victim = "daemon"  # and then the daemon too, so the next round restarts it
        else:
            time.sleep(rng.uniform(1.0, 14.0))  # from intake and model load to renders and publishing
        d.kill9()
        harness.count("kill -9 daemon")
        harness.check_invariants(d, idle=False)
        for row in d.jobs():
            assert row["attempts"] <= 3, row  # max_attempts; daemon kills used to add one each
            if row["state"] == "failed":  # legitimate only after 3 worker deaths under the job
                assert row["error_code"] == "worker_crash" and row["attempts"] == 3, row
            else:
                assert row["state"] in ("waiting", "queued", "running", "retry_wait", "done"), row
    d.start()
    d.wait_idle(timeout_s=240)
    max_attempts = 3
    gave_up: list[str] = []
    for name in names:
        row = d.wait_state(name, ["done", "failed"], timeout_s=60)
        crashes = d.query(
            "SELECT COUNT(*) AS n FROM events WHERE job_id = ? AND kind = 'retry'", (row["id"],)
        )[0]["n"]
        facts = (name, row["state"], row["attempts"], crashes, row["error_code"], row["error_message"])
        if row["state"] == "done":  # each attempt but the last ended in a counted worker crash
            assert row["attempts"] == crashes + 1 <= max_attempts, facts
        else:  # only a job that was under max_attempts worker deaths may fail
            assert row["error_code"] == "worker_crash", facts
            assert row["attempts"] == max_attempts == crashes + 1, facts
            gave_up.append(name)
        harness.count("attempts counted", row["attempts"])
    assert_done_once(d, [n for n in names if n not in gave_up])
    counts = harness.check_invariants(d)
    assert counts.get("done", 0) == len(names) - len(gave_up), counts
    tally = harness.tally(d)
    assert tally["lost"] == len(gave_up) and tally["duplicates"] == 0, tally
    d.stop()
