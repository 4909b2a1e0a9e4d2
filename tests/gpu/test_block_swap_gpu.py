"""Block streaming on a GPU (pipeline.offload.BlockSwap): bit-identical to the resident model, and
the host-to-device copies hidden behind the compute (side stream + events). Run on the GPU machine:

    PYTHONPATH=. python -m pytest --gpu tests/gpu/test_block_swap_gpu.py -x -q
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

pytestmark = pytest.mark.gpu


def _model(cfg, seed: int):
    from pipeline.bench import build_random_dit

    model = build_random_dit(cfg, torch.device("cuda"), torch.bfloat16, seed)
    model.attention_backend = "auto"
    return model


def _time(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return min(samples)


def test_swapped_model_is_bit_identical_on_cuda() -> None:
    from pipeline.bench import Shape, dit_inputs
    from pipeline.config import DiTConfig
    from pipeline.offload import BlockSwap

    cfg = dataclasses.replace(DiTConfig(), dim=1024, ffn_dim=2816, num_heads=8, num_layers=8)
    model = _model(cfg, 0)
    shape = Shape(name="s", height=240, width=416, frame_num=21)
    a = dit_inputs(cfg, shape, torch.device("cuda"), torch.bfloat16, 1)
    b = dit_inputs(cfg, shape, torch.device("cuda"), torch.bfloat16, 2)
    with torch.no_grad():
        ref = model(**a)
        ref2 = [model(**a), model(**b)]
        model.block_swap = BlockSwap(model.blocks, resident=2, device="cuda", slots=2)
        assert model.blocks[5].self_attn.q.weight.is_pinned()
        out = model(**a)
        out2 = model.forward_passes([tuple(a.values()), tuple(b.values())])
    assert torch.equal(out, ref)
    assert all(torch.equal(x, y) for x, y in zip(out2, ref2, strict=True))


def test_streaming_every_block_costs_little_at_480p() -> None:
    """8 full-size blocks (bf16, 0.93 GB each) at 480p (32 760 tokens): streaming all of them
    through two slots costs at most 10 % over the resident blocks, so the copies overlap."""
    from pipeline.bench import Shape, dit_inputs
    from pipeline.config import DiTConfig
    from pipeline.offload import BlockSwap

    cfg = dataclasses.replace(DiTConfig(), num_layers=8)
    model = _model(cfg, 3)
    shape = Shape(name="480", height=480, width=832, frame_num=81)
    inputs = dit_inputs(cfg, shape, torch.device("cuda"), torch.bfloat16, 4)
    with torch.no_grad():
        resident = _time(lambda: model(**inputs))
        ref = model(**inputs)
        swap = BlockSwap(model.blocks, resident=0, device="cuda", slots=2)
        model.block_swap = swap
        torch.cuda.empty_cache()
        streamed = _time(lambda: model(**inputs))
        assert torch.equal(model(**inputs), ref)
    copied_per_forward = swap.bytes_copied / 5  # warm-up + 3 timed + the check
    assert copied_per_forward == pytest.approx(8 * swap.block_bytes)
    print(f"resident {resident:.3f} s, all 8 blocks streamed {streamed:.3f} s ({streamed / resident:.3f}x)")
    assert streamed <= 1.10 * resident, (resident, streamed)
