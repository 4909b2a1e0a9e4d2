"""fp8 self-attention (`pipeline.models.attention_fp8`) on the CPU.

cuDNN's fp8 kernel needs a Hopper GPU (tests/gpu runs it). Here a CPU stand-in with the kernel's
contract is registered for the custom op: e4m3 q/k/v and their inverse scales in, softmax in
fp32 with P quantised to e4m3 at `P_SCALE`, e4m3 output on v's scale. That checks everything
around the kernel: the centring of k and v (exact), the per-tensor scales, the dequantisation,
the wiring into the DiT and the speed settings that switch it on.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import attention_fp8 as fa

CALLS: list[tuple[int, ...]] = []


def _cpu_kernel(q, k, v, descale_q, descale_k, descale_v):  # type: ignore[no-untyped-def]
    """What cuDNN computes, in fp32 on the CPU ([B, L, N, Dh] e4m3 in, e4m3 out)."""
    CALLS.append(tuple(q.shape))
    qf = q.float() * descale_q.reshape(())
    kf = k.float() * descale_k.reshape(())
    vf = v.float()  # stays on v's scale, as the kernel's output does
    s = torch.einsum("bqnd,bknd->bnqk", qf, kf) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))  # in [0, 1], as after the running-max shift
    denom = p.sum(dim=-1, keepdim=True)
    p8 = (p * fa.P_SCALE).to(fa.FP8).float() / fa.P_SCALE
    o = torch.einsum("bnqk,bknd->bqnd", p8 / denom, vf)
    return o.clamp(-fa.FP8_MAX, fa.FP8_MAX).to(fa.FP8)


torch.library.register_kernel("infinitetalk::cudnn_fp8_sdpa", "cpu", _cpu_kernel)


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)
    )
    return out.transpose(1, 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def qkv(seed: int, offset: float = 0.0, seq: int = 96) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, seq, 4, 32)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    if offset:  # a shared offset per head and channel, as real keys and values have
        k = k + offset * torch.randn(1, 1, 4, 32, generator=g)
        v = v + offset * torch.randn(1, 1, 4, 32, generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def test_quantize_per_tensor_scales_to_the_fp8_range() -> None:
    x = torch.randn(3, 17, 2, 8) * 5
    data, descale = fa.quantize_per_tensor(x)
    assert data.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert float(data.float().abs().max()) == pytest.approx(fa.FP8_MAX)
    assert float(((data.float() * descale) - x).abs().max()) <= float(x.abs().max()) / 16
    zeros, scale = fa.quantize_per_tensor(torch.zeros(4))  # no division by zero
    assert torch.isfinite(scale).all() and not zeros.float().any()


def test_close_to_exact_attention() -> None:
    q, k, v = qkv(0)
    CALLS.clear()
    out = fa.attention_fp8(q, k, v)
    assert [tuple(q.shape)] == CALLS
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert rel(out, exact(q, k, v)) < 0.08  # e4m3 q, k, v, P and o: ~2^-4 each


def test_centring_keeps_shared_offsets_out_of_the_fp8_range() -> None:
    """Keys and values with a large common offset: centring is exact, so the error stays that of
    plain data; quantising the offset data directly loses it to the offset's range."""
    q, k, v = qkv(1, offset=30.0)
    ref = exact(q, k, v)
    err = rel(fa.attention_fp8(q, k, v), ref)
    assert err < 0.08
    q8, dq = fa.quantize_per_tensor(q)
    k8, dk = fa.quantize_per_tensor(k)
    v8, dv = fa.quantize_per_tensor(v)
    uncentred = fa.cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv).float() * dv
    assert rel(uncentred, ref) > 3 * err


def test_cross_lengths_and_bad_shapes() -> None:
    q, _, _ = qkv(2, seq=40)
    _, k, v = qkv(3, seq=72)
    assert rel(fa.attention_fp8(q, k, v), exact(q, k, v)) < 0.08
    with pytest.raises(ValueError, match=r"q \[B,Lq,N,D\]"):
        fa.attention_fp8(q[0], k, v)


def test_the_kernel_refuses_what_cudnn_cannot_take() -> None:
    q, k, v = qkv(4)
    ones = torch.ones(1, 1, 1, 1)
    with pytest.raises(
        ValueError, match="q must be a contiguous CUDA float8_e4m3fn tensor, got torch.bfloat16"
    ):
        fa.run_cudnn(q, k, v, ones, ones, ones)


