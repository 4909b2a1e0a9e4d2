"""fp8 e4m3 weight-only linear layers: round trip, layer output, runtime quantization rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.quant import FP8, Fp8Linear, quantize_fp8
from pipeline.weights import quantize_linears

#: e4m3 keeps 3 mantissa bits: per-element relative rounding <= 1/16; over a matrix the relative
#: L2 error is about 2.5 % (measured); these bounds leave a margin.
ROUND_TRIP_BOUND = 0.04
LAYER_BOUND = 0.04


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_round_trip_error_is_bounded() -> None:
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    data, scale = quantize_fp8(w, scale_dtype=torch.float32)
    assert data.dtype == FP8 and scale.shape == (64, 1)
    assert rel(data.float() * scale, w) < ROUND_TRIP_BOUND
    assert data.float().abs().amax() == 448  # each row uses the full e4m3 range


def test_fp8_linear_close_to_linear() -> None:
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(48, 32)
    nn.init.normal_(linear.weight, generator=gen)
    data, scale = quantize_fp8(linear.weight.detach(), scale_dtype=torch.float32)
    layer = Fp8Linear(data, scale, linear.bias.detach(), compute_dtype=torch.float32)
    x = torch.randn(5, 48, generator=gen)
    with torch.no_grad():
        assert rel(layer(x), linear(x)) < LAYER_BOUND


def test_fp8_linear_rejects_bad_tensors() -> None:
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8Linear(torch.zeros(4, 4), torch.ones(4, 1), None, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"scale must be \[4, 1\]"):
        Fp8Linear(torch.zeros(4, 4).to(FP8), torch.ones(4), None, compute_dtype=torch.float32)


def test_runtime_quantization_skips_odd_sizes_and_other_prefixes() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 24))])
    model.head = nn.Linear(32, 32)
    assert quantize_linears(model, prefix="blocks.") == 1  # 24 outputs: not a multiple of 16
    assert isinstance(model.blocks[0][0], Fp8Linear)
    assert isinstance(model.blocks[0][1], nn.Linear) and isinstance(model.head, nn.Linear)


@pytest.mark.gpu
def test_scaled_mm_close_to_dequantized() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(256, 128, generator=gen)
    data, scale = quantize_fp8(w)
    layer = Fp8Linear(data, scale, None, compute_dtype=torch.bfloat16).cuda()
    x = torch.randn(64, 128, generator=gen).cuda().bfloat16()
    ref = layer(x).float()
    layer.use_scaled_mm = True
    assert rel(layer(x).float(), ref) < 0.05
