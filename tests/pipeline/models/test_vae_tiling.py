"""Spatially tiled VAE encode/decode: 1x1 is the single pass, tiles blend within a stated bound,
the blend itself is exact, and the peak-memory formula covers what the ops allocate."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.models.vae import (
    AttentionBlock,
    VAEConfig,
    VaeTiling,
    WanVAE,
    _ramp,
    fit_tiling,
    load_vae,
    tile_spans,
    vae_peak_bytes,
)
from pipeline.tiny_encoders import TINY_VAE
from tests.helpers.parity import rel_err

# Relative L2 error of a tiled result against the single pass, measured on the tiny random VAE
# (base_dim 8, seed 0) for the small inputs below (latents 12x16, so most of a tile is seam):
#   decode 2x2 overlap 2: 0.250 · overlap 4: 0.156 · overlap 6: 0.118 · 3x2 overlap 4: 0.177;
#   encode 2x2 overlap 4: 0.096; a default-initialised base_dim 16 VAE, 8x12 latents, 2x2
#   overlap 4: 0.276. At a 480p chunk's proportions (60x104 latents, overlap 8; not run here, far
#   less of the frame is seam): tiny VAE decode 1x2 0.019, 2x2 0.034, 3x3 0.047, encode 2x2
#   0.021; the base_dim 16 VAE decode 2x2 0.050.
# Random weights make the middle block's whole-frame attention and the convolutions far less
# local than the released VAE's (whose 8-latent-pixel overlap is diffusers' default), so these
# are pessimistic figures; the bounds leave ~20 % on them. With the attention left out, pixels
# a few latent pixels away from the overlaps agree with the single pass to 1e-5 (the blend and
# the tile placement are exact; only the seams differ).
DECODE_RTOL = {2: 0.30, 4: 0.19}  # 2x2 tiles, by overlap
DECODE_3X2_RTOL = 0.21
ENCODE_RTOL = 0.115
LARGER_RTOL = 0.33


@pytest.fixture(scope="module")
def model(weights: Path) -> WanVAE:
    return load_vae(weights, TINY_VAE)


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(16, 2, 12, 16, generator=torch.Generator().manual_seed(1))  # -> [3, 5, 96, 128]


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return torch.rand(3, 5, 96, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1


@pytest.fixture(scope="module")
def decoded(model: WanVAE, latents: torch.Tensor) -> torch.Tensor:
    return model.decode(latents)


def test_one_tile_is_the_single_pass_bit_for_bit(
    model: WanVAE, latents: torch.Tensor, video: torch.Tensor, decoded: torch.Tensor
) -> None:
    assert model.tiling is None
    one = VaeTiling(rows=1, cols=1)
    assert torch.equal(model.decode(latents, one), decoded)
    assert torch.equal(model.encode(video, one), model.encode(video))


def test_tiled_decode_close_to_single_pass(
    model: WanVAE, latents: torch.Tensor, decoded: torch.Tensor
) -> None:
    errors = {}
    for overlap, bound in DECODE_RTOL.items():
        tiled = model.decode(latents, VaeTiling(rows=2, cols=2, overlap=overlap))
        assert tiled.shape == decoded.shape and tiled.dtype == torch.float32
        assert tiled.min() >= -1 and tiled.max() <= 1
        errors[overlap] = rel_err(tiled, decoded)
        assert 0 < errors[overlap] <= bound, (overlap, errors[overlap])
    assert errors[4] < errors[2]  # a wider overlap is closer
    assert rel_err(model.decode(latents, VaeTiling(rows=3, cols=2, overlap=4)), decoded) <= DECODE_3X2_RTOL


def test_tiled_encode_close_to_single_pass(model: WanVAE, video: torch.Tensor) -> None:
    single = model.encode(video)
    tiled = model.encode(video, VaeTiling(rows=2, cols=2, overlap=4))
    assert tiled.shape == single.shape == (16, 2, 12, 16)
    assert rel_err(tiled, single) <= ENCODE_RTOL


def test_model_default_tiling_applies(model: WanVAE) -> None:
    z = torch.randn(16, 1, 4, 6)
    explicit = model.decode(z, VaeTiling(rows=2, cols=2, overlap=1))
    model.tiling = VaeTiling(rows=2, cols=2, overlap=1)
    try:
        assert torch.equal(model.decode(z), explicit) and not torch.equal(
            explicit, model.decode(z, VaeTiling())
        )
    finally:
        model.tiling = None


def test_blend_is_exact_away_from_the_seams(model: WanVAE, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the whole-frame attention only convolutions remain, whose reach is local: pixels
    a few latent pixels away from the overlap come out as in the single pass (two latent frames:
    each tile's own feature cache carries time), so tile placement, cropping and the blend
    weights are exact; what differs is confined to the seam."""
    monkeypatch.setattr(AttentionBlock, "forward", lambda self, x, cache=None: x)
    z = torch.randn(16, 2, 4, 48, generator=torch.Generator().manual_seed(4))
    single = model.decode(z)
    tiled = model.decode(z, VaeTiling(rows=1, cols=2, overlap=8))
    assert tile_spans(48, 2, 8) == [(0, 28), (20, 48)]  # the overlap: latent columns 20..27
    diff = (tiled - single).abs().amax(dim=(0, 1, 2))  # per pixel column
    far = torch.cat([diff[: 14 * 8], diff[34 * 8 :]])  # 6 latent columns or more from the overlap
    assert far.max() <= 1e-5, far.max()
    assert diff[20 * 8 : 28 * 8].max() > 1e-2  # the seam does differ (the test can see it)


