"""Shared test options and fixtures.

`--gpu` enables tests marked `gpu` (they need CUDA). Everything else runs on a 2-core CPU with
tiny random weights that the project writes itself (nothing is downloaded).
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete weights folder in the released layout with tiny random tensors (seed 0)."""
    from pipeline.tiny import write_tiny_weights

    out = tmp_path_factory.mktemp("weights")
    write_tiny_weights(out, seed=0)
    return out
