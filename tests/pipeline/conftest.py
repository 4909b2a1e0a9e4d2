"""Fixtures of the pipeline tests.

`plain_pipe`: the pipeline on the tiny weights (seed 0) in float32 on the CPU without the LoRA,
as the reference ran when it made the sampler parity fixtures (`tools/parity/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:  # the whole pipeline needs Pillow and PyAV; scripts/test-oldest's venv has neither
    from pipeline import InfiniteTalkPipeline


@pytest.fixture(scope="module")
def plain_pipe(tiny_weights_dir: Path) -> InfiniteTalkPipeline:
    from pipeline import InfiniteTalkPipeline

    return InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cpu", dtype=torch.float32, lora=None)
