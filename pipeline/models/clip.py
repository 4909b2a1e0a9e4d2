"""CLIP ViT-H/14 visual tower of `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`.

Shape legend
    B images · H, W input height/width · S image size (224) · P patch (14) · G = S/P (16)
    T tokens = 1 + G*G (257: class token first) · D width (1280)
    encode_image_clip(frames [B, 3, H, W] in [-1, 1]) -> [B, T, D]

What the reference computes, and we reproduce: bicubic resize (no antialias, aspect not kept) to
S x S, map to [0, 1], normalise with the OpenAI CLIP mean/std, then the ViT up to the output of its
penultimate block (31 of 32; no post-norm, no head).

The network is transformers' `CLIPVisionModel` built with `num_layers - 1` layers (same math as
open-clip's tower: pre-norm blocks, `pre_norm` after the position embedding, exact GELU,
LayerNorm eps 1e-5, attention scale 1/sqrt(head_dim)). Keys are mapped at load time (the fused
`to_qkv` is split into q/k/v). The released file also holds tensors this tower does not use; they
are skipped *by name*, never silently: the last block (`visual.transformer.{L-1}.*`), the head
(`visual.head`), the XLM-R text tower (`textual.*`) and `log_scale` (see `UNUSED_PREFIXES`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.released import check_mapping, expected_shapes, load_pth

CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_TOKENIZER_DIR = "xlm-roberta-large"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_LAYER_KEYS = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight",
    "mlp.2.bias": "mlp.fc2.bias",
}
_LAYER_RE = re.compile(r"visual\.transformer\.(\d+)\.(.+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClipConfig:
    """XLM-R CLIP ViT-H/14 hyper-parameters (defaults: the released file). Text fields only shape the file."""

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    num_heads: int = 16
    num_layers: int = 32
    embed_dim: int = 1024
    text_vocab_size: int = 250002
    text_dim: int = 1024
    text_layers: int = 24
    text_max_len: int = 514

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2

    @property
    def used_layers(self) -> int:
        return self.num_layers - 1  # the reference's use_31_block


def unused_prefixes(cfg: ClipConfig) -> tuple[str, ...]:
    """Key prefixes present in the released file that the visual features never use."""
    return (f"visual.transformer.{cfg.num_layers - 1}.", "visual.head", "textual.", "log_scale")


def checkpoint_shapes(cfg: ClipConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the released CLIP `.pth` with its shape (float32 in the release)."""
    d, t, m = cfg.dim, cfg.text_dim, cfg.dim * cfg.mlp_ratio
    shapes: dict[str, tuple[int, ...]] = {
        "log_scale": (),
        "visual.patch_embedding.weight": (d, 3, cfg.patch_size, cfg.patch_size),
        "visual.cls_embedding": (1, 1, d),
        "visual.pos_embedding": (1, cfg.num_tokens, d),
        "visual.pre_norm.weight": (d,),
        "visual.pre_norm.bias": (d,),
    }
    for i in range(cfg.num_layers):
        p = f"visual.transformer.{i}."
        shapes |= {
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "attn.to_qkv.weight": (3 * d, d), p + "attn.to_qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.0.weight": (m, d), p + "mlp.0.bias": (m,),
            p + "mlp.2.weight": (d, m), p + "mlp.2.bias": (d,),
        }  # fmt: skip
    shapes |= {
        "visual.post_norm.weight": (d,),
        "visual.post_norm.bias": (d,),
        "visual.head": (d, cfg.embed_dim),
    }
    shapes |= {
        "textual.token_embedding.weight": (cfg.text_vocab_size, t),
        "textual.type_embedding.weight": (1, t),
        "textual.pos_embedding.weight": (cfg.text_max_len, t),
        "textual.norm.weight": (t,),
        "textual.norm.bias": (t,),
    }
    for i in range(cfg.text_layers):
        p = f"textual.blocks.{i}."
        for name in ("q", "k", "v", "o"):
            shapes |= {p + f"attn.{name}.weight": (t, t), p + f"attn.{name}.bias": (t,)}
        shapes |= {
            p + "norm1.weight": (t,), p + "norm1.bias": (t,),
            p + "ffn.0.weight": (4 * t, t), p + "ffn.0.bias": (4 * t,),
            p + "ffn.2.weight": (t, 4 * t), p + "ffn.2.bias": (t,),
            p + "norm2.weight": (t,), p + "norm2.bias": (t,),
        }  # fmt: skip
    mid = (t + cfg.embed_dim) // 2
    shapes |= {"textual.head.0.weight": (mid, t), "textual.head.2.weight": (cfg.embed_dim, mid)}
    return shapes