def test_larger_random_vae() -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(base_dim=16)).eval().requires_grad_(False)
    z = torch.randn(16, 2, 8, 12, generator=torch.Generator().manual_seed(3))
    err = rel_err(vae.decode(z, VaeTiling(rows=2, cols=2, overlap=4)), vae.decode(z))
    assert err <= LARGER_RTOL, err


@pytest.mark.parametrize(
    ("size", "n", "overlap"), [(60, 2, 8), (104, 3, 8), (7, 2, 2), (16, 4, 0), (9, 1, 8)]
)
def test_spans_cover_with_the_overlap_and_weights_sum_to_one(size: int, n: int, overlap: int) -> None:
    spans = tile_spans(size, n, overlap)
    assert len(spans) == n and spans[0][0] == 0 and spans[-1][1] == size
    assert len({e - s for s, e in spans}) == 1  # equal lengths
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end - start >= overlap
    for scale in (1, 8):
        total = torch.zeros(size * scale)
        for i, (s, e) in enumerate(spans):
            total[s * scale : e * scale] += _ramp(spans, i, scale)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_bad_tilings_name_the_values(model: WanVAE) -> None:
    with pytest.raises(ValueError, match="rows=0"):
        VaeTiling(rows=0, cols=2)
    with pytest.raises(ValueError, match="overlap=-1"):
        VaeTiling(overlap=-1)
    with pytest.raises(ValueError, match="cannot cut 2 latent pixels into 3 tiles"):
        model.decode(torch.zeros(16, 1, 2, 4), VaeTiling(rows=3, cols=1))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops allocate under this mode (op granularity):
    each new storage counts from the op that made it until the last tensor on it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, list[int]] = {}  # data_ptr -> [tensors alive, bytes]

    def _drop(self, ptr: int) -> None:
        ref = self.refs[ptr]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self.refs[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if torch.is_tensor(a)
        }
        for t in tree_flatten(out)[0]:
            if not torch.is_tensor(t):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.refs:
                self.refs[ptr][0] += 1
            elif ptr in inputs or storage.nbytes() == 0:
                continue  # a view or in-place result of a tensor made outside
            else:
                self.refs[ptr] = [1, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._drop, ptr)
        return out


@pytest.mark.parametrize(
    ("op", "tiles"), [("decode", None), ("decode", (2, 2)), ("encode", None), ("encode", (1, 2))]
)
def test_peak_formula_covers_the_measured_peak(model: WanVAE, op: str, tiles: tuple[int, int] | None) -> None:
    """The formula in pipeline.models.vae against the counted peak (CPU, float32, tiny VAE)."""
    tiling = VaeTiling(rows=tiles[0], cols=tiles[1], overlap=2) if tiles else None
    z = torch.randn(16, 2, 12, 16)
    x = torch.rand(3, 5, 96, 128) * 2 - 1
    gc.collect()
    with LiveBytes() as counter:
        model.decode(z, tiling) if op == "decode" else model.encode(x, tiling)
    estimate = vae_peak_bytes(
        (2, 12, 16), op=op, tiling=tiling, dtype=torch.float32, cfg=TINY_VAE, device_type="cpu"
    )
    low = 0.9 if op == "decode" else 0.8  # encode counts a copy of the input a float32 input skips
    assert low * estimate <= counter.peak <= estimate, (counter.peak, estimate)


def test_peak_figures_of_the_released_vae() -> None:
    gib = 2**30
    chunk = (21, 60, 104)  # 81 frames at 480x832
    assert vae_peak_bytes(chunk) / gib == pytest.approx(3.84, abs=0.01)  # H200 measured 3.80
    assert vae_peak_bytes(chunk, tiling=VaeTiling(rows=2, cols=2)) / gib == pytest.approx(1.49, abs=0.01)
    fp32 = vae_peak_bytes(chunk, dtype=torch.float32)
    assert fp32 > vae_peak_bytes(chunk, dtype=torch.float32, device_type="cpu")  # CUDA fp32 margin
    with pytest.raises(ValueError, match="op must be"):
        vae_peak_bytes(chunk, op="both")


def test_fit_tiling_takes_the_fewest_tiles_that_fit() -> None:
    gib = 2**30
    chunk = (21, 60, 104)
    assert fit_tiling(chunk, 8 * gib) == VaeTiling(rows=1, cols=1)
    two = fit_tiling(chunk, int(1.6 * gib))
    assert two.rows * two.cols == 4 and vae_peak_bytes(chunk, tiling=two) <= 1.6 * gib
    assert fit_tiling(chunk, 1 * gib).rows * fit_tiling(chunk, 1 * gib).cols > 4
    with pytest.raises(ValueError, match=r"needs 0\.\d\d GiB .* more than the 0\.20 GiB"):
        fit_tiling(chunk, int(0.2 * gib))