def test_unavailable_on_this_machine_says_why() -> None:
    assert fa.unavailable_reason("cpu") == "fp8 attention needs a CUDA device, got cpu"
    assert not fa.available("cpu")


def test_dit_self_attention_runs_through_it(tiny_weights_dir: Path) -> None:
    from pipeline.config import load_model_config
    from pipeline.weights import load_dit
    from tests.helpers.dit import make_inputs

    cfg = load_model_config(tiny_weights_dir).dit
    model = load_dit(tiny_weights_dir, cfg, dtype=torch.bfloat16, attention_backend="sdpa")
    inputs = {k: (v.bfloat16() if k != "t" else v) for k, v in make_inputs(cfg).items()}
    with torch.no_grad():
        ref = model(**inputs).float()
        model.use_attention("sdpa", fp8=True)
        CALLS.clear()
        out = model(**inputs).float()
    assert len(CALLS) == cfg.num_layers  # self-attention only: cross and audio attention stay bf16
    assert 0 < rel(out, ref) < 0.1


def test_speed_settings_switch_it(monkeypatch: pytest.MonkeyPatch, tiny_weights_dir: Path) -> None:
    from pipeline.config import load_model_config
    from pipeline.perf import PerfConfig, apply_dit_perf, default_perf
    from pipeline.weights import load_dit

    assert default_perf("cpu", quant="fp8") is None
    perf = default_perf("cuda", quant="fp8")  # no CUDA here: fp8 weights, bf16 attention
    assert perf is not None and perf.fp8 and not perf.fp8_attention
    monkeypatch.setattr(fa, "unavailable_reason", lambda device=None, test_run=False: None)
    perf = default_perf("cuda", quant="fp8")
    assert perf is not None and perf.fp8_attention
    bf16 = default_perf("cuda")
    assert bf16 is not None and not bf16.fp8_attention
    monkeypatch.undo()

    cfg = load_model_config(tiny_weights_dir).dit
    model = load_dit(tiny_weights_dir, cfg, dtype=torch.float32, attention_backend="sdpa")
    with pytest.raises(
        ValueError, match="fp8_attention is on but cannot run here: fp8 attention needs a CUDA"
    ):
        apply_dit_perf(PerfConfig(compile=False, fp8_attention=True), model)
    assert not any(b.self_attn.kernel is fa.attention_fp8 for b in model.blocks)  # left as it was
    model.use_attention("sdpa", fp8=True)
    applied = apply_dit_perf(PerfConfig(compile=False), model)
    assert applied["fp8_attention"] is False
    assert not any(b.self_attn.kernel is fa.attention_fp8 for b in model.blocks)


def test_a_test_run_reports_what_went_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where fp8 attention is switched on, one small attention runs first: a failing install or a
    wrong result turns it off (auto) or stops the load (on) with this message, not every render."""
    assert fa.try_run(torch.device("cpu")) is None  # the kernel's contract holds

    def broken(q, k, v):  # type: ignore[no-untyped-def]
        raise RuntimeError("no engine proposed a plan")

    monkeypatch.setattr(fa, "attention_fp8", broken)
    assert fa.try_run(torch.device("cpu")) == (
        "fp8 attention failed a test run on cpu: RuntimeError: no engine proposed a plan"
    )
    monkeypatch.setattr(fa, "attention_fp8", lambda q, k, v: torch.zeros_like(q))
    message = fa.try_run(torch.device("cpu"))
    assert message is not None and "relative error 1 against fp32 attention" in message


def test_flash_attention_4_that_fails_its_test_run_is_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.models import attention as att

    monkeypatch.setattr(att, "_fa4_ok", {})
    monkeypatch.setattr(att, "fa4_available", lambda: True)  # "installed", but cannot run here
    with caplog.at_level("WARNING", logger="pipeline.models.attention"):
        assert att.fa4_works(torch.device("cpu")) is False
    assert "FlashAttention 4 is installed but failed a test run on cpu (ValueError" in caplog.text
    assert att._fa4_ok == {"cpu": False}  # once per device
    monkeypatch.setattr(att, "fa4_available", lambda: False)
    monkeypatch.setattr(att, "_fa4_ok", {})
    assert att.fa4_works(torch.device("cpu")) is False and att._fa4_ok == {}
