"""fp8 GEMM scaling (`[performance] fp8_scaling`): row-wise vs tensor-wise `torch._scaled_mm`.

On the CPU, torch's own `_scaled_mm` runs both modes' math (the layer's CUDA-only guard is
bypassed by calling `_scaled_mm` directly); the selection logic (layers, settings, config) is
checked without a GPU. The `gpu` tests run the real kernels and the VAE's cuDNN mode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from daemon.config import ConfigError, load_settings
from pipeline.bench import kernel_kind
from pipeline.fp8 import set_scaled_mm, to_fp8
from pipeline.loading import LoadOptions, perf_config
from pipeline.perf import PerfConfig
from pipeline.quant import FP8_SCALING, Fp8Linear, quantize_fp8

#: e4m3 operands: ~3.7 % relative error on iid data (measured on the H200 at the DiT's shapes)
BOUND = 0.05


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def layer_and_input(seed: int, rows_spread: float = 0.0) -> tuple[Fp8Linear, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 64, generator=gen) * 0.02
    bias = torch.randn(96, generator=gen) * 0.02
    x = torch.randn(48, 64, generator=gen) * torch.exp(rows_spread * torch.randn(48, 1, generator=gen))
    data, scale = quantize_fp8(w, scale_dtype=torch.float32)
    layer = Fp8Linear(data, scale, bias, compute_dtype=torch.float32)
    return layer, x, x @ w.t() + bias


@pytest.mark.parametrize("spread", [0.0, 1.0])
def test_tensor_scaling_is_as_close_as_row_scaling(spread: float) -> None:
    layer, x, ref = layer_and_input(3, spread)
    errors = {}
    for scaling in FP8_SCALING:
        layer.scaling = scaling
        errors[scaling] = rel(layer._scaled_mm(x), ref)
    assert errors["row"] < BOUND and errors["tensor"] < BOUND, errors
    assert errors["row"] != errors["tensor"]  # two different computations
    assert abs(errors["tensor"] - errors["row"]) < 0.01, errors


def test_tensor_scaling_applies_row_scales_and_bias() -> None:
    layer, x, _ = layer_and_input(4)
    layer.scaling = "tensor"
    doubled = Fp8Linear(layer.weight_fp8, layer.weight_scale * 2, None, compute_dtype=torch.float32)
    doubled.scaling = "tensor"
    plain = Fp8Linear(layer.weight_fp8, layer.weight_scale, None, compute_dtype=torch.float32)
    plain.scaling = "tensor"
    assert torch.allclose(doubled._scaled_mm(x), 2 * plain._scaled_mm(x), rtol=1e-6, atol=1e-7)
    assert layer.bias is not None
    assert torch.allclose(layer._scaled_mm(x) - plain._scaled_mm(x), layer.bias.expand(48, -1), atol=1e-6)


def blocks_model() -> nn.Module:
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))])
    model.norm = nn.LayerNorm(32)  # a parameter outside the quantised blocks (as the DiT's head)
    return model


def test_to_fp8_and_set_scaled_mm_set_every_layer() -> None:
    model = blocks_model()
    assert to_fp8(model, scaled_mm=False, scaling="tensor") == 2
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert [m.scaling for m in layers] == ["tensor", "tensor"]
    assert set_scaled_mm(model, False) == 2  # the default is row
    assert [m.scaling for m in layers] == ["row", "row"]
    with pytest.raises(ValueError, match="'col'"):
        set_scaled_mm(model, False, scaling="col")
    with pytest.raises(ValueError, match="'col'"):
        to_fp8(blocks_model(), scaled_mm=False, scaling="col")


def test_perf_setting_default_and_validation() -> None:
    assert PerfConfig().fp8_scaling == "row" and PerfConfig.plain().fp8_scaling == "row"
    assert PerfConfig(fp8=True, fp8_scaling="tensor").fp8_scaling == "tensor"
    with pytest.raises(ValueError, match="fp8_scaling must be one of .*'col'"):
        PerfConfig(fp8_scaling="col")  # type: ignore[arg-type]


def test_config_key_reaches_the_perf_config(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[performance]\nfp8_scaling = "tensor"\n')
    settings = load_settings(conf, environ={})
    assert settings.performance.fp8_scaling == "tensor"
    perf = dataclasses.asdict(settings.performance) | {"fp8_attention": "off"}
    opts = LoadOptions.from_strings(quant="fp8", perf=perf)
    resolved = perf_config(opts, torch.device("cuda"), "fp8")
    assert resolved is not None and resolved.fp8 and resolved.fp8_scaling == "tensor"
    conf.write_text('[performance]\nfp8_scaling = "col"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(conf, environ={})
    assert "performance.fp8_scaling must be one of row, tensor" in str(info.value)


def test_profile_counts_inductor_kernels_as_fused() -> None:
    """Inductor names kernels after the ops they fuse: the fp8 activation quantisation beside a
    `_scaled_mm` is element-wise work, not GEMM (the profile used to count it as GEMM)."""
    assert kernel_kind("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_t_view_4") == "fused (triton)"
    assert kernel_kind("triton_poi_fused__scaled_dot_product_cudnn_attention_add_7") == "fused (triton)"
    assert kernel_kind("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_bias_TNT") == "gemm"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"


@pytest.mark.gpu
def test_cuda_tensor_scaling_close_to_row_scaling() -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(1024, 512, generator=gen) * 0.02
    x = torch.randn(2048, 512, generator=gen).cuda().bfloat16()
    data, scale = quantize_fp8(w)
    layer = Fp8Linear(
        data, scale, torch.randn(1024, generator=gen) * 0.02, compute_dtype=torch.bfloat16
    ).cuda()
    ref = layer(x).float()  # dequantised weight, bf16 matmul
    layer.use_scaled_mm = True
    out = {}
    for scaling in FP8_SCALING:
        layer.scaling = scaling
        out[scaling] = layer(x).float()
        assert rel(out[scaling], ref) < BOUND, scaling
    assert rel(out["tensor"], out["row"]) < BOUND


@pytest.mark.gpu
def test_cuda_vae_searches_algorithms_in_bf16_only() -> None:
    from pipeline.models.vae import VAEConfig, WanVAE
    from pipeline.perf import apply_vae_perf

    vae = WanVAE(VAEConfig()).cuda()
    apply_vae_perf(PerfConfig.plain(), vae)
    assert torch.backends.cudnn.benchmark is False  # fp32: no multi-GiB search workspaces
    apply_vae_perf(PerfConfig(), vae)
    assert torch.backends.cudnn.benchmark is True
