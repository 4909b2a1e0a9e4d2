"""The two sampling recipes, written once (stdlib only: the daemon and the dashboard may import it).

`BASE` is the reference's own recipe without a LoRA; `LIGHTX2V_4STEP` is the recipe for the
lightx2v 4-step LoRA merged into the model at load. `GenerationRequest` takes its sampling
defaults from `BASE`; the daemon's job defaults (`daemon.jobs.SETTINGS`) from `LIGHTX2V_4STEP`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """How many denoising steps, the flow shift and the two guidance scales."""

    sample_steps: int
    sample_shift: float | None  # None: the reference's rule, 7 for 480 and 11 for 720
    sample_text_guide_scale: float  # 1: text guidance off (one DiT pass fewer per step)
    sample_audio_guide_scale: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the reference's recipe: 40 steps, shift by size, text scale 5, audio scale 4
BASE = Recipe(sample_steps=40, sample_shift=None, sample_text_guide_scale=5.0, sample_audio_guide_scale=4.0)
#: the lightx2v 4-step LoRA: 4 steps, shift 2, text scale 1 (2 DiT passes per step), audio scale 2
LIGHTX2V_4STEP = Recipe(
    sample_steps=4, sample_shift=2.0, sample_text_guide_scale=1.0, sample_audio_guide_scale=2.0
)
#: by name, as the docs and `daemon.jobs.PRESETS` call them
RECIPES: dict[str, Recipe] = {"lightx2v-4step": LIGHTX2V_4STEP, "base": BASE}
#: the reference's flow shift for a request that gives none (`sample_shift` None)
SHIFT_BY_SIZE: dict[str, float] = {"infinitetalk-480": 7.0, "infinitetalk-720": 11.0}
