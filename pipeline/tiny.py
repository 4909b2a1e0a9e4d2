"""`write_tiny_weights(out_dir, seed)`: a complete weights folder with tiny random tensors.

Same layout, file names, key names and dtypes as the released weights (CONTRACT.md section 9),
tiny shapes, plus `tiny.json` giving every hyper-parameter (read by `load_model_config`):

    tiny.json
    Wan2.1-I2V-14B-480P/config.json
    Wan2.1-I2V-14B-480P/diffusion_pytorch_model-0000{1..7}-of-00007.safetensors + .index.json  (fp32)
    Wan2.1-I2V-14B-480P/{Wan2.1_VAE.pth, models_t5_*.pth, models_clip_*.pth, google/, xlm-roberta-large/}
    chinese-wav2vec2-base/...                                   (encoders: pipeline.tiny_encoders)
    InfiniteTalk/single/infinitetalk.safetensors                (audio modules, fp32)
    InfiniteTalk/multi/infinitetalk.safetensors
    InfiniteTalk/quant_models/infinitetalk_single_fp8.safetensors + .json   (quanto fp8 layout)
    Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors         (rank 4, bf16)

DiT values come from one `torch.Generator(seed)` drawn in a fixed key order, so the same seed
always gives the same bytes. The whole folder is a few MB.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from pipeline.config import TINY_JSON, WAN_DIR, DiTConfig, GenerationConfig, config_to_dict
from pipeline.models.dit import dit_param_shapes, is_audio_key
from pipeline.quant import QUANTO_FP8, quantize_fp8
from pipeline.weights import LORA_FILE, WAN_INDEX, WAN_SHARDS, Variant, audio_file, quant_files

#: tiny resolution buckets [H, W] (multiples of 16: VAE stride 8 x patch 2)
TINY_BUCKETS: dict[str, list[list[int]]] = {
    "infinitetalk-480": [[48, 80], [64, 64], [80, 48]],
    "infinitetalk-720": [[64, 96], [96, 96], [96, 64]],
}
#: fewer frames per chunk than the released 81 keeps CPU renders quick (still 4n+1)
TINY_GENERATION = GenerationConfig(frame_num=33, motion_frame=9)
LORA_RANK = 4
#: lightx2v-style LoRA targets per block (a T2V LoRA: no k_img/v_img, no audio modules)
LORA_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)


def tiny_dit_config(
    text_dim: int, clip_dim: int, clip_tokens: int, audio_blocks: int, audio_channels: int
) -> DiTConfig:
    return DiTConfig(
        dim=64,
        ffn_dim=128,
        num_heads=2,
        num_layers=2,
        text_dim=text_dim,
        audio_blocks=audio_blocks,
        audio_channels=audio_channels,
        intermediate_dim=8,
        output_dim=16,
        context_tokens=4,
        clip_dim=clip_dim,
        clip_tokens=clip_tokens,
    )


def random_param(gen: torch.Generator, key: str, shape: tuple[int, ...]) -> Tensor:
    """A well-scaled random float32 value for a DiT parameter, chosen by its name and shape."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key.endswith("modulation"):
        return noise / math.sqrt(shape[-1])
    if key.endswith(".bias"):
        return 0.05 * noise
    if len(shape) == 1:  # norm scales
        return 1.0 + 0.1 * noise
    fan_in = math.prod(shape[1:])
    return noise / math.sqrt(fan_in)


def random_dit_state(cfg: DiTConfig, gen: torch.Generator) -> dict[str, Tensor]:
    return {k: random_param(gen, k, s) for k, s in dit_param_shapes(cfg).items()}


