"""The attention kernel as an object: one list of names, `pick` resolving a name once, and each
DiT attention module calling the kernel it holds (issue 16 step 5)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

import pytest
import torch

from pipeline.choices import ATTENTION, FP8_ATTENTION
from pipeline.config import load_model_config
from pipeline.models import attention as att
from pipeline.models.attention_fp8 import attention_fp8
from pipeline.models.dit import InfiniteTalkDiT, TokenGrid, WanAttentionBlock
from pipeline.weights import load_dit
from tests.helpers.dit import make_inputs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_weights_dir: Path) -> InfiniteTalkDiT:
    cfg = load_model_config(tiny_weights_dir).dit
    return load_dit(tiny_weights_dir, cfg, dtype=torch.float32, attention_backend="sdpa")


def test_every_user_facing_list_of_attention_names_is_the_one_in_choices() -> None:
    import argparse

    from daemon import bench_cmd, config
    from pipeline import perf

    assert att.NAMES is ATTENTION and get_args(perf.Attention) == ATTENTION
    assert config._CHOICES["attention"] is ATTENTION
    assert config._CHOICES["fp8_attention"] is FP8_ATTENTION
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    bench_cmd.register(sub)
    bench = sub.choices["bench"]
    actions = {a.dest: a for a in bench._actions}
    assert actions["attention"].choices is ATTENTION
    assert actions["fp8_attention"].choices is FP8_ATTENTION
    for name in ATTENTION:
        assert perf.PerfConfig(attention=name).attention == name
    assert set(ATTENTION) <= set(att.KERNELS) | {"auto"}  # every name a user picks has a kernel


def test_pick_resolves_a_name_once_into_a_kernel() -> None:
    assert att.pick("auto", CPU, torch.float32, long_keys=True) is att.sdpa  # CPU: SDPA
    assert att.pick("cudnn", CPU, torch.bfloat16, long_keys=True) is att.KERNELS["cudnn"]
    # "fa4" is FlashAttention 4 for token-long keys, cuDNN for the short cross-attention keys
    assert att.pick("fa4", CPU, torch.bfloat16, long_keys=True) is att.KERNELS["fa4"]
    assert att.pick("fa4", CPU, torch.bfloat16, long_keys=False) is att.KERNELS["cudnn"]
    with pytest.raises(ValueError, match="attention backend must be one of .* got 'fp8'"):
        att.pick("fp8", CPU, torch.bfloat16, long_keys=True)  # the fp8_attention setting, not a name


def test_the_installed_check_is_a_bool_not_a_kernel() -> None:
    """The cache of `fa4_available` and the FlashAttention 4 kernel once shared a name."""
    assert isinstance(att.fa4_available(), bool)
    assert callable(att.KERNELS["fa4"]) and att.KERNELS["fa4"] is not att.fa4_attention


def test_use_attention_gives_each_module_its_kernel(model: InfiniteTalkDiT) -> None:
    try:
        assert model.use_attention("auto", fp8=True) == "sdpa" == model.attention_backend
        for block in model.blocks:
            assert block.self_attn.kernel is attention_fp8  # the one-GPU self-attention only
            assert block.self_attn.exact_kernel is att.sdpa  # speaker map, sequence parallel
            assert block.cross_attn.kernel is att.sdpa and block.audio_cross_attn.kernel is att.sdpa
    finally:
        model.use_attention("sdpa")
    assert all(b.self_attn.kernel is att.sdpa for b in model.blocks)


def test_the_modules_call_the_kernel_they_hold(model: InfiniteTalkDiT) -> None:
    calls: dict[str, int] = {"self": 0, "cross": 0, "audio": 0, "map": 0}

    def counting(key: str):  # type: ignore[no-untyped-def]
        def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            calls[key] += 1
            return att.sdpa(q, k, v)

        return kernel

    cfg = model.cfg
    with torch.no_grad():
        want = model(**make_inputs(cfg, speakers=2))
        try:
            for block in model.blocks:
                block.self_attn.kernel = counting("self")
                block.self_attn.exact_kernel = counting("map")
                block.cross_attn.kernel = counting("cross")
                block.audio_cross_attn.kernel = counting("audio")
            got = model(**make_inputs(cfg, speakers=2))
        finally:
            model.use_attention("sdpa")
    layers = cfg.num_layers
    assert calls == {"self": layers, "cross": 2 * layers, "audio": layers, "map": layers}
    assert torch.equal(got, want)


def test_a_block_takes_its_tensors_and_one_frozen_token_grid(model: InfiniteTalkDiT) -> None:
    state = model._embed(**make_inputs(model.cfg, speakers=1))
    g = state.g
    assert g.grid == g.full_grid and g.sp is None and g.speakers == 1 and g.region_masks is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.speakers = 2  # type: ignore[misc]
    block = model.blocks[0]
    with torch.no_grad():
        out = block(state.tokens, state.e0, state.context, state.audio, g)
    assert out.shape == state.tokens.shape and isinstance(g, TokenGrid)


def test_precision_and_compile_policy_are_class_data(model: InfiniteTalkDiT) -> None:
    from pipeline.compile import repeated_blocks

    blocks = repeated_blocks(model)
    assert blocks is model.blocks and all(isinstance(b, WanAttentionBlock) for b in blocks)
    for name in InfiniteTalkDiT.FP32_MODULES:  # every name is a module or parameter of the model
        path = name.replace("*", "0")
        found = path in dict(model.named_modules()) or path in dict(model.named_parameters())
        assert found, name
