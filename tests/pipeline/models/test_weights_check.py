"""`infinitetalk weights tiny|check|download`: the CLI, the checker's findings, the download plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from daemon.cli import main
from pipeline.config import WAN_DIR
from pipeline.download import download_plan, download_weights
from pipeline.weights_check import check_weights

ROOT = Path(__file__).resolve().parents[3]


def test_cli_tiny_then_check_in_a_fresh_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "weights"

    def weights_cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "daemon.cli", "weights", *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)

    done = weights_cli("tiny", str(out))
    assert done.returncode == 0, done.stderr
    assert "wrote tiny weights" in done.stdout
    done = weights_cli("check", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result: OK" in done.stdout and "InfiniteTalk/multi/infinitetalk.safetensors" in done.stdout


def test_check_reports_missing_and_wrong(weights_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (weights_copy / WAN_DIR / "diffusion_pytorch_model-00003-of-00007.safetensors").unlink()
    audio = weights_copy / "InfiniteTalk" / "multi" / "infinitetalk.safetensors"
    state = load_file(str(audio))
    state["audio_proj.proj3.bias"] = torch.zeros(5)
    save_file(state, str(audio))
    (weights_copy / WAN_DIR / "Wan2.1_VAE.pth").unlink()

    assert main(["weights", "check", str(weights_copy)]) == 1
    text = capsys.readouterr().out
    assert "MISSING  Wan2.1-I2V-14B-480P/diffusion_pytorch_model-00003-of-00007.safetensors" in text
    assert "MISSING  Wan2.1-I2V-14B-480P/ (all shards): missing keys:" in text
    assert (
        "WRONG    InfiniteTalk/multi/infinitetalk.safetensors: wrong shapes: audio_proj.proj3.bias [5]"
        in text
    )
    assert "MISSING  Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth: file not present" in text
    assert "result: 4 problem(s)" in text


def test_check_flags_a_non_fp8_quantized_weight(weights_copy: Path) -> None:
    q = weights_copy / "InfiniteTalk" / "quant_models" / "infinitetalk_single_fp8.safetensors"
    state = load_file(str(q))
    state["blocks.0.ffn.0.weight._data"] = state["blocks.0.ffn.0.weight._data"].to(torch.bfloat16)
    save_file(state, str(q))
    report = check_weights(weights_copy)
    assert not report.ok
    assert any(
        f.status == "wrong" and "blocks.0.ffn.0.weight._data BF16" in f.detail for f in report.findings
    )


def test_check_of_an_empty_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "check", str(tmp_path)]) == 1
    assert "neither tiny.json nor Wan2.1-I2V-14B-480P/config.json" in capsys.readouterr().out


def test_full_size_layout_is_judged_from_config_json(weights_copy: Path) -> None:
    (weights_copy / "tiny.json").unlink()
    report = check_weights(weights_copy)  # full-size shapes expected: the tiny tensors are all wrong
    assert not report.tiny and not report.ok
    text = report.format()
    assert "[full size]" in text and "blocks.0.audio_cross_attn.kv_linear.weight" in text


def test_download_plan_and_layout(tmp_path: Path) -> None:
    calls = []

    def fake_snapshot_download(
        *, repo_id: str, revision: str | None, local_dir: str, allow_patterns: list[str]
    ) -> str:
        calls.append(
            (repo_id, revision, Path(local_dir).relative_to(tmp_path).as_posix(), tuple(allow_patterns))
        )
        return local_dir

    download_weights(tmp_path, downloader=fake_snapshot_download)
    assert [(c[0], c[1], c[2]) for c in calls] == [
        ("Wan-AI/Wan2.1-I2V-14B-480P", None, WAN_DIR),
        ("TencentGameMate/chinese-wav2vec2-base", None, "chinese-wav2vec2-base"),
        ("TencentGameMate/chinese-wav2vec2-base", "refs/pr/1", "chinese-wav2vec2-base"),
        ("MeiGen-AI/InfiniteTalk", None, "InfiniteTalk"),
        ("Kijai/WanVideo_comfy", None, "."),
        ("hexgrad/Kokoro-82M", None, "Kokoro-82M"),
    ]
    assert calls[2][3] == ("model.safetensors",)
    assert calls[4][3] == ("Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",)
    assert "quant_models" not in " ".join(calls[3][3])
    fp8 = download_plan(fp8=True, multi=False)[3].allow_patterns
    assert "quant_models/infinitetalk_single_fp8.json" in fp8 and "multi/infinitetalk.safetensors" not in fp8


def test_download_dry_run_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "download", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "TencentGameMate/chinese-wav2vec2-base @ refs/pr/1" in out and "MeiGen-AI/InfiniteTalk" in out
    assert list(tmp_path.iterdir()) == []


def test_check_names_the_clip_tensors_it_does_not_use(tiny_weights_dir: Path) -> None:
    report = check_weights(tiny_weights_dir)
    notes = [f.detail for f in report.findings if f.status == "note" and "models_clip" in f.path]
    assert report.ok and len(notes) == 1
    assert "textual" in notes[0] and "visual.head" in notes[0]
