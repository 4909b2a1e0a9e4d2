"""Weights folders as users really have them (issue 14): a Wan folder prepared for MultiTalk, and
folders without the optional files. Real files on disk, the real loader and the real checker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from daemon.cli import main
from pipeline.config import WAN_DIR, load_model_config
from pipeline.models.dit import is_audio_key
from pipeline.weights import LORA_FILE, WAN_INDEX, WAN_SHARDS, audio_file, foreign_wan_files, load_dit
from pipeline.weights_check import check_weights

MULTITALK = "multitalk.safetensors"


def write_multitalk_release(weights: Path) -> Path:
    """`weights/MeiGen-MultiTalk/` as its hub repo ships it: an index naming the Wan shards and
    `multitalk.safetensors` (its audio modules, here different values from InfiniteTalk's)."""
    folder = weights / "MeiGen-MultiTalk"
    folder.mkdir()
    audio = load_file(str(audio_file(weights, "single")))
    save_file({k: v + 1.0 for k, v in audio.items()}, str(folder / MULTITALK), metadata={"format": "pt"})
    wan_index = json.loads((weights / WAN_DIR / WAN_INDEX).read_text())
    weight_map = {**wan_index["weight_map"], **dict.fromkeys(audio, MULTITALK)}
    (folder / WAN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder


def prepare_for_multitalk(weights: Path, *, index: bool, link: bool) -> None:
    """MultiTalk's README steps: move the Wan index aside, link MultiTalk's in, link its file in."""
    multitalk, wan = write_multitalk_release(weights), weights / WAN_DIR
    if index:
        (wan / WAN_INDEX).rename(wan / f"{WAN_INDEX}_old")
        (wan / WAN_INDEX).symlink_to((multitalk / WAN_INDEX).absolute())
    if link:
        (wan / MULTITALK).symlink_to((multitalk / MULTITALK).absolute())


@pytest.mark.parametrize(
    ("index", "link"),
    [(True, True), (True, False), (False, True)],
    ids=["index-replaced-and-file-linked", "index-replaced", "file-linked"],
)
def test_a_multitalk_prepared_folder_loads_the_wan_and_infinitetalk_weights(
    tiny_weights_dir: Path, weights_copy: Path, index: bool, link: bool
) -> None:
    prepare_for_multitalk(weights_copy, index=index, link=link)
    cfg = load_model_config(weights_copy).dit
    model = load_dit(weights_copy, cfg, dtype=torch.float32)
    plain = load_dit(tiny_weights_dir, cfg, dtype=torch.float32)
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key  # not MultiTalk's audio values
    foreign = foreign_wan_files(weights_copy)
    assert (MULTITALK in foreign.index_entries) is index
    assert (MULTITALK in foreign.extra_files) is link
    n_audio = sum(is_audio_key(k) for k in plain.state_dict())
    if index:
        assert foreign.index_entries[MULTITALK] == n_audio
    assert "ignored" in foreign.describe() and "MultiTalk" in foreign.describe()


@pytest.mark.parametrize(("index", "link"), [(True, True), (True, False)], ids=["linked", "index-only"])
def test_check_says_ok_with_a_note_for_a_multitalk_folder(
    weights_copy: Path, index: bool, link: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare_for_multitalk(weights_copy, index=index, link=link)
    assert main(["weights", "check", str(weights_copy)]) == 0
    text = capsys.readouterr().out
    assert "result: OK" in text
    note = next(line for line in text.splitlines() if "NOTE" in line and MULTITALK in line)
    assert "ignored" in note and f"{WAN_DIR}/" in note
    assert f"OK       {WAN_DIR}/{WAN_INDEX}: " in text  # the Wan part of MultiTalk's index


def test_shards_are_read_by_name_even_when_the_index_names_others(weights_copy: Path) -> None:
    """The reference reads the seven shard names; a stale or foreign index changes nothing."""
    (weights_copy / WAN_DIR / WAN_INDEX).write_text('{"weight_map": {"x": "elsewhere.safetensors"}}')
    cfg = load_model_config(weights_copy).dit
    load_dit(weights_copy, cfg, dtype=torch.float32)
    report = check_weights(weights_copy)
    assert report.ok, report.format()
    assert "elsewhere.safetensors (1 keys)" in report.format()
    (weights_copy / WAN_DIR / WAN_INDEX).write_text("not json")
    load_dit(weights_copy, cfg, dtype=torch.float32)
    assert check_weights(weights_copy).ok


def test_a_missing_released_shard_is_still_an_error(weights_copy: Path) -> None:
    prepare_for_multitalk(weights_copy, index=True, link=True)
    (weights_copy / WAN_DIR / WAN_SHARDS[6]).unlink()
    report = check_weights(weights_copy)
    assert not report.ok
    assert any(f.status == "missing" and f.path.endswith(WAN_SHARDS[6]) for f in report.findings)


def test_optional_files_absent_are_notes_and_exit_0(
    weights_copy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(weights_copy)  # no ./infinitetalk.toml here
    monkeypatch.delenv("INFINITETALK_CONFIG", raising=False)
    audio_file(weights_copy, "multi").unlink()
    (weights_copy / LORA_FILE).unlink()
    assert main(["weights", "check", str(weights_copy)]) == 0
    text = capsys.readouterr().out
    assert "result: OK" in text
    assert (
        "NOTE     InfiniteTalk/multi/infinitetalk.safetensors: file not present (optional: two-speaker"
        in text
    )
    assert f"NOTE     {LORA_FILE}: lightx2v LoRA not present (optional" in text


def test_a_lora_named_by_the_config_is_required(
    weights_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "infinitetalk.toml"
    config.write_text(f'weights_dir = "{weights_copy}"\nlora = ["{LORA_FILE}"]\n')
    assert main(["weights", "check", str(weights_copy), "--config", str(config)]) == 0
    capsys.readouterr()
    (weights_copy / LORA_FILE).unlink()
    assert main(["weights", "check", str(weights_copy), "--config", str(config)]) == 1
    text = capsys.readouterr().out
    assert f"MISSING  {LORA_FILE}: LoRA named by the config (lora) not present" in text
    assert "result: 1 problem(s)" in text


def test_a_present_but_wrong_optional_file_is_still_wrong(weights_copy: Path) -> None:
    path = audio_file(weights_copy, "multi")
    state = load_file(str(path))
    state["audio_proj.proj3.bias"] = torch.zeros(5)
    save_file(state, str(path))
    report = check_weights(weights_copy)
    assert not report.ok
    assert any(f.status == "wrong" and "multi" in f.path for f in report.findings)
