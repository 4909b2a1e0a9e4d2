"""Random DiT inputs for the tiny model's tests (the plain, block-swap, kernel and sequence-parallel ones)."""

from __future__ import annotations

from typing import Any

import torch


def make_inputs(
    cfg: Any,
    *,
    speakers: int = 1,
    frames: int = 3,
    batch: int = 1,
    seed: int = 0,
    background_row: bool = False,
) -> dict[str, torch.Tensor]:
    """The keyword arguments of a DiT forward on a `frames` x 4 x 6 latent grid, drawn from `seed`.
    The region masks give person 1 the left half and person 2 the right; `background_row` also
    marks the first row as background (otherwise the background mask is empty)."""
    g = torch.Generator().manual_seed(seed)
    h, w = 4, 6
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2] = 1
    masks[1, :, w // 2 :] = 1
    if background_row:
        masks[2, :1] = 1
    audio_rows = 4 * (frames - 1) + 1  # video frames of `frames` latent frames
    return {
        "x": torch.randn(batch, 16, frames, h, w, generator=g),
        "t": torch.full((batch,), 640.0),
        "context": torch.randn(batch, 5, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(batch, cfg.clip_tokens, cfg.clip_dim, generator=g),
        "y": torch.randn(batch, 20, frames, h, w, generator=g),
        "audio": torch.randn(
            batch, speakers, audio_rows, cfg.audio_window, cfg.audio_blocks, cfg.audio_channels, generator=g
        ),
        "ref_target_masks": masks,
    }
