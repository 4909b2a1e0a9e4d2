"""The encoder loaders under every transformers version the project declares (issue 14).

Needs only torch, transformers, tokenizers, sentencepiece, safetensors and ftfy, so
`scripts/test-oldest` runs it (with test_t5.py and test_clip.py) in a venv holding the OLDEST
supported transformers and tokenizers, and `scripts/test` runs it with the newest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.models.t5 import load_tokenizer
from pipeline.models.wav2vec import load_wav2vec
from pipeline.tiny_encoders import TINY_WAV2VEC, write_unigram_tokenizer
from tests.helpers.parity import read_fixture, rel_err

#: characters NFKC folds: subscript/superscript digits, a circled digit, ellipses, full-width
#: letters, a ligature
FOLDED = "H₂O ① x² …… ｔｈｅ ﬁne man is talking"


def test_the_tiny_tokenizer_has_the_released_normaliser(weights: Path) -> None:
    doc = json.loads((weights / "Wan2.1-I2V-14B-480P" / "google" / "umt5-xxl" / "tokenizer.json").read_text())
    first, second = doc["normalizer"]["normalizers"]
    assert first["type"] == "Precompiled" and len(first["precompiled_charsmap"]) > 100_000
    assert second["type"] == "Replace"
    assert doc["pre_tokenizer"]["type"] == "Metaspace"


def test_tokenizer_json_is_run_exactly_as_written(tmp_path: Path) -> None:
    """A tokenizer.json whose normaliser is not `Precompiled` (transformers 5's T5 template drops
    such a one and swaps the pre-tokenizer): the ids are still the file's own."""
    from tokenizers import Tokenizer, normalizers

    folder = tmp_path / "umt5"
    write_unigram_tokenizer(folder, kind="t5")
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.normalizer = normalizers.NFKC()
    raw.save(str(folder / "tokenizer.json"))
    expected = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(FOLDED).ids
    ids = [int(i) for i in load_tokenizer(folder)([FOLDED]).input_ids[0]]
    assert ids == expected
    assert ids == [
        int(i) for i in load_tokenizer(folder)(["H2O 1 x2 ...... the fine man is talking"]).input_ids[0]
    ]


def test_tokens_of_folded_characters_are_the_references(weights: Path) -> None:
    """The parity fixture (made by the reference under transformers 4.57) has a prompt with
    characters NFKC folds; ours must give its ids under any installed transformers."""
    ref, meta = read_fixture("encoders_t5")
    prompts = json.loads(meta["t5_prompts"])
    index = prompts.index(FOLDED)
    tok = load_tokenizer(weights / "Wan2.1-I2V-14B-480P" / "google" / "umt5-xxl")
    assert tok([FOLDED]).input_ids[0].tolist() == ref[f"ids{index}"].tolist()


def test_truncation_keeps_the_eos(weights: Path) -> None:
    tok = load_tokenizer(weights / "Wan2.1-I2V-14B-480P" / "google" / "umt5-xxl", max_length=6)
    batch = tok(["the man is talking to the camera", "a man"])
    assert batch.input_ids.shape == (2, 6)
    assert batch.input_ids[0, -1].item() == 1  # </s>
    assert batch.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]


def test_tokenizer_folder_without_tokenizer_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_wav2vec_loads_in_the_requested_dtype(weights: Path, dtype: torch.dtype) -> None:
    encoder = load_wav2vec(weights, TINY_WAV2VEC, dtype=dtype)
    assert {p.dtype for p in encoder.model.parameters()} == {dtype}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wav2vec_features_match_the_reference(weights: Path, dtype: torch.dtype) -> None:
    encoder = load_wav2vec(weights, TINY_WAV2VEC, dtype=dtype)
    ref, _ = read_fixture("encoders_audio")
    features = encoder.audio_features(ref["single"].numpy())
    assert features.dtype == torch.float32  # returned as float32 whatever the model dtype
    assert rel_err(features, ref["emb_single"]) <= 1e-4
