"""DiT block streaming (pipeline.offload.BlockSwap) on the CPU: the same code path as on a GPU,
with host-to-host copies. Outputs must be bit-identical to the resident model, the official key
names and strict loading unchanged, and the guidance passes of a step share one copy per block."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.bench import randomise_
from pipeline.config import load_model_config
from pipeline.models.attention_fp8 import attention_fp8
from pipeline.models.dit import build_dit
from pipeline.offload import BlockSwap, OnDemand, module_bytes
from tests.helpers.dit import make_inputs

LAYERS = 6


@pytest.fixture(scope="module")
def cfg(tiny_weights_dir):
    return dataclasses.replace(load_model_config(tiny_weights_dir).dit, num_layers=LAYERS)


def make_model(cfg, seed: int = 0):
    model = build_dit(cfg, device="cpu", dtype=torch.float32)
    randomise_(model, torch.Generator().manual_seed(seed), std=0.05)
    with torch.no_grad():  # non-zero biases and modulation so every tensor matters
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    model.attention_backend = "sdpa"
    return model.eval().requires_grad_(False)


def test_forward_passes_equals_separate_forwards(cfg) -> None:
    model = make_model(cfg)
    a, b = make_inputs(cfg, seed=1), make_inputs(cfg, seed=2)
    with torch.no_grad():
        ref = [model(**a), model(**b)]
        out = model.forward_passes([tuple(a.values()), tuple(b.values())])
    assert all(torch.equal(x, y) for x, y in zip(out, ref, strict=True))


@pytest.mark.parametrize(("resident", "slots"), [(0, 2), (2, 2), (3, 1), (0, 1)])
def test_swapped_model_is_bit_identical(cfg, resident: int, slots: int) -> None:
    model = make_model(cfg)
    inputs = make_inputs(cfg, seed=3)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(**inputs)
        ref2 = model.forward_passes([tuple(inputs.values()), tuple(make_inputs(cfg, seed=4).values())])
    swap = BlockSwap(model.blocks, resident=resident, device="cpu", slots=slots)
    model.block_swap = swap
    assert list(model.state_dict()) == keys  # official names: nothing added, nothing renamed
    streamed = LAYERS - resident
    with torch.no_grad():
        out = model(**inputs)
        out_again = model(**inputs)
        out2 = model.forward_passes([tuple(inputs.values()), tuple(make_inputs(cfg, seed=4).values())])
    assert torch.equal(out, ref) and torch.equal(out_again, ref)
    assert all(torch.equal(x, y) for x, y in zip(out2, ref2, strict=True))
    # one copy of each streamed block per forward; two passes in one call share it
    assert swap.copies == 3 * streamed
    assert swap.bytes_copied == 3 * streamed * swap.block_bytes
    # the streamed blocks' tensors live in the host buffers, not in the slots
    block = model.blocks[LAYERS - 1]
    flat = swap.host[LAYERS - 1]
    base = flat.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in block.state_dict().values())


def test_state_dict_round_trip_strict(cfg) -> None:
    model = make_model(cfg)
    model.block_swap = BlockSwap(model.blocks, resident=1, device="cpu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = build_dit(cfg, device="cpu", dtype=torch.float32)
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_fp8_blocks_stream_too(cfg) -> None:
    from pipeline.weights import quantize_linears

    model = make_model(cfg)
    quantize_linears(model)
    inputs = make_inputs(cfg, seed=5)
    with torch.no_grad():
        ref = model(**inputs)
    model.block_swap = BlockSwap(model.blocks, resident=2, device="cpu")
    with torch.no_grad():
        assert torch.equal(model(**inputs), ref)


def test_settings_follow_the_blocks(cfg) -> None:
    """A setting changed on the model's blocks after the swap is set up reaches the slots."""
    model = make_model(cfg)
    swap = BlockSwap(model.blocks, resident=1, device="cpu")
    model.block_swap = swap
    model.use_attention("sdpa", fp8=True)  # the attention kernels are settings too
    modules = list(swap.order())
    assert all(m.self_attn.kernel is attention_fp8 for m in modules)


def test_bad_arguments_name_the_value(cfg) -> None:
    model = make_model(cfg)
    with pytest.raises(ValueError, match="got 6"):
        BlockSwap(model.blocks, resident=LAYERS, device="cpu")
    with pytest.raises(ValueError, match="slots must be >= 1, got 0"):
        BlockSwap(model.blocks, resident=0, device="cpu", slots=0)


def test_on_demand_module_is_identical_and_leaves_nothing_behind() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = net(x)
    shuttle = OnDemand(net, "cpu")
    with torch.no_grad(), shuttle.use() as moved:
        out = moved(x)
    assert torch.equal(out, ref)
    assert shuttle.bytes == module_bytes(net) and shuttle.bytes_copied == shuttle.bytes
