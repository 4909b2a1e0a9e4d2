"""Flow-matching sampler: shifted timesteps and the Euler update, as pure functions.

Conventions (model.md 1.9): `x_sigma = (1 - sigma) * x0 + sigma * noise`, the DiT predicts
`v = noise - x0` for a timestep `t = 1000 * sigma`. The schedule is `linspace(1000, 1, N)` in
float32 with a trailing 0, every value passed through the shift transform
`1000 * shift * u / (1 + (shift - 1) * u)` with `u = t / 1000` (so 1000 stays 1000 and 0 stays 0).
The arithmetic below follows the reference's operation order in float32, so the schedule and
every step are bit-identical to it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


def shift_timesteps(t: Tensor, shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """The shift transform on timesteps in [0, num_train]."""
    u = t / num_train
    return shift * u / (1 + (shift - 1) * u) * num_train


def timesteps(num_steps: int, shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """The N + 1 shifted timesteps of an N-step run, float32 [N + 1], last one 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    grid = np.linspace(num_train, 1, num_steps, dtype=np.float32)
    t = torch.from_numpy(np.append(grid, np.float32(0.0)))  # [N + 1] float32
    return shift_timesteps(t, shift, num_train)


def euler_step(
    latent: Tensor, velocity: Tensor, t: Tensor, t_next: Tensor, num_train: int = NUM_TRAIN_TIMESTEPS
) -> Tensor:
    """One Euler step from t to t_next (t > t_next): `latent - velocity * (t - t_next) / num_train`.

    latent, velocity: [C, F, H, W] float32; t, t_next: 0-d or [1] float32 tensors.
    """
    dt = (t.reshape(1) - t_next.reshape(1)) / num_train  # [1]
    return latent + (-velocity) * dt[:, None, None, None]
