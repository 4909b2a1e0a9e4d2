"""Parity of our DiT with the reference InfiniteTalk DiT, on the tiny weights (seed 0).

The fixtures were produced by running the reference code from MeiGen-AI/InfiniteTalk on the CPU
(`tools/parity/make_dit_fixtures.py`, see docs/parity.md). Bound: relative error <= 1e-4 in
float32 (measured: about 1e-7).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_model_config
from pipeline.weights import LORA_FILE, load_dit
from pipeline.weights_check import dit_files_digest
from tests.helpers.parity import read_fixture, rel_err

INPUTS = ("x", "t", "context", "clip_fea", "y", "audio", "ref_target_masks")
RTOL = 1e-4


@pytest.fixture(scope="module")
def dit_cfg(tiny_weights_dir: Path):
    return load_model_config(tiny_weights_dir).dit


def test_fixtures_match_the_tiny_weights(tiny_weights_dir: Path) -> None:
    _, meta = read_fixture("dit_single")
    assert meta["dit_files_sha256"] == dit_files_digest(tiny_weights_dir), (
        "tiny DiT weights changed since the fixtures were made: rerun tools/parity/make_dit_fixtures.py"
    )


@pytest.mark.parametrize(("name", "variant"), [("dit_single", "single"), ("dit_multi", "multi")])
@pytest.mark.parametrize("rope", ["exact", "fast"])
def test_dit_matches_reference(tiny_weights_dir: Path, dit_cfg, name: str, variant: str, rope: str) -> None:
    data, _ = read_fixture(name)
    model = load_dit(
        tiny_weights_dir, dit_cfg, variant=variant, dtype=torch.float32, rope=rope, attention_backend="sdpa"
    )
    with torch.no_grad():
        out = model(**{k: data[k] for k in INPUTS})
    assert out.dtype == torch.float32 and out.shape == data["out"].shape
    assert rel_err(out, data["out"]) <= RTOL


def test_lora_merge_matches_reference(tiny_weights_dir: Path, dit_cfg) -> None:
    data, meta = read_fixture("lora")
    model = load_dit(
        tiny_weights_dir,
        dit_cfg,
        dtype=torch.float32,
        lora=tiny_weights_dir / LORA_FILE,
        lora_scale=float(meta["lora_scale"]),
        attention_backend="sdpa",
    )
    state = model.state_dict()
    for key in (k for k in data if k.startswith("merged.")):
        assert rel_err(state[key.removeprefix("merged.")], data[key]) <= 1e-6, key
    with torch.no_grad():
        out = model(**{k: data[k] for k in INPUTS})
    assert rel_err(out, data["out"]) <= RTOL
