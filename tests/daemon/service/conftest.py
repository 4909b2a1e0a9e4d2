"""Fixtures of the service tests: a daemon tree with the fake pipeline, stopped afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon


@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon tree under tmp_path with the fake pipeline (not started)."""
    d = Daemon(tmp_path)
    yield d
    d.stop()
