"""Fixtures of the model tests.

`weights_copy`: a copy of the session's tiny weights folder (`tiny_weights_dir`) a test may change.
`weights`: for the encoder tests (T5, CLIP, VAE, wav2vec2 and the tokenizers), the tiny random
encoders in the released layout, written once a session by the production writer
(`pipeline.tiny_encoders`, seed 0: the seed the parity fixtures were made with).
`ref` / `ref_meta`: the tensors and metadata of the parity fixture a test module names in its
`PARITY` constant (`"encoders_clip"` reads `tests/fixtures/parity/encoders_clip.safetensors`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.tiny_encoders import write_tiny_encoders
from tests.helpers.parity import read_fixture


@pytest.fixture()
def weights_copy(tiny_weights_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "w"
    shutil.copytree(tiny_weights_dir, out)
    return out


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("encoders")
    write_tiny_encoders(out, seed=0)
    return out


@pytest.fixture(scope="module")
def _parity(request: pytest.FixtureRequest) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    name = getattr(request.module, "PARITY", None)
    assert isinstance(name, str), f"{request.module.__name__} uses ref/ref_meta but sets no PARITY name"
    return read_fixture(name)


@pytest.fixture(scope="module")
def ref(_parity: tuple[dict[str, torch.Tensor], dict[str, str]]) -> dict[str, torch.Tensor]:
    return _parity[0]


@pytest.fixture(scope="module")
def ref_meta(_parity: tuple[dict[str, torch.Tensor], dict[str, str]]) -> dict[str, str]:
    return _parity[1]
