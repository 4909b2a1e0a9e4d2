"""umT5 encoder: parity with the reference on tiny random weights, key map, tokenizer, bf16 drift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.models.released import expected_shapes
from pipeline.models.t5 import (
    T5_FILE,
    T5Config,
    TextEncoder,
    checkpoint_shapes,
    clean_prompt,
    load_t5,
    map_state_dict,
    wan_to_hf_key,
)
from pipeline.tiny_encoders import state_digest, tiny_t5_config
from tests.helpers.parity import rel_err

PARITY = "encoders_t5"  # the reference's tensors, as the `ref` / `ref_meta` fixtures (conftest.py)
PARITY_RTOL = 1e-4
BF16_RTOL = 3e-2  # bf16 weights and activations, 2 layers


@pytest.fixture(scope="module")
def encoder(weights: Path) -> TextEncoder:
    return load_t5(weights, tiny_t5_config(), dtype=torch.float32)


def test_fixture_was_made_from_these_weights(weights: Path, ref_meta: dict[str, str]) -> None:
    state = torch.load(weights / "Wan2.1-I2V-14B-480P" / T5_FILE, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert state_digest(state) == ref_meta["t5_digest"], "tiny T5 weights changed: rerun tools/parity"


def test_tokens_match_reference(
    encoder: TextEncoder, ref: dict[str, torch.Tensor], ref_meta: dict[str, str]
) -> None:
    for i, prompt in enumerate(json.loads(ref_meta["t5_prompts"])):
        ids = encoder.tokenizer([clean_prompt(prompt)]).input_ids[0]
        assert list(ids) == ref[f"ids{i}"].tolist()
        assert ids[-1] == 1  # EOS appended


def test_encode_text_matches_reference(
    encoder: TextEncoder, ref: dict[str, torch.Tensor], ref_meta: dict[str, str]
) -> None:
    prompts = json.loads(ref_meta["t5_prompts"])
    outputs = encoder.encode_text(prompts)  # one batch, padded to the longest
    assert len(outputs) == len(prompts)
    for i, out in enumerate(outputs):
        assert out.shape == ref[f"out{i}"].shape  # trimmed to the real length
        assert rel_err(out, ref[f"out{i}"]) <= PARITY_RTOL
    alone = encoder.encode_text([prompts[1]])[0]  # batching does not change a prompt's result
    assert rel_err(alone, ref["out1"]) <= PARITY_RTOL


def test_clean_prompt_as_reference() -> None:
    assert clean_prompt("  a &amp;amp; b\n\t c  ") == "a & b c"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake


def test_encode_text_rejects_bad_input(encoder: TextEncoder) -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        encoder.encode_text("a bare string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty list"):
        encoder.encode_text([])


def test_truncates_to_text_len(weights: Path, encoder: TextEncoder) -> None:
    """Tokens past text_len are cut before the encoder runs (EOS kept): two prompts that differ
    only past the 8th token encode alike, and as the model on their first 7 tokens + EOS. The
    encoder is bidirectional, so untruncated, a later token changes every position."""
    short = load_t5(weights, T5Config(**{**_fields(tiny_t5_config()), "text_len": 8}), dtype=torch.float32)
    talking = "the man is talking " * 10
    other_tail = "the man is talking " * 2 + "a cat sits on a mat " * 5
    full_ids = [encoder.tokenizer([p]).input_ids[0] for p in (talking, other_tail)]
    assert len(full_ids[0]) > 8 and torch.equal(full_ids[0][:8], full_ids[1][:8])
    assert full_ids[0][8] != full_ids[1][8]  # the prompts differ past the cut
    ids = short.tokenizer([talking]).input_ids[0]
    assert ids.tolist() == full_ids[0][:7].tolist() + [1]  # the first 7 tokens + EOS

    out = short.encode_text([talking])[0]
    assert out.shape == (8, 32)
    assert torch.equal(short.encode_text([other_tail])[0], out)
    alone = encoder.model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).last_hidden_state[0]
    torch.testing.assert_close(out, alone)
    untruncated = [encoder.encode_text([p])[0][:8] for p in (talking, other_tail)]
    assert rel_err(untruncated[1], untruncated[0]) > 1e-3


def _fields(cfg: T5Config) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def test_full_size_key_map_covers_every_tensor() -> None:
    """Every released key maps to a distinct UMT5EncoderModel parameter of the same shape, and back."""
    from transformers import UMT5EncoderModel

    from pipeline.models.t5 import _hf_config

    cfg = T5Config()
    with torch.device("meta"):
        model = UMT5EncoderModel(_hf_config(cfg))
    expected = expected_shapes(model)
    shapes = checkpoint_shapes(cfg)
    assert len(shapes) == 1 + 24 * 10 + 1
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 5_680_910_336  # model.md 2.7
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    mapped = map_state_dict(state, expected, "released layout")
    assert len(mapped) == len(state)
    assert set(mapped) | {"encoder.embed_tokens.weight"} == set(expected)


def test_unmapped_or_missing_keys_are_named(weights: Path) -> None:
    with pytest.raises(KeyError):
        wan_to_hf_key("blocks.0.attn.bias")
    cfg = tiny_t5_config()
    state = {k: torch.empty(s, device="meta") for k, s in checkpoint_shapes(cfg).items()}
    state["blocks.0.attn.bias"] = torch.empty(1, device="meta")
    del state["blocks.1.ffn.fc2.weight"]
    from transformers import UMT5EncoderModel

    from pipeline.models.t5 import _hf_config

    with torch.device("meta"):
        expected = expected_shapes(UMT5EncoderModel(_hf_config(cfg)))
    with pytest.raises(
        RuntimeError, match=r"blocks\.0\.attn\.bias.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo"
    ):
        map_state_dict(state, expected, "bad.pth")


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=T5_FILE):
        load_t5(tmp_path, tiny_t5_config())


def test_bf16_close_to_fp32(weights: Path, encoder: TextEncoder, ref_meta: dict[str, str]) -> None:
    half = load_t5(weights, tiny_t5_config())  # bfloat16, the reference's dtype
    assert half.model.shared.weight.dtype == torch.bfloat16
    prompts = json.loads(ref_meta["t5_prompts"])
    for a, b in zip(half.encode_text(prompts), encoder.encode_text(prompts), strict=True):
        assert a.dtype == torch.bfloat16
        assert rel_err(a, b) <= BF16_RTOL


@pytest.mark.gpu
def test_cuda_matches_reference(
    weights: Path, ref: dict[str, torch.Tensor], ref_meta: dict[str, str]
) -> None:
    prompts = json.loads(ref_meta["t5_prompts"])
    for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, BF16_RTOL)):
        enc = load_t5(weights, tiny_t5_config(), device="cuda", dtype=dtype)
        for i, out in enumerate(enc.encode_text(prompts)):
            assert out.device.type == "cuda"
            assert rel_err(out.cpu(), ref[f"out{i}"]) <= bound
