"""Fixtures for the dashboard tests: a real ledger written through daemon/ledger.py, a real
outbox, and the app under Starlette's TestClient (jobs are written by tests/helpers/ledger.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from daemon.ledger import Ledger
from dashboard.app import create_app
from dashboard.config import DashboardConfig
from tests.dashboard.cdp import Browser


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    path = tmp_path / "outbox"
    path.mkdir()
    return path


@pytest.fixture
def ledger(state_dir: Path) -> Iterator[Ledger]:
    led = Ledger(state_dir / "ledger.sqlite3")
    yield led
    led.close()


@pytest.fixture
def cfg(state_dir: Path, outbox: Path) -> DashboardConfig:
    return DashboardConfig(ledger_path=state_dir / "ledger.sqlite3", outbox=outbox, poll_s=0.05, ping_s=0)


@pytest.fixture
def client(cfg: DashboardConfig) -> Iterator[TestClient]:
    with TestClient(create_app(cfg), base_url="http://127.0.0.1:8000") as c:
        yield c


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """Headless Chromium with a throw-away profile (tests/dashboard/cdp.py)."""
    b = Browser.start(tmp_path / "chromium-profile")
    yield b
    b.close()
