"""Full-size InfiniteTalk on one GPU with random weights: the chunk loop end to end, and the fast
paths against the plain (reference-numerics) path. Run on the GPU machine:

    PYTHONPATH=. python -m pytest --gpu tests/gpu -x -q

Tolerances (relative L2 error on the same weights and inputs, random weights):
- bf16 fast DiT forward (cuDNN attention, fp32 RoPE, compiled block) vs plain: <= 3e-2
  (bf16 rounding differs between fused and unfused element-wise work; typically ~1e-2);
- fp8 DiT forward (row-wise e4m3 `_scaled_mm`) vs plain bf16: <= 1e-1 (measured 5.6e-2), also with
  the self-attention in fp8 (cuDNN, needs nvidia-cudnn-frontend; measured 5.6e-2);
- fp8 self-attention alone vs fp32 attention at 480p (32 760 tokens, random q/k/v, with and
  without shared key/value offsets): <= 8e-2 (measured 5.9e-2; bf16 cuDNN: 2.3e-3);
- VAE decode bf16 channels-last vs fp32: <= 3e-2.
The order matters: the fp8 tests quantise the shared model in place, so they run last.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

FRAMES = 81  # one full chunk: 21 latent frames, 32 760 tokens at 480x832


@pytest.fixture(scope="module")
def bench():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from pipeline.bench import Bench, BenchOptions

    opts = BenchOptions(
        sizes=("480",),
        chunk_sizes=("480",),
        passes=(1,),
        num_chunks=2,
        t5=False,
        load_probe_blocks=0,
        warmup=1,
        repeats=1,
        frame_num=FRAMES,
    )
    b = Bench(opts, log=lambda m: None)
    b.build()
    yield b
    b.dit = b.vae = b.clip = None
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def inputs(bench):
    from pipeline.bench import dit_inputs

    return dit_inputs(bench.cfg, bench.shape("480"), bench.device, bench.dit.dtype, seed=123)


@pytest.fixture(scope="module")
def plain_out(bench, inputs):
    from pipeline.perf import PerfConfig, apply_dit_perf

    apply_dit_perf(PerfConfig.plain(), bench.dit)
    with torch.no_grad():
        out = bench.dit(**inputs)
    assert torch.isfinite(out).all()
    return out.float()


def test_full_size_model_is_the_released_size(bench):
    params = sum(p.numel() for p in bench.dit.parameters())
    assert 18.8e9 < params < 18.95e9, params  # 16.39 B Wan + 2.49 B audio modules


def test_bf16_fast_path_matches_plain(bench, inputs, plain_out):
    from pipeline.bench import rel_err
    from pipeline.perf import PerfConfig, apply_dit_perf

    applied = apply_dit_perf(PerfConfig(), bench.dit)
    # cuDNN SDPA on Hopper, or FlashAttention 4 for the self-attention where flash-attn-4 is installed
    assert applied["attention"] in ("cudnn", "fa4") and applied["compiled"] and applied["rope"] == "fast"
    with torch.no_grad():
        out = bench.dit(**inputs).float()
    err = rel_err(out, plain_out)
    assert err <= 3e-2, err
    from pipeline.compile import graph_breaks

    assert graph_breaks() == 0  # the attention kernels are custom ops: one graph per block


def test_vae_bf16_channels_last_matches_fp32(bench):
    from pipeline.bench import rel_err
    from pipeline.perf import PerfConfig, apply_vae_perf

    g = torch.Generator(device="cuda").manual_seed(7)
    latents = torch.randn(16, 3, 60, 104, generator=g, device="cuda")
    apply_vae_perf(PerfConfig.plain(), bench.vae)
    ref = bench.vae.decode(latents)
    applied = apply_vae_perf(PerfConfig(), bench.vae)
    assert applied == {"vae_dtype": "bfloat16", "channels_last": True}
    out = bench.vae.decode(latents)
    assert out.shape == ref.shape == (3, 9, 480, 832)
    assert rel_err(out, ref) <= 3e-2


def _fp8_attention() -> bool:
    from pipeline.models.attention_fp8 import available

    return available()


def _two_chunks(bench, dtype_name: str) -> dict:
    from pipeline.perf import PerfConfig

    fp8 = dtype_name == "fp8"
    perf = PerfConfig(fp8=fp8, fp8_attention=fp8 and _fp8_attention())
    entry = bench.chunks(bench.shape("480"), dtype_name, 1, perf)
    assert [len(c) > 0 for c in entry["chunks"]] == [True, True]
    assert entry["frames_shape"] == [3, FRAMES, 480, 832]
    assert entry["finite"]
    assert "vae_encode_y_s" in entry["chunks"][0] and "vae_encode_y_s" not in entry["chunks"][1]
    return entry


def test_two_chunk_480p_bf16(bench):
    _two_chunks(bench, "bf16")


def test_fp8_fast_path_matches_plain(bench, inputs, plain_out):
    from pipeline.bench import rel_err
    from pipeline.perf import PerfConfig, apply_dit_perf
    from pipeline.quant import Fp8Linear

    bench.to_fp8()
    applied = apply_dit_perf(PerfConfig(fp8=True), bench.dit)
    layers = [m for m in bench.dit.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == applied["fp8_layers"] == 40 * 15 and all(m.use_scaled_mm for m in layers)
    with torch.no_grad():
        out = bench.dit(**inputs).float()
    err = rel_err(out, plain_out)
    assert err <= 1e-1, err


def test_fp8_attention_matches_fp32_attention():
    import math

    from pipeline.bench import rel_err
    from pipeline.models.attention_fp8 import attention_fp8, unavailable_reason

    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    g = torch.Generator(device="cuda").manual_seed(3)
    shape = (1, 32760, 40, 128)
    rows = torch.randperm(shape[1], generator=g, device="cuda")[:256]
    for offset in (0.0, 4.0):
        q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        k = k + offset * torch.randn(1, 1, 40, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        v = v + offset * torch.randn(1, 1, 40, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        out = attention_fp8(q, k, v)[0, rows].float()  # [R, N, Dh]
        p = torch.softmax(torch.einsum("rnd,lnd->nrl", q[0, rows].float(), k[0].float()) / math.sqrt(128), -1)
        ref = torch.einsum("nrl,lnd->rnd", p, v[0].float())
        assert rel_err(out, ref) <= 8e-2, (offset, rel_err(out, ref))


def test_fp8_attention_forward_matches_plain(bench, inputs, plain_out):
    from pipeline.bench import rel_err
    from pipeline.perf import PerfConfig, apply_dit_perf

    if not _fp8_attention():
        pytest.skip("fp8 attention unavailable (nvidia-cudnn-frontend, Hopper)")
    from pipeline.models.attention_fp8 import attention_fp8

    applied = apply_dit_perf(PerfConfig(fp8=True, fp8_attention=True), bench.dit)
    assert applied["fp8_attention"] and all(b.self_attn.kernel is attention_fp8 for b in bench.dit.blocks)
    with torch.no_grad():
        out = bench.dit(**inputs).float()
    err = rel_err(out, plain_out)
    assert err <= 1e-1, err


def test_two_chunk_480p_fp8(bench):
    _two_chunks(bench, "fp8")
