"""The released `config.json`: keys a future hub revision may add are ignored with a warning (issue 14)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.config import WAN_DIR, DiTConfig, load_model_config

RELEASED = {
    "_class_name": "WanModel",
    "_diffusers_version": "0.30.0",
    "dim": 5120,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "in_dim": 36,
    "model_type": "i2v",
    "num_heads": 40,
    "num_layers": 40,
    "out_dim": 16,
    "text_len": 512,
}


def write(tmp_path: Path, doc: dict) -> Path:
    (tmp_path / WAN_DIR).mkdir()
    (tmp_path / WAN_DIR / "config.json").write_text(json.dumps(doc))
    return tmp_path


def test_the_released_file_gives_the_released_model(tmp_path: Path) -> None:
    assert load_model_config(write(tmp_path, RELEASED)).dit == DiTConfig()


def test_unknown_keys_are_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    doc = {**RELEASED, "rope_scaling": {"type": "none"}, "added_in_2027": 1, "weight_init": False}
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        cfg = load_model_config(write(tmp_path, doc)).dit
    assert cfg == DiTConfig()
    assert "added_in_2027, rope_scaling, weight_init" in caplog.text


def test_reference_options_at_our_value_are_accepted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = {**RELEASED, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True}
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        assert load_model_config(write(tmp_path, doc)).dit == DiTConfig()
    assert caplog.text == ""


def test_a_reference_option_we_do_not_implement_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"qk_norm=False is not supported"):
        load_model_config(write(tmp_path, {**RELEASED, "qk_norm": False}))


def test_weights_check_notes_the_ignored_keys(tmp_path: Path) -> None:
    from pipeline.weights_check import check_weights

    report = check_weights(write(tmp_path, {**RELEASED, "added_in_2027": 1}))
    notes = [f for f in report.findings if f.path.endswith("config.json")]
    assert notes[0].status == "ok"
    assert notes[1].status == "note" and "added_in_2027" in notes[1].detail
