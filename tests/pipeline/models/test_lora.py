"""LoRA merging: the formula, alpha ignored as the reference does, and loud errors for bad keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.lora import LoraError, merge_lora


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(8, 6), "norm": nn.LayerNorm(6)})])


def lora_for(model: Tiny, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "diffusion_model.blocks.0.q.lora_down.weight": torch.randn(2, 8, generator=gen),
        "diffusion_model.blocks.0.q.lora_up.weight": torch.randn(6, 2, generator=gen),
        "diffusion_model.blocks.0.q.alpha": torch.tensor(16.0),
        "diffusion_model.blocks.0.q.diff_b": torch.randn(6, generator=gen),
        "diffusion_model.blocks.0.norm.diff": torch.randn(6, generator=gen),
    }


def test_merge_adds_scaled_deltas_and_ignores_alpha() -> None:
    gen = torch.Generator().manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = lora_for(model, gen)
    report = merge_lora(model, lora, scale=1.5)
    down, up = (
        lora["diffusion_model.blocks.0.q.lora_down.weight"],
        lora["diffusion_model.blocks.0.q.lora_up.weight"],
    )
    after = model.state_dict()
    torch.testing.assert_close(after["blocks.0.q.weight"], before["blocks.0.q.weight"] + 1.5 * up @ down)
    torch.testing.assert_close(
        after["blocks.0.q.bias"], before["blocks.0.q.bias"] + 1.5 * lora["diffusion_model.blocks.0.q.diff_b"]
    )
    torch.testing.assert_close(
        after["blocks.0.norm.weight"],
        before["blocks.0.norm.weight"] + 1.5 * lora["diffusion_model.blocks.0.norm.diff"],
    )
    assert report.applied == 3 and report.skipped == ("diffusion_model.blocks.0.q.alpha",)
    x = torch.randn(3, 8, generator=gen)
    base = nn.functional.linear(x, before["blocks.0.q.weight"], before["blocks.0.q.bias"])
    expected = base + 1.5 * (x @ down.t() @ up.t() + lora["diffusion_model.blocks.0.q.diff_b"])
    torch.testing.assert_close(model.blocks[0]["q"](x), expected)


def test_bf16_parameters_receive_bf16_rounded_lora() -> None:
    """The LoRA tensors are rounded to bf16 first (as the reference), the delta is a float32
    product and is added in bf16: bit for bit, and not what the unrounded factors give."""
    model = Tiny().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = lora_for(model, torch.Generator().manual_seed(1))
    merge_lora(model, lora, scale=1.5)

    def bf16(name: str) -> torch.Tensor:
        return lora[f"diffusion_model.blocks.0.{name}"].to(torch.bfloat16).float()

    def added(param: str, delta: torch.Tensor) -> torch.Tensor:
        return (before[param].float() + (1.5 * delta).to(torch.bfloat16).float()).to(torch.bfloat16)

    after = model.state_dict()
    weight = added("blocks.0.q.weight", bf16("q.lora_up.weight") @ bf16("q.lora_down.weight"))
    assert after["blocks.0.q.weight"].dtype == torch.bfloat16
    assert torch.equal(after["blocks.0.q.weight"], weight)
    assert torch.equal(after["blocks.0.q.bias"], added("blocks.0.q.bias", bf16("q.diff_b")))
    assert torch.equal(after["blocks.0.norm.weight"], added("blocks.0.norm.weight", bf16("norm.diff")))
    assert not torch.equal(weight, before["blocks.0.q.weight"])  # the merge changed the weight
    up, down = (lora[f"diffusion_model.blocks.0.q.{k}.weight"] for k in ("lora_up", "lora_down"))
    assert not torch.equal(weight, added("blocks.0.q.weight", up @ down))  # rounding first matters


def test_keys_the_reference_ignores_are_ignored_and_reported() -> None:
    """PEFT lora_A/lora_B, keys without the prefix, diff_m, a lone lora_up: skipped (the reference
    skips them too), listed in the report, and the rest merged exactly as without them."""
    gen = torch.Generator().manual_seed(4)
    plain, extra = Tiny(), Tiny()
    extra.load_state_dict(plain.state_dict())
    lora = lora_for(plain, gen)
    merge_lora(plain, lora)
    odd = {
        "diffusion_model.blocks.0.q.lora_A.weight": torch.ones(2, 8),
        "diffusion_model.blocks.0.q.lora_B.weight": torch.ones(6, 2),
        "blocks.0.q.lora_down.weight": torch.ones(2, 8),
        "lora_unet_blocks_0_q.lora_up.weight": torch.ones(6, 2),
        "diffusion_model.blocks.0.norm.diff_m": torch.ones(6),
        "diffusion_model.blocks.0.norm.lora_up.weight": torch.ones(6, 2),
    }
    report = merge_lora(extra, {**lora, **odd})
    assert set(report.skipped) == {*odd, "diffusion_model.blocks.0.q.alpha"} and report.applied == 3
    for k, v in plain.state_dict().items():
        assert torch.equal(extra.state_dict()[k], v), k


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("diffusion_model.blocks.0.k.diff_b", torch.zeros(6), "the model has no parameter blocks.0.k.bias"),
        ("diffusion_model.blocks.0.norm.diff_b", torch.zeros(5), r"delta \[5\] != blocks.0.norm.bias \[6\]"),
        ("diffusion_model.blocks.0.norm.lora_down.weight", torch.zeros(2, 6), "no matching lora_up"),
    ],
)
def test_every_bad_key_raises(key: str, value: torch.Tensor, message: str) -> None:
    model = Tiny()
    lora = lora_for(model, torch.Generator().manual_seed(2))
    lora[key] = value
    before = model.blocks[0]["q"].weight.clone()
    with pytest.raises(LoraError, match=message):
        merge_lora(model, lora)
    assert torch.equal(model.blocks[0]["q"].weight, before)  # nothing merged when anything is wrong


def test_a_file_without_lora_tensors_raises() -> None:
    with pytest.raises(LoraError, match="no lora_down/lora_up"):
        merge_lora(Tiny(), {"diffusion_model.blocks.0.q.alpha": torch.tensor(1.0)})
