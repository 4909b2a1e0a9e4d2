"""Fixtures of the daemon unit tests.

`intake`: an `Intake` over a fresh inbox, a real SQLite ledger and an outbox under `tmp_path`,
closed after the test. Its settings are `intake_settings` (no settling time by default); a test
module overrides that fixture to change them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import settings_from_mapping
from daemon.intake import Intake
from daemon.ledger import Ledger
from daemon.outbox import Outbox


@pytest.fixture()
def intake_settings() -> dict[str, object]:
    return {"settle_s": 0.0}


@pytest.fixture()
def intake(tmp_path: Path, intake_settings: dict[str, object]) -> Iterator[Intake]:
    settings = settings_from_mapping(intake_settings, base=tmp_path)
    settings.inbox.mkdir(parents=True)
    ledger = Ledger(settings.ledger_path)
    it = Intake(settings, ledger, Outbox(settings.outbox))
    yield it
    it.close()
    ledger.close()
