"""Classifier-free guidance over text and audio, with only the DiT passes a setting needs.

The DiT is evaluated on up to three conditionings per step (model.md 1.9):

    cond        text + audio
    drop_text   negative prompt + audio
    uncond      negative prompt + null audio
    drop_audio  text + null audio

and the reference combines them as

    text scale != 1:  v = uncond + s_t * (cond - drop_text) + s_a * (drop_text - uncond)   (3 passes)
    text scale == 1:  v = drop_audio + s_a * (cond - drop_audio)                           (2 passes)

Two cases need fewer passes than the reference runs: both scales 1 makes `v = cond` (1 pass; the
reference still runs `drop_audio`), and audio scale 1 with text scale != 1 makes
`v = drop_text + s_t * (cond - drop_text)` (2 passes; `uncond` cancels out).

Adaptive projected guidance (APG, the reference's `--use_apg`; model.md 1.9) replaces each
guidance difference by `apg(diff)`: a momentum-averaged difference (`running = diff + momentum *
running`, one buffer per difference, restarted every chunk), scaled down to an L2 norm of at most
`norm_threshold` (over the whole [C, F, H, W] tensor), of which only the part orthogonal to `cond`
is kept:

    3 passes:  v = cond + (s_t - 1) * apg(cond - drop_text) + (s_a - 1) * apg(drop_text - uncond)
    2 passes:  v = cond + (s_a - 1) * apg(cond - drop_audio)

A scale of 1 zeroes its term, so APG needs the same passes as plain guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

COND = "cond"
DROP_TEXT = "drop_text"
UNCOND = "uncond"
DROP_AUDIO = "drop_audio"


def _is_one(scale: float) -> bool:
    return math.isclose(scale, 1.0)


def passes(text_scale: float, audio_scale: float) -> tuple[str, ...]:
    """The conditionings the DiT must be evaluated on each step, `cond` first."""
    if _is_one(text_scale):
        return (COND,) if _is_one(audio_scale) else (COND, DROP_AUDIO)
    if _is_one(audio_scale):
        return (COND, DROP_TEXT)
    return (COND, DROP_TEXT, UNCOND)


@dataclass(slots=True)
class APG:
    """Adaptive projected guidance state for one chunk (the momentum of each guidance difference).

    Make a new one per chunk, as the reference does; `momentum` and `norm_threshold` are the
    reference's `--apg_momentum` (-0.75) and `--apg_norm_threshold` (55).
    """

    momentum: float = -0.75
    norm_threshold: float = 55.0
    running: dict[str, Tensor] = field(default_factory=dict)

    def __call__(self, name: str, diff: Tensor, cond: Tensor) -> Tensor:
        """`diff` (one guidance difference, named for its momentum buffer) -> its APG update."""
        previous = self.running.get(name)
        diff = diff if previous is None else diff + self.momentum * previous
        self.running[name] = diff
        if self.norm_threshold > 0:
            norm = diff.norm(p=2)
            diff = diff * torch.minimum(torch.ones_like(norm), self.norm_threshold / norm)
        return orthogonal_part(diff, cond)


def orthogonal_part(v: Tensor, direction: Tensor) -> Tensor:
    """`v` minus its projection on `direction` (both flattened whole; computed in float64)."""
    unit = torch.nn.functional.normalize(direction.double().reshape(1, -1), dim=1).reshape(direction.shape)
    v64 = v.double()
    return (v64 - (v64 * unit).sum() * unit).to(v.dtype)


def combine(
    preds: dict[str, Tensor], text_scale: float, audio_scale: float, apg: APG | None = None
) -> Tensor:
    """The guided velocity from the predictions named by `passes(text_scale, audio_scale)`;
    with `apg`, adaptive projected guidance (its momentum advances once per call)."""
    needed = passes(text_scale, audio_scale)
    missing = [name for name in needed if name not in preds]
    if missing:
        raise ValueError(
            f"guidance with text scale {text_scale} and audio scale {audio_scale} needs {missing}"
        )
    cond = preds[COND]
    if apg is not None:
        return _combine_apg(preds, needed, text_scale, audio_scale, apg)
    if needed == (COND,):
        return cond
    if needed == (COND, DROP_AUDIO):
        drop_audio = preds[DROP_AUDIO]
        return drop_audio + audio_scale * (cond - drop_audio)
    if needed == (COND, DROP_TEXT):
        drop_text = preds[DROP_TEXT]
        return drop_text + text_scale * (cond - drop_text)
    drop_text, uncond = preds[DROP_TEXT], preds[UNCOND]
    return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)


def _combine_apg(
    preds: dict[str, Tensor], needed: tuple[str, ...], text_scale: float, audio_scale: float, apg: APG
) -> Tensor:
    cond = preds[COND]
    if needed == (COND,):
        return cond
    if needed == (COND, DROP_AUDIO):
        return cond + (audio_scale - 1) * apg("audio", cond - preds[DROP_AUDIO], cond)
    # 3 passes, or 2 when the audio scale is 1 (its term is zero: `uncond` is not needed)
    out = cond + (text_scale - 1) * apg("text", cond - preds[DROP_TEXT], cond)
    if UNCOND in needed:
        out = out + (audio_scale - 1) * apg("audio", preds[DROP_TEXT] - preds[UNCOND], cond)
    return out
