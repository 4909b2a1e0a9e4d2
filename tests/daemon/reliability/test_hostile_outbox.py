"""Issue 13, the outbox / ledger / lock holes, against the real daemon process.

- a failing `link()` while publishing (strace error injection: ENOSPC, EDQUOT, EIO) leaves no
  orphan in the outbox, and the retry publishes under the same name;
- `infinitetalk delete` of an old job whose outputs were removed by hand, the name then taken by
  a newer job, leaves the newer job's files alone;
- deleting `state_dir/daemon.lock` does not let a second daemon start on the same state;
- a rejection that finds the outbox full (a tmpfs, the inbox on another filesystem: the move
  is a copy, and copytree raises shutil.Error wrapping ENOSPC) pauses intake instead of killing
  the daemon, and completes once space returns;
- a read-only state dir (or outbox) at start gives one clear line and exit status 73;
- the ledger deleted or replaced while the daemon runs stops it (exit 65) with a saved copy,
  a restart without the ledger refuses while claimed jobs exist, and the saved copy restores all.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.reliability import harness
from tests.daemon.reliability.harness import drop, visible
from tests.helpers.daemon import Daemon
from tests.helpers.proc import wait_until

Factory = Callable[..., Daemon]

needs_strace = pytest.mark.skipif(not shutil.which("strace"), reason="strace injects the link() errors")


def wait_exit(d: Daemon, timeout_s: float) -> int:
    assert d.proc is not None
    try:
        return d.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the daemon is still running after {timeout_s:g} s; log:\n{d.log_tail()}"
        ) from None


def start_log(d: Daemon) -> str:
    """The log of the daemon's latest start."""
    text = d.log.read_text(errors="replace")
    return text[text.rfind("===== start") :]


# ---------------------------------------------------------------------------- 4: link() fails


@needs_strace
@pytest.mark.timeout(240)
@pytest.mark.parametrize("err", ["ENOSPC", "EDQUOT", "EIO"])
def test_a_failing_link_while_publishing_leaves_no_orphan(err: str, daemon_factory: Factory) -> None:
    """The sidecar's link (the third of video, poster, sidecar) fails once: disk full and quota
    are retried and published as `talk.*` exactly once; any other errno fails the job with only
    `talk.error.json` in the outbox. Never an orphan `talk.mp4` / `talk.jpg`, never `talk-2.*`."""
    d = daemon_factory(f"link{err}", max_attempts=3)
    drop(d, "talk", 21)
    d.wrapper = [
        "strace",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=link,linkat",
        "-e",
        f"inject=link,linkat:error={err}:when=3",
    ]
    d.start()
    harness.count("faults injected")
    if err == "EIO":
        row = d.wait_state("talk", ["failed"], timeout_s=120)
        assert row["error_code"] == "publish_error", row
        assert visible(d) == ["talk.error.json"], visible(d)
    else:
        row = d.wait_state("talk", ["done"], timeout_s=120)
        assert "retry" in d.event_kinds(row["id"]), d.event_kinds(row["id"])
        assert visible(d) == ["talk.jpg", "talk.json", "talk.mp4"], visible(d)
    d.wait_idle()
    harness.check_invariants(d)
    harness.tally(d)
    pid = d.main_pid()  # SIGTERM to the daemon itself (strace, its parent, exits with it)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert wait_exit(d, 60) == 0


# ---------------------------------------------------------------------------- 3: delete, name reused