def map_state_dict(
    state: dict[str, Tensor], cfg: ClipConfig, expected: dict[str, tuple[int, ...]], source: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename the used `visual.*` tensors to `CLIPVisionModel` names (splitting `to_qkv`).

    Returns (mapped state, skipped keys). Raises naming any key that is neither used nor in
    `unused_prefixes`, any model parameter left unfilled, and any shape mismatch.
    """
    prefix = next(k for k in expected if k.endswith("embeddings.class_embedding")).removesuffix(
        "embeddings.class_embedding"
    )
    skip = unused_prefixes(cfg)
    d = cfg.dim
    mapped: dict[str, Tensor] = {}
    skipped: list[str] = []
    unknown: list[str] = []
    for key, tensor in state.items():
        if key.startswith(skip):
            skipped.append(key)
        elif key == "visual.patch_embedding.weight":
            mapped[prefix + "embeddings.patch_embedding.weight"] = tensor
        elif key == "visual.cls_embedding":
            mapped[prefix + "embeddings.class_embedding"] = tensor.reshape(-1)
        elif key == "visual.pos_embedding":
            mapped[prefix + "embeddings.position_embedding.weight"] = tensor.reshape(tensor.shape[-2], -1)
        elif key.startswith("visual.pre_norm."):
            mapped[prefix + "pre_layrnorm." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("visual.post_norm."):
            mapped[prefix + "post_layernorm." + key.rsplit(".", 1)[1]] = tensor
        elif (match := _LAYER_RE.fullmatch(key)) is not None:
            layer, rest = prefix + f"encoder.layers.{match.group(1)}.", match.group(2)
            if rest in ("attn.to_qkv.weight", "attn.to_qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(d, dim=0), strict=True):
                    mapped[layer + f"self_attn.{name}.{kind}"] = part
            elif rest in _LAYER_KEYS:
                mapped[layer + _LAYER_KEYS[rest]] = tensor
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    extra = sorted(set(mapped) - set(expected))
    what = "CLIP weights do not match ClipConfig"
    check_mapping(source, what, mapped, expected, unmapped=unknown + extra, filled=set(mapped))
    return mapped, skipped


def _hf_config(cfg: ClipConfig) -> Any:  # a transformers.CLIPVisionConfig
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=cfg.dim,
        intermediate_size=cfg.dim * cfg.mlp_ratio,
        num_hidden_layers=cfg.used_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=cfg.embed_dim,
    )


class ImageEncoder:
    """The CLIP visual tower, resident on one device. Call `encode_image_clip(frames)`."""

    def __init__(self, model: torch.nn.Module, cfg: ClipConfig) -> None:
        self.model = model
        self.cfg = cfg

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, frames: Tensor) -> Tensor:
        """frames [B, 3, H, W] in [-1, 1] -> normalised pixels [B, 3, S, S] (float32)."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(
                f"encode_image_clip expects frames [B, 3, H, W], got shape {tuple(frames.shape)}"
            )
        size = (self.cfg.image_size, self.cfg.image_size)
        x = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_image_clip(self, frames: Tensor) -> Tensor:
        """frames [B, 3, H, W] in [-1, 1] -> penultimate-block tokens [B, 257, D] in the model dtype."""
        pixels = self.preprocess(frames.to(self.device)).to(self.dtype)
        return self.model(pixel_values=pixels).last_hidden_state  # [B, T, D], no post-norm


def load_clip(
    weights_dir: Path,
    cfg: ClipConfig = ClipConfig(),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
) -> ImageEncoder:
    """Load the visual tower from `<weights_dir>/Wan2.1-I2V-14B-480P/<CLIP file>`.

    float16 by default, as the reference.
    """
    from transformers import CLIPVisionModel

    file = Path(weights_dir) / "Wan2.1-I2V-14B-480P" / CLIP_FILE
    if not file.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {file}")
    state = load_pth(file)
    with torch.device("meta"):
        model = CLIPVisionModel(_hf_config(cfg))
    mapped, _ = map_state_dict(state, cfg, expected_shapes(model), str(file))
    mapped = {k: v.to(device=device, dtype=dtype) for k, v in mapped.items()}
    model.load_state_dict(mapped, strict=True, assign=True)
    _materialise_buffers(model, device)
    return ImageEncoder(model.eval().requires_grad_(False), cfg)


def _materialise_buffers(model: torch.nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers (position ids) are not in any state dict: rebuild them off the meta device."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"unexpected meta buffer {name} in {type(module).__name__}")
                module.register_buffer(
                    name, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False
                )