def write_wan_shards(wan_dir: Path, cfg: DiTConfig, base: dict[str, Tensor]) -> None:
    """The base keys split over the seven released shard names, plus the index and config.json."""
    keys = list(base)
    per = math.ceil(len(keys) / len(WAN_SHARDS))
    weight_map: dict[str, str] = {}
    for i, name in enumerate(WAN_SHARDS):
        part = {k: base[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(wan_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in base.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (wan_dir / WAN_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": cfg.dim,
        "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim,
        "model_type": "i2v",
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "out_dim": cfg.out_dim,
        "text_len": cfg.text_len,
    }
    (wan_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def quantized_state(state: dict[str, Tensor], linears: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimum-quanto style fp8 state dict (+ map) of a full model: linears quantized, rest bf16."""
    out: dict[str, Tensor] = {}
    qmap: dict[str, Any] = {}
    linear_set = set(linears)
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in linear_set and leaf == "weight":
            data, scale = quantize_fp8(value, scale_dtype=torch.bfloat16)
            out[f"{owner}.weight._data"] = data
            out[f"{owner}.weight._scale"] = scale
            out[f"{owner}.input_scale"] = torch.ones((), dtype=torch.bfloat16)
            out[f"{owner}.output_scale"] = torch.ones((), dtype=torch.bfloat16)
            qmap[owner] = {"weights": QUANTO_FP8, "activations": "none"}
        else:
            out[key] = value.to(torch.bfloat16)
    return out, qmap


def linear_names(cfg: DiTConfig) -> list[str]:
    from pipeline.models.dit import build_dit

    return [n for n, m in build_dit(cfg).named_modules() if isinstance(m, torch.nn.Linear)]


def lora_state(cfg: DiTConfig, gen: torch.Generator) -> dict[str, Tensor]:
    """lightx2v-style LoRA: lora_down/lora_up per linear, diff_b on q biases, diff on norm3; and the
    keys the reference ignores: alpha (1, not the rank: an alpha/rank factor would show), a
    modulation `diff_m`, a PEFT `lora_A`/`lora_B` pair and a key without the prefix. The ignored
    keys hold constants, so they take nothing from `gen`."""
    shapes = dit_param_shapes(cfg)
    out: dict[str, Tensor] = {}
    for i in range(cfg.num_layers):
        for lin in LORA_LINEARS:
            name = f"blocks.{i}.{lin}"
            o, n_in = shapes[f"{name}.weight"]
            out[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(
                LORA_RANK, n_in, generator=gen
            ) / math.sqrt(n_in)
            out[f"diffusion_model.{name}.lora_up.weight"] = 0.1 * torch.randn(o, LORA_RANK, generator=gen)
            out[f"diffusion_model.{name}.alpha"] = torch.tensor(1.0)
        out[f"diffusion_model.blocks.{i}.self_attn.q.diff_b"] = 0.05 * torch.randn(cfg.dim, generator=gen)
        out[f"diffusion_model.blocks.{i}.norm3.diff"] = 0.05 * torch.randn(cfg.dim, generator=gen)
    out["diffusion_model.head.head.diff_b"] = 0.05 * torch.randn(shapes["head.head.bias"], generator=gen)
    o, n_in = shapes["blocks.0.self_attn.k.weight"]
    out["diffusion_model.blocks.0.diff_m"] = torch.full(shapes["blocks.0.modulation"], 0.5)
    out["diffusion_model.blocks.0.self_attn.k.lora_A.weight"] = torch.full((LORA_RANK, n_in), 0.5)
    out["diffusion_model.blocks.0.self_attn.k.lora_B.weight"] = torch.full((o, LORA_RANK), 0.5)
    out["blocks.0.self_attn.k.lora_down.weight"] = torch.full((LORA_RANK, n_in), 0.5)
    out["blocks.0.self_attn.k.lora_up.weight"] = torch.full((o, LORA_RANK), 0.5)
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


def write_tiny_weights(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny weights folder into `out_dir` (created if needed); returns `out_dir`."""
    from pipeline.models.clip import ClipConfig
    from pipeline.models.t5 import T5Config
    from pipeline.models.wav2vec import Wav2VecConfig
    from pipeline.tiny_encoders import write_tiny_encoders

    out_dir = Path(out_dir)
    wan_dir = out_dir / WAN_DIR
    wan_dir.mkdir(parents=True, exist_ok=True)
    sections = write_tiny_encoders(out_dir, seed)
    t5 = T5Config(**sections["t5"])
    clip = ClipConfig(**sections["clip"])
    w2v = Wav2VecConfig(**sections["wav2vec2"])
    cfg = tiny_dit_config(t5.dim, clip.dim, clip.num_tokens, w2v.num_layers, w2v.hidden_size)
    cfg = dataclasses.replace(cfg, text_len=t5.text_len)

    gen = torch.Generator().manual_seed(seed)
    single = random_dit_state(cfg, gen)
    base = {k: v for k, v in single.items() if not is_audio_key(k)}
    write_wan_shards(wan_dir, cfg, base)
    variants: tuple[tuple[Variant, dict[str, Tensor]], ...] = (
        ("single", single),
        ("multi", random_dit_state(cfg, gen)),
    )
    for variant, state in variants:
        path = audio_file(out_dir, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in state.items() if is_audio_key(k)},
            str(path),
            metadata={"format": "pt"},
        )
    q_file, q_map = quant_files(out_dir, "single")
    q_file.parent.mkdir(parents=True, exist_ok=True)
    qstate, qmap = quantized_state(single, linear_names(cfg))
    save_file(qstate, str(q_file), metadata={"format": "pt"})
    q_map.write_text(json.dumps(qmap, indent=2) + "\n")
    save_file(lora_state(cfg, gen), str(out_dir / LORA_FILE), metadata={"format": "pt"})

    tiny = {
        "format": 1,
        "seed": seed,
        "dit": config_to_dict(cfg),
        **{k: sections[k] for k in ("vae", "t5", "clip", "wav2vec2")},
        "buckets": TINY_BUCKETS,
        "generation": config_to_dict(TINY_GENERATION),
    }
    (out_dir / TINY_JSON).write_text(json.dumps(tiny, indent=2) + "\n")
    return out_dir
