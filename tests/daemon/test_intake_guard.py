"""One inbox entry that makes the check blow up must not stop intake for the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon import intake as intake_mod
from daemon.config import settings_from_mapping
from daemon.intake import Intake
from daemon.ledger import Ledger
from daemon.outbox import Outbox


def test_unexpected_error_in_one_entry_keeps_the_scan_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from_mapping({"settle_s": 0.0}, base=tmp_path)
    settings.inbox.mkdir(parents=True)
    for name in ("bad", "good"):
        (settings.inbox / name).mkdir()
        (settings.inbox / name / "job.json").write_text(json.dumps({"prompt": "x"}))
    ledger = Ledger(settings.ledger_path)
    intake = Intake(settings, ledger, Outbox(settings.outbox))
    real_check = Intake._check
    checked: list[str] = []

    def flaky_check(self: Intake, entry: intake_mod.inbox_mod.Entry, row: object) -> object:
        checked.append(entry.name)
        if entry.name == "bad":
            raise RuntimeError("boom")
        return real_check(self, entry, row)  # type: ignore[arg-type]

    monkeypatch.setattr(Intake, "_check", flaky_check)
    try:
        intake.scan_once()
    finally:
        intake.close()
    assert sorted(checked) == ["bad", "good"]
    rows = {row.name: row for row in ledger.jobs(["waiting", "rejected", "queued"])}
    assert rows["bad"].state == "waiting"
    assert "internal error while checking: RuntimeError: boom" in (rows["bad"].waiting_reason or "")
    assert rows["good"].state == "rejected"  # its job.json lacks the media: judged normally