@pytest.mark.timeout(300)
def test_delete_of_an_old_job_keeps_the_newer_job_that_took_its_name(daemon_factory: Factory) -> None:
    # housekeeping (which notices files removed by hand) runs at start and then rarely, so the
    # newer job takes the freed name before the daemon has looked: the window the probe found
    d = daemon_factory("reuse", rescan_s=600.0)
    d.start()
    drop(d, "talk", 31)
    old = d.wait_state("talk", ["done"], timeout_s=120)
    for name in ("talk.mp4", "talk.jpg", "talk.json"):
        (d.outbox / name).unlink()  # removed by hand
    drop(d, "talk", 32)
    new = d.wait_state("talk", ["done"], timeout_s=120, ignore=[old["id"]])
    assert new["output_video"] == old["output_video"]  # the freed name was taken again
    before = {n: harness.sha256(d.outbox / n) for n in ("talk.mp4", "talk.jpg", "talk.json")}
    out = d.cli("delete", old["id"])
    assert out.returncode == 0, out.stderr
    assert "not provably this job's" in out.stdout, out.stdout
    assert {n: harness.sha256(d.outbox / n) for n in before} == before  # the newer job's files, intact
    assert d.jobs("talk")[-1]["deleted_at"] is None
    out = d.cli("delete", new["id"])
    assert out.returncode == 0 and "removed 3 output file(s)" in out.stdout, (out.stdout, out.stderr)
    assert visible(d) == []
    harness.count("faults injected")
    d.stop()


# ---------------------------------------------------------------------------- 5: the lock


@pytest.mark.timeout(240)
def test_deleting_daemon_lock_does_not_let_a_second_daemon_in(daemon_factory: Factory) -> None:
    d = daemon_factory("lock")
    d.start()
    (d.state / "daemon.lock").unlink()
    harness.count("faults injected")
    second = d.cli("daemon")
    assert second.returncode == 75, (second.returncode, second.stderr[-2000:])
    assert "another infinitetalk daemon" in second.stderr, second.stderr
    # and the commands still see the first daemon: a request goes to it, answered by it
    drop(d, "after", 41)
    row = d.wait_state("after", ["done"], timeout_s=120)
    out = d.cli("delete", row["id"])
    assert out.returncode == 0, out.stderr
    d.assert_alive()
    d.stop()


# ---------------------------------------------------------------------------- 9: outbox full on reject


@pytest.mark.timeout(300)
def test_a_rejection_into_a_full_outbox_pauses_intake(daemon_factory: Factory, tmpfs: harness.Mount) -> None:
    d = daemon_factory("rejectfull")
    tmpfs(d.outbox, "3m")
    ballast = harness.start_then_fill(
        d, d.outbox, 16 * 1024
    )  # the bundle's WAV (~260 KB) cannot be copied there
    staged = d.inbox / ".bad.staging"
    harness.make_bundle(staged, seed=51, checksums=False, no_such_key=1)  # rejected: unknown key
    os.rename(staged, d.inbox / "bad")

    def paused() -> bool:
        d.assert_alive()
        return "intake paused" in start_log(d)

    wait_until(paused, 60, "intake to pause on the full outbox")
    time.sleep(3)
    d.assert_alive()  # was: shutil.Error not seen as disk full, the daemon exited 1
    assert "outbox" in [line for line in start_log(d).splitlines() if "intake paused" in line][0]
    ballast.unlink()
    row = d.wait_state("bad", ["rejected"], timeout_s=60)
    assert (d.outbox / "bad.error.json").is_file()
    assert (d.outbox / "failed" / "bad" / "job.json").is_file()
    assert not (d.inbox / "bad").exists()
    assert row["error_code"] != "internal", row
    d.wait_idle()
    harness.check_invariants(d)
    d.stop()


