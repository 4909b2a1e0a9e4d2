"""incomplete_timeout_s runs on the monotonic clock: stepping the wall clock (forward or back)
neither rejects an upload early nor keeps it forever (issue 13, item 15). Real files and a real
SQLite ledger; only the two clocks are the test's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.intake import Intake
from daemon.ledger import Ledger
from daemon.outbox import Outbox


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    for name in ("inbox", "outbox", "var"):
        (tmp_path / name).mkdir()
    return Settings(
        inbox=tmp_path / "inbox",
        outbox=tmp_path / "outbox",
        state_dir=tmp_path / "var",
        incomplete_timeout_s=3600.0,
        settle_s=1.0,
    )


def incomplete_bundle(inbox: Path) -> None:
    """A bundle whose job file names a voice track that has not arrived."""
    from tests.helpers.media import make_rgba_png

    bundle = inbox / "slow"
    bundle.mkdir()
    make_rgba_png(bundle / "face.png", width=48, height=40)
    doc = {"prompt": "p", "cond_video": "face.png", "cond_audio": {"person1": "voice.wav"}}
    (bundle / "job.json").write_text(json.dumps(doc))


def scanned(intake: Intake, ledger: Ledger) -> tuple[str, str | None]:
    """The one job's (state, error code) after one more scan of the inbox."""
    intake.scan_once()
    [row] = ledger.jobs()
    return row.state, row.error_code


def test_wall_clock_steps_do_not_move_the_incomplete_timeout(settings: Settings) -> None:
    wall, mono = Clock(1.8e9), Clock(1000.0)
    ledger = Ledger(settings.ledger_path, clock=wall)
    intake = Intake(settings, ledger, Outbox(settings.outbox), clock=mono, wall_clock=wall)
    try:
        incomplete_bundle(settings.inbox)
        assert scanned(intake, ledger) == ("waiting", None)
        wall.now += 2 * 3600  # the wall clock jumps forward 2 h: the upload was not waiting 2 h
        mono.now += 5
        assert scanned(intake, ledger) == ("waiting", None)
        wall.now -= 3 * 86400  # and back 3 days: the timeout still runs out on time
        mono.now += 3600
        assert scanned(intake, ledger) == ("rejected", "incomplete")
    finally:
        intake.close()
        ledger.close()


def test_after_a_restart_at_most_half_the_timeout_counts_as_spent(settings: Settings) -> None:
    wall, mono = Clock(1.8e9), Clock(1000.0)
    ledger = Ledger(settings.ledger_path, clock=wall)
    first = Intake(settings, ledger, Outbox(settings.outbox), clock=mono, wall_clock=wall)
    incomplete_bundle(settings.inbox)
    first.scan_once()
    first.close()
    # a restart: the monotonic clock starts again, the wall clock has moved on 5 hours
    wall.now += 5 * 3600
    mono.now = 10.0
    second = Intake(settings, ledger, Outbox(settings.outbox), clock=mono, wall_clock=wall)
    try:
        assert scanned(second, ledger) == ("waiting", None)
        mono.now += 1700  # 1800 + 1700 < 3600: still waiting
        assert scanned(second, ledger) == ("waiting", None)
        mono.now += 101
        assert scanned(second, ledger) == ("rejected", "incomplete")
    finally:
        second.close()
        ledger.close()
