"""Wan VAE: parity with the reference on tiny random weights, causality, errors, bf16 drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.models.vae import VAE_FILE, VAEConfig, WanVAE, checkpoint_shapes, load_vae
from pipeline.tiny_encoders import TINY_VAE, state_digest
from tests.helpers.parity import rel_err

PARITY = "encoders_vae"  # the reference's tensors, as the `ref` / `ref_meta` fixtures (conftest.py)
PARITY_RTOL = 1e-4
BF16_RTOL = 3e-2  # bf16 weights and activations (8-bit mantissa) through ~30 convolutions


@pytest.fixture(scope="module")
def model(weights: Path) -> WanVAE:
    return load_vae(weights, TINY_VAE)


def test_fixture_was_made_from_these_weights(weights: Path, ref_meta: dict[str, str]) -> None:
    state = torch.load(weights / "Wan2.1-I2V-14B-480P" / VAE_FILE, weights_only=True)
    assert ref_meta["seed"] == "0"
    assert state_digest(state) == ref_meta["vae_digest"], "tiny VAE weights changed: rerun tools/parity"


def test_encode_matches_reference(model: WanVAE, ref: dict[str, torch.Tensor]) -> None:
    latents = model.encode(ref["video"])
    assert latents.shape == (16, 3, 4, 6) and latents.dtype == torch.float32
    assert rel_err(latents, ref["encoded"]) <= PARITY_RTOL


def test_decode_matches_reference(model: WanVAE, ref: dict[str, torch.Tensor]) -> None:
    video = model.decode(ref["latents"])
    assert video.shape == (3, 9, 32, 48)
    assert video.min() >= -1 and video.max() <= 1
    assert rel_err(video, ref["decoded"]) <= PARITY_RTOL


def test_encode_is_causal(model: WanVAE, ref: dict[str, torch.Tensor]) -> None:
    """Latent frames depend only on earlier pixel frames: a prefix encodes to a prefix."""
    full = model.encode(ref["video"])
    prefix = model.encode(ref["video"][:, :5])
    assert prefix.shape[1] == 2
    assert rel_err(prefix, full[:, :2]) <= 1e-5


def test_decode_is_causal(model: WanVAE, ref: dict[str, torch.Tensor]) -> None:
    full = model.decode(ref["latents"])
    prefix = model.decode(ref["latents"][:, :2])
    assert prefix.shape[1] == 5
    assert rel_err(prefix, full[:, :5]) <= 1e-5


@pytest.mark.parametrize(
    ("shape", "needle"),
    [((3, 8, 32, 32), "F=8"), ((3, 5, 30, 32), "H=30"), ((4, 5, 32, 32), "(4, 5, 32, 32)")],
)
def test_encode_rejects_bad_shapes(model: WanVAE, shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        model.encode(torch.zeros(shape))


def test_decode_rejects_bad_shapes(model: WanVAE) -> None:
    with pytest.raises(ValueError, match="got shape"):
        model.decode(torch.zeros(8, 2, 4, 4))


def test_load_names_missing_and_unexpected_keys(weights: Path, tmp_path: Path) -> None:
    state = torch.load(weights / "Wan2.1-I2V-14B-480P" / VAE_FILE, weights_only=True)
    state["encoder.extra.weight"] = torch.zeros(1)
    del state["decoder.head.2.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match=r"decoder\.head\.2\.bias.*encoder\.extra\.weight"):
        load_vae(weights, TINY_VAE, path=bad)
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth"):
        load_vae(tmp_path, TINY_VAE)


def test_full_size_layout_matches_release() -> None:
    shapes = checkpoint_shapes(VAEConfig())
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 126_892_531  # model.md 2.7
    assert shapes["encoder.head.2.weight"] == (32, 384, 3, 3, 3)
    assert shapes["conv1.weight"] == (32, 32, 1, 1, 1) and shapes["conv2.weight"] == (16, 16, 1, 1, 1)
    assert shapes["encoder.downsamples.0.residual.0.gamma"] == (96, 1, 1, 1)
    assert shapes["encoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")) == 10


def test_bf16_close_to_fp32(weights: Path, model: WanVAE, ref: dict[str, torch.Tensor]) -> None:
    half = load_vae(weights, TINY_VAE, dtype=torch.bfloat16)
    assert rel_err(half.encode(ref["video"]), model.encode(ref["video"])) <= BF16_RTOL
    assert rel_err(half.decode(ref["latents"]), model.decode(ref["latents"])) <= BF16_RTOL


@pytest.mark.gpu
def test_cuda_bf16_channels_last_matches_reference(weights: Path, ref: dict[str, torch.Tensor]) -> None:
    """The fast GPU setting stays within the bf16 bound of the reference's float32 outputs."""
    fast = load_vae(weights, TINY_VAE, device="cuda", dtype=torch.bfloat16, channels_last=True)
    latents = fast.encode(ref["video"].cuda())
    video = fast.decode(ref["latents"].cuda())
    assert latents.device.type == "cuda" and latents.dtype == torch.float32
    assert rel_err(latents.cpu(), ref["encoded"]) <= BF16_RTOL
    assert rel_err(video.cpu(), ref["decoded"]) <= BF16_RTOL
    exact = load_vae(weights, TINY_VAE, device="cuda")  # float32 (cuDNN may use TF32)
    assert rel_err(exact.decode(ref["latents"].cuda()).cpu(), ref["decoded"]) <= 1e-2
