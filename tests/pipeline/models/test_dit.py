"""The DiT's own behaviour on the tiny weights: shapes, input checks, batching, precision paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_model_config
from pipeline.models import dit as dit_module
from pipeline.weights import load_dit
from tests.helpers.dit import make_inputs

#: bf16 weights and activations against float32, relative L2 error of the velocity.
#: Measured 0.008 on the tiny model; the bound leaves room for other CPUs' bf16 kernels.
BF16_BOUND = 0.05


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def cfg(tiny_weights_dir: Path):
    return load_model_config(tiny_weights_dir).dit


@pytest.fixture(scope="module")
def model(tiny_weights_dir: Path, cfg):
    return load_dit(tiny_weights_dir, cfg, dtype=torch.float32, attention_backend="sdpa")


def test_output_shape_and_dtype(model, cfg) -> None:
    inputs = make_inputs(cfg)
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == inputs["x"].shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_batch_entries_are_independent(model, cfg) -> None:
    a, b = make_inputs(cfg, seed=1), make_inputs(cfg, seed=2)
    both = {k: torch.cat([a[k], b[k]]) if k != "ref_target_masks" else a[k] for k in a}
    with torch.no_grad():
        out = model(**both)
        assert rel(out[:1], model(**a)) < 1e-5
        assert rel(out[1:], model(**b)) < 1e-5


def test_one_speaker_skips_the_region_map(model, cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("region attention map computed for one speaker")

    monkeypatch.setattr(dit_module, "region_attention_map", forbidden)
    with torch.no_grad():
        model(**make_inputs(cfg, speakers=1))
    with pytest.raises(AssertionError, match="region attention map"), torch.no_grad():
        model(**make_inputs(cfg, speakers=2))


def test_region_map_equals_softmax_then_masked_mean() -> None:
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 12, 2, 8, generator=g), torch.randn(1, 12, 2, 8, generator=g)
    masks = (torch.rand(3, 4, generator=g) > 0.5).float()
    masks[:, 0] = 1
    got = dit_module.region_attention_map(q, k, masks)  # [1, 3, 12]
    attn = torch.softmax(torch.einsum("blnd,bsnd->bnls", q, k[:, :4]) / 8**0.5, dim=-1)  # [1, N, L, S]
    want = torch.einsum("bnls,cs->bcnl", attn, masks) / masks.sum(1)[None, :, None, None]
    assert rel(got, want.mean(2)) < 1e-6


def test_fast_rope_is_close_to_exact(model, cfg) -> None:
    inputs = make_inputs(cfg, speakers=2)
    with torch.no_grad():
        exact = model(**inputs)
        model.rope_mode = "fast"
        try:
            fast = model(**inputs)
        finally:
            model.rope_mode = "exact"
    assert 0 < rel(fast, exact) < 1e-5


def test_bf16_close_to_float32(tiny_weights_dir: Path, model, cfg) -> None:
    bf16 = load_dit(tiny_weights_dir, cfg, dtype=torch.bfloat16, attention_backend="sdpa")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for speakers in (1, 2):
        inputs = make_inputs(cfg, speakers=speakers)
        with torch.no_grad():
            err = rel(bf16(**inputs), model(**inputs))
        assert err < BF16_BOUND, (speakers, err)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"audio": lambda a: a[:, :, :7]}, "audio has 7 frames"),
        ({"audio": lambda a: a.expand(-1, 3, -1, -1, -1, -1)}, "1 or 2 speakers"),
        ({"y": lambda y: y[:, :19]}, "must stack to 36 channels"),
        ({"context": lambda c: c.new_zeros(1, 600, c.shape[2])}, "context must be"),
        ({"x": lambda x: x[..., :5], "y": lambda y: y[..., :5]}, "not divisible by the patch"),
    ],
)
def test_bad_inputs_raise_with_the_shapes(model, cfg, change: dict, message: str) -> None:
    inputs = make_inputs(cfg)
    for key, fn in change.items():
        inputs[key] = fn(inputs[key])
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_two_speakers_need_masks(model, cfg) -> None:
    inputs = make_inputs(cfg, speakers=2)
    inputs["ref_target_masks"] = None
    with pytest.raises(ValueError, match="ref_target_masks"):
        model(**inputs)
