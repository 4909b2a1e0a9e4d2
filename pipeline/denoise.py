"""The chunk loop as a pure function: Euler steps over the guidance passes of one chunk.

    cond = ChunkConditions(clip_fea=..., y=..., motion=..., masks=..., by_pass={COND: (context, audio), ...})
    latent = denoise_chunk(dit, noise, cond, steps, passes, text_scale, audio_scale, apg)

`denoise_chunk` owns no state: the caller draws the noise (`advance_motion_noise` keeps the
generator where the reference leaves it), builds the conditioning (`image_condition`,
`encode_one_frame`) and decodes the result. `InfiniteTalkPipeline` and `infinitetalk bench`
(pipeline/bench.py) run this same loop.

Per step (model.md 1.9): the motion latents overwrite the first latent frames, the DiT runs the
passes the guidance scales need (`pipeline.guidance.passes`), `guidance.combine` mixes them,
`sampler.euler_step` advances, and the motion latents overwrite the first frames again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline import guidance, sampler
from pipeline.types import StopRequested


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkConditions:
    """What the DiT sees of one chunk besides the noisy latents (all on the DiT's device)."""

    clip_fea: Tensor  # [1, 257, Dc] CLIP of the reference frame
    y: Tensor  # [1, 4 + 16, f, h, w] first-frame mask | VAE(reference + grey frames)
    motion: Tensor  # [16, n_motion, h, w] clean motion latents, kept at the chunk's start
    masks: Tensor | None  # [3, h, w] speaker regions (two speakers), else None
    by_pass: Mapping[str, tuple[Tensor, Tensor]]  # guidance pass -> (text context, audio windows)


def denoise_chunk(
    dit: Any,
    latent: Tensor,
    cond: ChunkConditions,
    steps: Tensor,
    passes: Sequence[str],
    text_scale: float,
    audio_scale: float,
    apg: guidance.APG | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Tensor:
    """Sample one chunk: `latent` [16, f, h, w] (float32 noise) -> the clean latents.

    `steps` are the timesteps (len = number of steps + 1); `passes` the DiT passes of a step, each
    a key of `cond.by_pass`. `should_stop` is asked before every step (True raises
    StopRequested); `on_step(i)` is told after step i (1-based). `apg` carries its momentum
    across the chunk's steps (the caller makes a fresh one per chunk, as the reference).
    """
    n_motion = cond.motion.shape[1]
    forward_passes = getattr(dit, "forward_passes", None)
    for i in range(len(steps) - 1):
        if should_stop is not None and should_stop():
            raise StopRequested(f"stop requested before step {i + 1}")
        latent[:, :n_motion] = cond.motion
        t = steps[i : i + 1]
        inputs = [
            (latent[None], t, cond.by_pass[n][0], cond.clip_fea, cond.y, cond.by_pass[n][1], cond.masks)
            for n in passes
        ]
        if forward_passes is not None and len(inputs) > 1:  # streamed blocks: one copy per step
            outs = forward_passes(inputs)
        else:
            outs = [dit(*args) for args in inputs]
        preds = {name: out[0] for name, out in zip(passes, outs, strict=True)}
        velocity = guidance.combine(preds, text_scale, audio_scale, apg)
        latent = sampler.euler_step(latent, velocity, steps[i], steps[i + 1])
        latent[:, :n_motion] = cond.motion
        if on_step is not None:
            on_step(i + 1)
    return latent


def first_frame_mask(frame_num: int, lat_h: int, lat_w: int, device: torch.device) -> Tensor:
    """The I2V mask channels [4, f, lat_h, lat_w]: latent frame 0 (the reference) is all ones."""
    lat_f = (frame_num - 1) // 4 + 1
    mask = torch.zeros(4, lat_f, lat_h, lat_w, device=device)
    mask[:, 0] = 1.0
    return mask


def image_condition(vae: Any, frame: Tensor, frame_num: int, lat_hw: tuple[int, int]) -> Tensor:
    """y [4 + 16, f, h, w] of a chunk: the first-frame mask, then VAE(reference, frame_num - 1 grey
    frames). `frame` is [3, 1, H, W] in [-1, 1] on the VAE's device; `lat_hw` its latent size."""
    _, _, h, w = frame.shape
    pixels = torch.cat([frame, torch.zeros(3, frame_num - 1, h, w, device=frame.device)], dim=1)
    return torch.cat([first_frame_mask(frame_num, *lat_hw, frame.device), vae.encode(pixels)])


def encode_one_frame(vae: Any, frame: Tensor, temporal_stride: int = 4) -> Tensor:
    """VAE latents [16, 1, h, w] of one frame [3, 1, H, W]. The VAE is causal and encodes the
    first frame on its own, so the first latent of a clip that starts with the frame is the
    frame's latent; the clip form keeps to the encoder's 4n+1 input rule."""
    clip = torch.cat([frame, frame.expand(-1, temporal_stride, -1, -1)], dim=1)
    return vae.encode(clip)[:, :1]


def advance_motion_noise(
    gen: torch.Generator,
    z_dim: int,
    motion_frames: int,
    lat_hw: tuple[int, int],
    draws: int,
    temporal_stride: int = 4,
) -> None:
    """Draw (and drop) the motion latents' noise of a continuing chunk, `draws` times.

    Parity note: the reference noises the motion latents before the loop and after every step,
    then overwrites them with the clean ones before the model sees them: the draws change nothing
    but the generator's position. Drawing them too keeps every later chunk's noise equal to the
    reference's for the same seed (not only the first chunk's). `motion_frames` is the number of
    pixel frames carried over (M); they make 1 + (M - 1) / 4 latent frames.
    """
    n_lat_motion = (motion_frames - 1) // temporal_stride + 1
    for _ in range(draws):
        torch.randn(z_dim, n_lat_motion, *lat_hw, generator=gen, dtype=torch.float32, device=gen.device)
