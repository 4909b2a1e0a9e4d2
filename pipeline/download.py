"""Fetch the released weights from the Hugging Face Hub into the layout of CONTRACT.md section 9.

Only the files the service reads are requested (the MeiGen repository alone is ~159 GB with
every quantized variant). Downloads resume: huggingface_hub skips complete files and continues
partial ones. The plan is data (`download_plan`), so it can be inspected and tested offline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import WAN_DIR
from pipeline.tts_text import KOKORO_CONFIG, KOKORO_DIR, KOKORO_REPO, KOKORO_WEIGHTS, VOICES_DIR

LORA_REPO = "Kijai/WanVideo_comfy"
LORA_FILE = "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"


@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadItem:
    repo_id: str
    local_dir: str  # relative to the weights folder
    allow_patterns: tuple[str, ...]
    revision: str | None = None


def download_plan(*, fp8: bool = False, multi: bool = True) -> tuple[DownloadItem, ...]:
    """What `infinitetalk weights download` fetches, in order."""
    infinitetalk = ["single/infinitetalk.safetensors"]
    if multi:
        infinitetalk.append("multi/infinitetalk.safetensors")
    if fp8:
        infinitetalk += [
            "quant_models/infinitetalk_single_fp8.safetensors",
            "quant_models/infinitetalk_single_fp8.json",
        ]
        if multi:
            infinitetalk += [
                "quant_models/infinitetalk_multi_fp8.safetensors",
                "quant_models/infinitetalk_multi_fp8.json",
            ]
    return (
        DownloadItem(
            repo_id="Wan-AI/Wan2.1-I2V-14B-480P",
            local_dir=WAN_DIR,
            allow_patterns=(
                "config.json",
                "diffusion_pytorch_model*.safetensors",
                "diffusion_pytorch_model.safetensors.index.json",
                "models_t5_umt5-xxl-enc-bf16.pth",
                "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                "Wan2.1_VAE.pth",
                "google/umt5-xxl/*",
                "xlm-roberta-large/*",
            ),
        ),
        DownloadItem(
            repo_id="TencentGameMate/chinese-wav2vec2-base",
            local_dir="chinese-wav2vec2-base",
            allow_patterns=("config.json", "preprocessor_config.json"),
        ),
        DownloadItem(
            repo_id="TencentGameMate/chinese-wav2vec2-base",
            local_dir="chinese-wav2vec2-base",
            allow_patterns=("model.safetensors",),
            revision="refs/pr/1",
        ),
        DownloadItem(
            repo_id="MeiGen-AI/InfiniteTalk", local_dir="InfiniteTalk", allow_patterns=tuple(infinitetalk)
        ),
        DownloadItem(repo_id=LORA_REPO, local_dir=".", allow_patterns=(LORA_FILE,)),
        # text-to-speech jobs (tts_audio): the model, its config and every voice (~360 MB)
        DownloadItem(
            repo_id=KOKORO_REPO,
            local_dir=KOKORO_DIR,
            allow_patterns=(KOKORO_CONFIG, KOKORO_WEIGHTS, f"{VOICES_DIR}/*.pt"),
        ),
    )


Downloader = Callable[..., str]


def download_weights(
    weights_dir: Path,
    *,
    fp8: bool = False,
    multi: bool = True,
    downloader: Downloader | None = None,
    on_item: Callable[[DownloadItem], None] | None = None,
) -> tuple[DownloadItem, ...]:
    """Run the plan with `huggingface_hub.snapshot_download` (or `downloader`, same signature)."""
    if downloader is None:
        from huggingface_hub import snapshot_download

        downloader = snapshot_download
    plan = download_plan(fp8=fp8, multi=multi)
    for item in plan:
        if on_item is not None:
            on_item(item)
        target = Path(weights_dir) / item.local_dir
        target.mkdir(parents=True, exist_ok=True)
        downloader(
            repo_id=item.repo_id,
            revision=item.revision,
            local_dir=str(target),
            allow_patterns=list(item.allow_patterns),
        )
    return plan
