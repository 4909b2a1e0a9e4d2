"""The endings log one line per state change, the ledger's (`daemon/ledger.py` `_log_change`):
a cancel or a failure adds no second line of its own repeating it. A real SQLite ledger and a
real outbox in tmp_path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.endings import Endings
from daemon.ledger import JobRow, Ledger
from daemon.outbox import Outbox
from tests.helpers.ledger import queue_job, run_job


@pytest.fixture
def endings(tmp_path: Path) -> Iterator[Endings]:
    for name in ("inbox", "outbox", "var"):
        (tmp_path / name).mkdir()
    settings = Settings(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox", state_dir=tmp_path / "var")
    ledger = Ledger(settings.ledger_path)
    outbox = Outbox(settings.outbox)
    outbox.ensure()
    yield Endings(settings, ledger, outbox)
    ledger.close()


def _running(ledger: Ledger, name: str) -> JobRow:
    job = queue_job(ledger, name)
    run_job(ledger, job.id)
    return ledger.get(job.id)


def _lines_of(caplog: pytest.LogCaptureFixture, job_id: str) -> list[tuple[str, str, str]]:
    return [(r.name, r.levelname, r.getMessage()) for r in caplog.records if job_id in r.getMessage()]


def test_a_cancel_logs_only_the_ledger_line(endings: Endings, caplog: pytest.LogCaptureFixture) -> None:
    row = _running(endings.ledger, "alice")
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # the lines of the set-up (queued, running) are not this test's
    endings.cancel(row)
    assert _lines_of(caplog, row.id) == [
        (
            "daemon.ledger",
            "INFO",
            f'job {row.id} "alice" running -> cancelled: cancelled: cancelled by the user',
        )
    ]


def test_a_failure_logs_only_the_ledger_line(endings: Endings, caplog: pytest.LogCaptureFixture) -> None:
    row = _running(endings.ledger, "bob")
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # the lines of the set-up (queued, running) are not this test's
    endings.fail(row, "render_error", "boom")
    assert endings.ledger.get(row.id).state == "failed"
    assert _lines_of(caplog, row.id) == [
        ("daemon.ledger", "ERROR", f'job {row.id} "bob" running -> failed: render_error: boom')
    ]
