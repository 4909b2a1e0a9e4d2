"""CLIP visual tower: parity with the reference on tiny random weights, key map, skipped keys, bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.models.clip import (
    CLIP_FILE,
    ClipConfig,
    ImageEncoder,
    _hf_config,
    checkpoint_shapes,
    load_clip,
    map_state_dict,
)
from pipeline.models.released import expected_shapes
from pipeline.tiny_encoders import state_digest, tiny_clip_config
from tests.helpers.parity import rel_err

PARITY = "encoders_clip"  # the reference's tensors, as the `ref` / `ref_meta` fixtures (conftest.py)
PARITY_RTOL = 1e-4
HALF_RTOL = 3e-2  # bf16 / fp16 weights and activations


@pytest.fixture(scope="module")
def encoder(weights: Path) -> ImageEncoder:
    return load_clip(weights, tiny_clip_config(), dtype=torch.float32)


def _expected(cfg: ClipConfig) -> dict[str, tuple[int, ...]]:
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        return expected_shapes(CLIPVisionModel(_hf_config(cfg)))


def test_fixture_was_made_from_these_weights(weights: Path, ref_meta: dict[str, str]) -> None:
    state = torch.load(weights / "Wan2.1-I2V-14B-480P" / CLIP_FILE, weights_only=True)
    assert state_digest(state) == ref_meta["clip_digest"], "tiny CLIP weights changed: rerun tools/parity"


def test_encode_image_matches_reference(encoder: ImageEncoder, ref: dict[str, torch.Tensor]) -> None:
    out = encoder.encode_image_clip(ref["image"])  # [1, 3, 40, 56] in [-1, 1], squashed to 224x224
    assert out.shape == (1, 257, 32)
    assert rel_err(out, ref["out"]) <= PARITY_RTOL


def test_batch_is_independent(encoder: ImageEncoder, ref: dict[str, torch.Tensor]) -> None:
    pair = torch.cat([ref["image"], -ref["image"]])
    out = encoder.encode_image_clip(pair)
    assert rel_err(out[:1], ref["out"]) <= PARITY_RTOL
    assert rel_err(out[1:], ref["out"]) > 1e-2


def test_unused_tensors_are_skipped_by_name() -> None:
    """The released file: every visual tensor of the first 31 blocks used; the rest skipped explicitly."""
    cfg = ClipConfig()
    shapes = checkpoint_shapes(cfg)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 1_193_014_785  # model.md 2.7
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    mapped, skipped = map_state_dict(state, cfg, _expected(cfg), "released layout")
    assert all(
        k.startswith(("textual.", "visual.transformer.31.", "visual.head", "log_scale")) for k in skipped
    )
    assert {"log_scale", "visual.head", "visual.transformer.31.attn.to_qkv.weight"} <= set(skipped)
    assert sum(k.startswith("textual.") for k in skipped) == sum(k.startswith("textual.") for k in shapes)
    assert len(mapped) == len(_expected(cfg))


def test_unknown_and_missing_keys_are_named() -> None:
    cfg = tiny_clip_config()
    state = {k: torch.empty(s, device="meta") for k, s in checkpoint_shapes(cfg).items()}
    state["visual.extra_proj"] = torch.empty(3, device="meta")
    del state["visual.transformer.1.mlp.2.bias"]
    with pytest.raises(RuntimeError, match=r"visual\.extra_proj.*encoder\.layers\.1\.mlp\.fc2\.bias"):
        map_state_dict(state, cfg, _expected(cfg), "bad.pth")


def test_rejects_bad_input(encoder: ImageEncoder) -> None:
    with pytest.raises(ValueError, match=r"got shape \(3, 32, 32\)"):
        encoder.encode_image_clip(torch.zeros(3, 32, 32))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=CLIP_FILE):
        load_clip(tmp_path, tiny_clip_config())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(
    weights: Path, encoder: ImageEncoder, ref: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    half = load_clip(weights, tiny_clip_config(), dtype=dtype)
    out = half.encode_image_clip(ref["image"])
    assert out.dtype == dtype
    assert rel_err(out, encoder.encode_image_clip(ref["image"])) <= HALF_RTOL


@pytest.mark.gpu
def test_cuda_matches_reference(weights: Path, ref: dict[str, torch.Tensor]) -> None:
    for dtype, bound in ((torch.float32, 1e-3), (torch.float16, HALF_RTOL), (torch.bfloat16, HALF_RTOL)):
        enc = load_clip(weights, tiny_clip_config(), device="cuda", dtype=dtype)
        out = enc.encode_image_clip(ref["image"])  # a CPU input is moved to the model's device
        assert out.device.type == "cuda" and out.dtype == dtype
        assert rel_err(out.cpu(), ref["out"]) <= bound
