"""Fixtures of the multi-process tests.

`duo_bundle`: a two-speaker job (1.5 s of speech, 2 steps, clip mode, seed 5, a 96x48 picture),
so a render exercises the sequence-parallel region map and the speaker-position bounds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.media import make_job_bundle


@pytest.fixture(scope="module")
def duo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_job_bundle(
        tmp_path_factory.mktemp("job") / "duo",
        kind="two_para",
        duration_s=1.5,
        sample_steps=2,
        mode="clip",
        seed=5,
        image_size=(96, 48),
    )
