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
"""

from __future__ import annotations

import math

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


def combine(preds: dict[str, Tensor], text_scale: float, audio_scale: float) -> Tensor:
    """The guided velocity from the predictions named by `passes(text_scale, audio_scale)`."""
    needed = passes(text_scale, audio_scale)
    missing = [name for name in needed if name not in preds]
    if missing:
        raise ValueError(
            f"guidance with text scale {text_scale} and audio scale {audio_scale} needs {missing}"
        )
    cond = preds[COND]
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