@pytest.mark.timeout(300)
def test_a_failure_into_a_full_outbox_waits_for_space(daemon_factory: Factory, tmpfs: harness.Mount) -> None:
    """The same class on the failure path: a job that fails for good (here: its render cannot
    be written, and max_attempts = 1) must copy its inputs to `outbox/failed/`, which is full.
    The daemon stays up, also across a kill -9 and restart, and writes the failure when space
    returns."""
    d = daemon_factory("failfull", max_attempts=1)
    tmpfs(d.outbox, "3m")
    ballast = harness.start_then_fill(d, d.outbox, 16 * 1024)
    drop(d, "doomed", 71)

    def waiting() -> bool:
        d.assert_alive()
        return "written when space returns" in start_log(d)

    wait_until(waiting, 90, "the failure to wait for room in the outbox")
    d.kill9()
    harness.count("kill -9 daemon")
    d.start()  # the unfinished failure is met again at start-up: no crash, it waits
    wait_until(waiting, 30, "the failure to wait for room again after the restart")
    time.sleep(2)
    d.assert_alive()
    ballast.unlink()
    row = d.wait_state("doomed", ["failed"], timeout_s=60)
    assert row["error_code"] == "disk_full", row
    assert (d.outbox / "doomed.error.json").is_file()
    assert (d.outbox / "failed" / "doomed" / "job.json").is_file()
    assert not [n for n in visible(d) if n.endswith(".mp4")]
    d.wait_idle()
    harness.check_invariants(d)
    d.stop()


# ---------------------------------------------------------------------------- 12: read-only at start


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["fresh-state", "used-state", "missing-state", "outbox", "immutable-ledger"])
def test_a_read_only_folder_at_start_gives_one_clear_line(
    case: str, daemon_factory: Factory, tmpfs: harness.Mount
) -> None:
    from daemon.ledger import Ledger

    d = daemon_factory(f"ro-{case}")
    expected = "not writable (Read-only file system)"
    if case == "immutable-ledger":  # the folder is writable, the ledger file is not (even for root)
        Ledger(d.ledger_path).close()
        if subprocess.run(["chattr", "+i", str(d.ledger_path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported here")
        expected = "not writable (attempt to write a readonly database)"
    else:
        folder = d.outbox if case == "outbox" else d.root / "ro" if case == "missing-state" else d.state
        tmpfs(folder, "4m")
        if case == "used-state":
            Ledger(d.ledger_path).close()
            (d.state / "jobs").mkdir()
        if case == "missing-state":
            d.settings["state_dir"] = str(folder / "var")
            d.write_config()
        remount = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
    harness.count("faults injected")
    try:
        d.start(wait_ready=False)
        code = wait_exit(d, 60)
    finally:
        if case == "immutable-ledger":
            subprocess.run(["chattr", "-i", str(d.ledger_path)], check=False)
    log = start_log(d)
    assert code == 73, (code, log)
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines()[1:] if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines


# ---------------------------------------------------------------------------- 18: the ledger replaced


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_the_ledger_changing_under_the_daemon_stops_it(how: str, daemon_factory: Factory) -> None:
    d = daemon_factory(f"ledger-{how}")
    d.start()
    drop(d, "kept", 61)
    done = d.wait_state("kept", ["done"], timeout_s=120)
    if how == "deleted":
        d.ledger_path.unlink()
    else:
        fresh = d.root / "other.sqlite3"
        sqlite3.connect(fresh).execute("CREATE TABLE jobs (id TEXT)").connection.commit()
        os.replace(fresh, d.ledger_path)
    harness.count("faults injected")
    t0 = time.monotonic()
    code = wait_exit(d, 30)
    noticed_s = time.monotonic() - t0
    log = start_log(d)
    assert code == 65, (code, log)
    assert f"was {how}" in log, log
    rescued = sorted(d.state.glob("ledger.sqlite3.rescued-*"))
    assert len(rescued) == 1, log
    harness.count(f"ledger {how}: seconds to stop", round(noticed_s))
    if how == "deleted":
        status = d.cli("status")  # no silent zeros
        assert "ledger" in status.stderr and "missing" in status.stderr, status.stderr
        # a restart without the ledger would orphan the claimed job: it refuses, naming the copy
        d.start(wait_ready=False)
        assert wait_exit(d, 60) == 65
        assert str(rescued[0]) in start_log(d), start_log(d)
    else:
        d.ledger_path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{d.ledger_path}{suffix}").unlink(missing_ok=True)
    os.replace(rescued[0], d.ledger_path)
    d.start()
    row = d.jobs("kept")[-1]
    assert row["id"] == done["id"] and row["state"] == "done", row
    harness.check_invariants(d)
    d.stop()
