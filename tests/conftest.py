"""Shared test options and fixtures.

`--gpu` enables tests marked `gpu` (they need CUDA). Everything else runs on a 2-core CPU with
tiny random weights that the project writes itself (nothing is downloaded).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", help="run tests that need a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="needs --gpu and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Code under test may call `configure_logging` in-process (the worker, the Ray actor): put
    the root logger's level and handlers back, so no test sees another test's logging set-up."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete weights folder in the released layout with tiny random tensors (seed 0)."""
    from pipeline.tiny import write_tiny_weights

    out = tmp_path_factory.mktemp("weights")
    write_tiny_weights(out, seed=0)
    return out
