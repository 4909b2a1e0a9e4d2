"""Where a render draws its random numbers (the initial noise of every chunk).

Two choices, `GenerationRequest.noise` (config `[defaults] noise`, job key `noise`):

- "portable" (default): a CPU `torch.Generator` seeded with the job's seed. The same seed gives
  the same video on any machine: CPU or GPU, any GPU model, any CUDA or driver version, and the
  tiny model's CPU renders match the GPU's draws. It is not the reference's video for that seed.
- "reference": a generator on the render device, as the reference draws its noise there
  (`torch.manual_seed(seed)` then `torch.randn(..., device="cuda")`, plus its dead motion draws;
  `pipeline.pipeline` keeps that order). On a CUDA device the same seed gives the reference's
  noise, so the reference's video for that seed (up to the numerics of the kernels). CUDA's
  generator is the same Philox stream on every NVIDIA GPU for a given torch release; on a CPU
  device it is the portable stream.

Either way the generator's state is saved with each chunk checkpoint, so a resumed render draws
exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import torch

from pipeline.types import NOISE_MODES, NoiseMode


def noise_generator(mode: NoiseMode, seed: int, device: torch.device | str) -> torch.Generator:
    """A generator seeded with `seed`: on the CPU ("portable") or on `device` ("reference")."""
    if mode not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)}, got {mode!r}")
    where = torch.device("cpu") if mode == "portable" else torch.device(device)
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    return torch.Generator(device=where).manual_seed(seed)
