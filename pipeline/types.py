"""The pipeline's public vocabulary: what a caller asks for and what it gets back.

Everything here is a frozen value type; nothing imports torch, so the daemon and the
dashboard can use these names without loading the ML stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from pipeline.presets import BASE
from pipeline.tts_text import TtsRequest

#: frames per second of every rendered video (the model's; audio features have one row a frame)
FPS = 25
SizeBucket = Literal["infinitetalk-480", "infinitetalk-720"]
AudioType = Literal["para", "add"]
Mode = Literal["streaming", "clip"]
#: where the noise is drawn (pipeline/noise.py): a CPU generator, or the render device's
NoiseMode = Literal["portable", "reference"]
NOISE_MODES: tuple[NoiseMode, ...] = ("portable", "reference")


class StopRequested(Exception):
    """Raised from a progress callback (or `should_stop`) to stop a render between steps."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """One render, fully resolved (defaults applied, seed drawn).

    Media paths are absolute. `audio` holds one path (one speaker) or two (person1, person2);
    one of two may be None, a silent speaker (zeros as long as the other's speech).
    `bbox` is None or one box per speaker, `[row_min, col_min, row_max, col_max]` in pixels of
    the reference image, as the reference model takes it.
    """

    prompt: str
    cond_media: Path
    audio: tuple[Path | None, ...]
    audio_type: AudioType = "para"
    bbox: tuple[tuple[float, float, float, float], ...] | None = None
    size: SizeBucket = "infinitetalk-480"
    # the sampling recipe: the reference's (pipeline/presets.py BASE) unless the caller gives one
    sample_steps: int = BASE.sample_steps
    sample_shift: float | None = BASE.sample_shift  # None: 7 for 480, 11 for 720 (the reference's rule)
    sample_text_guide_scale: float = BASE.sample_text_guide_scale
    sample_audio_guide_scale: float = BASE.sample_audio_guide_scale
    seed: int = 42
    mode: Mode = "streaming"
    motion_frame: int = 9
    frame_num: int = 81
    max_frame_num: int | None = None  # None: no cap, the whole audio is rendered
    color_correction_strength: float = 1.0
    use_apg: bool = False  # adaptive projected guidance (the reference's --use_apg)
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0
    negative_prompt: str = ""
    noise: NoiseMode = "portable"  # portable: CPU generator; reference: the render device's (noise.py)
    # a text-to-speech job: the text voiced into `audio` (24 kHz files) before anything reads them
    tts: TtsRequest | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """Where a render is: chunk i of n (1-based), step j of k (1-based, 0 = chunk set-up)."""

    stage: str  # "prepare" | "denoise" | "decode" | "encode" | "done"
    chunk: int
    num_chunks: int
    step: int
    num_steps: int
    frames_done: int
    total_frames: int

    @property
    def fraction(self) -> float:
        if self.num_chunks <= 0:
            return 0.0
        per_chunk = 1.0 / self.num_chunks
        within = self.step / self.num_steps if self.num_steps else 0.0
        return min(1.0, max(0.0, (self.chunk - 1) * per_chunk + within * per_chunk))


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderResult:
    """What a finished render wrote and how long each stage took."""

    video_path: Path
    poster_path: Path | None
    num_frames: int
    fps: int
    duration_s: float
    width: int
    height: int
    seed: int
    timings_s: dict[str, float] = field(default_factory=dict)
    resumed_from_chunk: int = 0


PreparedT = TypeVar("PreparedT")


@runtime_checkable
class Renderer(Protocol[PreparedT]):
    """What a render worker holds (daemon/runner.py): `InfiniteTalkPipeline`, the GPU group
    (`pipeline.parallel_pipeline.GroupPipeline`), the tests' `FakePipeline`.

    `prepare` is the CPU stage (media decode, speech, audio features), run outside the worker's
    GPU lock so one job prepares while another renders; `render` is the GPU stage, run inside it.
    With `resume`, `render` continues from the chunk checkpoint in the prepared work folder.
    """

    def prepare(self, request: GenerationRequest, work_dir: Path) -> PreparedT: ...

    def render(
        self,
        prepared: PreparedT,
        out_path: Path,
        *,
        poster_path: Path | None = None,
        on_progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        resume: bool = True,
    ) -> RenderResult: ...

    def describe(self) -> dict[str, Any]:
        """The model identity, for result manifests."""
        ...
