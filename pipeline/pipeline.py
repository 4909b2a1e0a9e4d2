"""InfiniteTalkPipeline: load every model once, then render requests to MP4.

    pipe = InfiniteTalkPipeline.from_weights(weights_dir, device="cuda", dtype=torch.bfloat16)
    result = pipe.generate(request, out_path, poster_path=..., on_progress=..., should_stop=...,
                           checkpoint_dir=...)

Loading (the options, the memory plan, the one/two-speaker swap) is `pipeline.loading`'s. A
render has a CPU part and a GPU part, exposed separately so a daemon can overlap jobs (the
`pipeline.types.Renderer` protocol):

    prepared = pipe.prepare(request, work_dir)      # CPU: media decode, speech, wav2vec2 features,
                                                    #      the mixed original audio, chunk plan
    result = pipe.render(prepared, out_path, ...)   # GPU: text, per-chunk CLIP/VAE/DiT loop;
                                                    #      H.264 encoding runs in a background thread

The chunk loop (model.md 1.7-1.10), per chunk k of a segment:
  1. reference frame: the image, or the source video's frame at the chunk's time (dubbing);
  2. audio windows [P, F, 5, K, C] from the per-frame features; noise from the job's generator;
  3. CLIP of the reference frame; y = mask | VAE([reference, F-1 grey frames]);
     motion latents = VAE(reference) for a segment's first chunk, else VAE(last M frames);
  4. Euler steps (`pipeline.denoise.denoise_chunk`); before and after each the motion latents
     overwrite the first latent frames; each step runs only the DiT passes the guidance scales
     need (pipeline.guidance);
  5. VAE decode, Lab colour match to the segment's first reference frame, keep the last M
     frames for the next chunk, hand the new frames to the encoder thread, which writes the
     chunk's H.264 segment and then the chunk checkpoint.
A source video with hard scene cuts is rendered as independent segments, one per shot (each
starts fresh from its shot's first frame), joined in one output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline import buckets, checkpoint, color, denoise, guidance, loading, media, sampler, windows
from pipeline.config import ModelConfig
from pipeline.denoise import first_frame_mask
from pipeline.loading import (
    LoadOptions,
    Placed,
    load_dit_variant,
    measured_dit_sizes,
    plan_memory,
    resolve_loras,
    vae_peak_estimate,
)
from pipeline.noise import noise_generator
from pipeline.placement import Placement
from pipeline.presets import SHIFT_BY_SIZE
from pipeline.text_cache import TextEmbeddingCache
from pipeline.types import (
    FPS,
    GenerationRequest,
    Progress,
    ProgressCallback,
    RenderResult,
)

logger = logging.getLogger(__name__)

FACE_SCALE = 0.05  # margin of the default two-speaker halves (reference: face_scale)
_Placed = Placed  # the name tests and tools knew


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """A run of chunks that starts fresh (the whole render, or one shot of a source video)."""

    start: int  # first output frame
    plan: windows.ChunkPlan
    features: tuple[Tensor, ...]  # per speaker [T_seg, K, C] (memory-mapped), read up to plan.end


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """The CPU-side inputs of one render (see InfiniteTalkPipeline.prepare)."""

    request: GenerationRequest
    target: tuple[int, int]  # output (H, W)
    segments: tuple[Segment, ...]
    total_frames: int
    num_speakers: int
    is_video: bool
    source_fps: float
    first_frame: np.ndarray  # uint8 [H, W, 3]: the resized, cropped first reference frame
    masks: Tensor | None  # [3, lat_h, lat_w] speaker regions (two speakers)
    audio_wav: Path  # the mixed original audio (float WAV)
    work_dir: Path
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return sum(s.plan.num_chunks for s in self.segments)


class InfiniteTalkPipeline:
    """Every model of InfiniteTalk resident on one device; `generate` renders one request."""

    def __init__(
        self,
        *,
        config: ModelConfig,
        weights_dir: Path,
        dit: Any,
        vae: Any,
        text_encoder: Any,
        image_encoder: Any,
        audio_encoder: Any,
        device: torch.device,
        dtype: torch.dtype,
        loras: tuple[Path, ...],
        lora_scale: float,
        quant: str | None,
        attention: str,
        rope: str = "exact",
    ) -> None:
        self.config = config
        self.weights_dir = Path(weights_dir)
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.audio_encoder = audio_encoder
        self.device = device
        self.dtype = dtype
        self.loras = loras
        self.lora_scale = lora_scale
        self.quant = quant
        self.attention = attention
        self.rope = rope
        self.variant = "single"
        self.dit_calls = 0  # DiT forward passes run (all renders), for tests and stats
        self.perf: Any = None  # pipeline.perf.PerfConfig applied to the models (None: as loaded)
        self.perf_settings: dict[str, Any] = {}
        self.text_cache = TextEmbeddingCache()  # umT5 runs once per distinct prompt
        self.quant_requested = quant if quant is not None else "none"
        self.quant_reason = ""
        #: where each model lives (pipeline.placement); None: everything resident on `device`
        self.placement: Placement | None = None
        #: renders holding GPU working memory at once (the plan counts this many working sets)
        self.memory_slots = threading.BoundedSemaphore(1)

    # -----------------------------------------------------------------------------------------
    # loading (pipeline.loading)

    @classmethod
    def from_weights(
        cls,
        weights_dir: Path,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        lora: Path | str | Sequence[Path | str] | None = "auto",
        lora_scale: float = 1.0,
        quant: str | None = "auto",
        attention: str = "auto",
        rope: str = "exact",
        gpu_memory_gib: float | str | None = "auto",
        max_running: int = 1,
        placement: Placement | None = None,
        perf: Any = None,
    ) -> InfiniteTalkPipeline:
        """Load DiT, VAE, T5, CLIP and wav2vec2 from a weights folder (released layout or tiny),
        as `pipeline.loading.LoadOptions` describes the arguments (lora: "auto", None, a path or
        paths; quant: "auto", None/"none", "fp8"; gpu_memory_gib: "auto", GiB or None: no plan).
        `placement` forces a memory plan; `perf` (pipeline.perf.PerfConfig) the speed settings."""
        opts = LoadOptions(
            device=str(device),
            dtype=loading.dtype_name(dtype),
            quant="none" if quant is None else quant,
            lora=loading.lora_option(lora),
            lora_scale=lora_scale,
            attention=attention,
            rope=rope,
            gpu_memory_gib=gpu_memory_gib,
            max_running=max_running,
        )
        return loading.load_stack(cls, Path(weights_dir), opts, placement, perf)

    @classmethod
    def load(cls, weights_dir: Path, opts: LoadOptions) -> InfiniteTalkPipeline:
        """Load as `opts` says (the worker's, `infinitetalk render`'s and the GPU group's way)."""
        return loading.load_stack(cls, Path(weights_dir), opts)

    def place(self, placement: Placement) -> None:
        """Put every model where `placement` says (pipeline.placement) and log the plan."""
        loading.place(self, placement)

    def apply_perf(self, perf: Any = None) -> dict[str, Any]:
        """Speed settings (pipeline.perf.PerfConfig; None: perf.default_perf); see loading.apply_perf."""
        return loading.apply_perf(self, perf)

    def describe(self) -> dict[str, Any]:
        """The model identity, for result manifests."""
        return {
            "weights_dir": str(self.weights_dir),
            "tiny": self.config.is_tiny,
            "lora": [p.name for p in self.loras],
            "lora_scale": self.lora_scale,
            "quant": self.quant,
            "quant_requested": self.quant_requested,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "placement": None if self.placement is None else self.placement.as_dict(),
        }

    def warmup(self, size: str = "infinitetalk-480") -> float:
        """One DiT forward at a full chunk of `size` (pipeline.loading.warmup); its seconds."""
        return loading.warmup(self, size)

    def _use_variant(self, variant: str) -> None:
        loading.swap_variant(self, variant)

    # -----------------------------------------------------------------------------------------
    # CPU stage

    def check_request(self, request: GenerationRequest) -> None:
        """Raise ValueError naming the field for a request this model cannot render."""
        check_request(self.config, self.placement, request)

    def voice(self, request: GenerationRequest) -> float:
        """A text-to-speech job's speech (`request.tts`, Kokoro-82M from this model's weights
        folder) into its `audio` files, unless they are there; returns the seconds it took."""
        from pipeline.tts import voice_request  # only a text-to-speech job imports kokoro

        return voice_request(request, self.weights_dir, tiny=self.config.is_tiny) if request.tts else 0.0

    def prepare(self, request: GenerationRequest, work_dir: Path) -> Prepared:
        """Everything of a render that runs on the CPU before the model: voice a text-to-speech
        job's text, decode the reference, pick the bucket, load and compose the speech, compute
        the wav2vec2 features, write the mixed original audio, plan the chunks (and the shots of
        a source video)."""
        tts_s = self.voice(request)
        self.check_request(request)
        timings: dict[str, float] = {} if request.tts is None else {"tts_s": tts_s}
        t0 = time.perf_counter()
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        frame_num, motion = chunk_frames(self.config, request)
        is_video = media.is_video(request.cond_media)
        source_fps = media.probe_video(request.cond_media).fps if is_video else float(FPS)
        first = media.read_reference(request.cond_media, 0)
        target = buckets.closest_bucket(self.config.buckets, request.size, first.height, first.width)
        masks = None
        if len(request.audio) == 2:
            masks = speaker_masks(first.height, first.width, request.bbox, target)
        timings["media_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        features = audio_features(self.audio_encoder, self.dit.dtype, request, work_dir)
        timings["audio_features_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        media.mix_original_audio(request.audio, request.audio_type, work_dir / "audio.wav")
        timings["audio_mix_s"] = time.perf_counter() - t0

        cuts: list[int] = []
        if is_video and request.mode == "streaming":
            cuts = [round(c / source_fps * FPS) for c in media.detect_scene_cuts(request.cond_media)]
        segments = plan_segments(features, cuts, request, frame_num, motion)
        return Prepared(
            request=request,
            target=target,
            segments=segments,
            total_frames=sum(s.plan.total_frames for s in segments),
            num_speakers=len(request.audio),
            is_video=is_video,
            source_fps=source_fps,
            first_frame=buckets.resize_and_crop(first, target),
            masks=masks,
            audio_wav=work_dir / "audio.wav",
            work_dir=work_dir,
            timings_s=timings,
        )

    # -----------------------------------------------------------------------------------------
    # the whole render

    def generate(
        self,
        request: GenerationRequest,
        out_path: Path,
        *,
        poster_path: Path | None = None,
        on_progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        checkpoint_dir: Path | None = None,
    ) -> RenderResult:
        """Render `request` to `out_path` (MP4). With `checkpoint_dir`, every finished chunk is
        persisted there and a later call with the same request resumes after it."""
        with contextlib.ExitStack() as stack:
            if checkpoint_dir is None:
                work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="infinitetalk-")))
            else:
                work_dir = Path(checkpoint_dir)
            prepared = self.prepare(request, work_dir)
            return self.render(
                prepared,
                out_path,
                poster_path=poster_path,
                on_progress=on_progress,
                should_stop=should_stop,
                resume=checkpoint_dir is not None,
            )

    def fingerprint(self, prepared: Prepared) -> str:
        """Identifies a render: request, input files (size, mtime) and model."""
        req = prepared.request
        files = [req.cond_media, *(p for p in req.audio if p is not None)]
        doc = {
            "request": {k: str(getattr(req, k)) for k in req.__dataclass_fields__},
            "files": [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in map(Path, files)],
            # where the weights live changes no number: a plan change keeps the checkpoints
            "model": {
                k: v
                for k, v in self.describe().items()
                if k not in ("device", "placement", "quant_requested")
            },
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    @torch.inference_mode()
    def render(
        self,
        prepared: Prepared,
        out_path: Path,
        *,
        poster_path: Path | None = None,
        on_progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        resume: bool = True,
    ) -> RenderResult:
        """The GPU stage: chunk loop, decode, colour match, encode, then the MP4. A render waits
        for one of the plan's memory slots (`memory_slots`) first: a job waits for GPU memory
        rather than running out of it."""
        with self.memory_slots:
            req = prepared.request
            t_start = time.perf_counter()
            timings = dict(prepared.timings_s)
            # 1. resume: the checkpoint of the last finished chunk, when it is this render's
            gen = noise_generator(req.noise, req.seed, self.device)  # pipeline/noise.py
            run = _Run.start(prepared.work_dir, self.fingerprint(prepared), gen, resume, prepared.num_chunks)
            loading.swap_variant(self, "multi" if prepared.num_speakers == 2 else "single")
            try:
                # 2. text: prompt and negative prompt, encoded once per distinct prompt (text_cache)
                t0 = time.perf_counter()
                prompts = [req.prompt, req.negative_prompt]
                embeddings = self.text_cache.encode(self.text_encoder, prompts, device=self.device)
                context, context_null = (c[None] for c in embeddings)
                timings["text_s"] = time.perf_counter() - t0
                # 3. per chunk: reference -> conditions -> denoise_chunk -> decode/colour -> encoder
                report = _Reporter(on_progress, prepared.num_chunks, req.sample_steps, prepared.total_frames)
                self._chunks(prepared, run, (context, context_null), report, should_stop, timings)
            finally:
                run.close()
            return _finish(prepared, run, report, Path(out_path), poster_path, timings, t_start)

    def _chunks(
        self,
        prepared: Prepared,
        run: _Run,
        text: tuple[Tensor, Tensor],
        report: _Reporter,
        should_stop: Callable[[], bool] | None,
        timings: dict[str, float],
    ) -> None:
        """Every chunk not yet in `run`'s checkpoint: denoise, decode, colour match, hand over."""
        req = prepared.request
        steps = sampler.timesteps(req.sample_steps, _shift(req)).to(self.device)
        passes = guidance.passes(req.sample_text_guide_scale, req.sample_audio_guide_scale)
        reader = media.FrameReader(req.cond_media) if prepared.is_video else None
        cond_cache: dict[str, tuple[Tensor, Tensor]] = {}
        t_denoise = t_vae = 0.0
        try:
            index = 0
            for seg in prepared.segments:
                colour_ref: Tensor | None = None
                for k, start in enumerate(seg.plan.starts):
                    if index < run.start_chunk:
                        index += 1
                        continue
                    report.frames_done = run.frames_written
                    report(stage="prepare", chunk=index + 1, step=0)
                    cond = self._reference_frame(prepared, reader, seg.start + start)  # [3, 1, H, W]
                    if colour_ref is None:
                        colour_ref = self._reference_frame(prepared, reader, seg.start)
                    if k > 0 and run.motion_frames is None:
                        raise RuntimeError("internal: motion frames missing for a continuing chunk")
                    motion_frames = None if k == 0 else run.motion_frames
                    t0 = time.perf_counter()
                    latent = self._denoise_chunk(
                        prepared, seg, start, cond, motion_frames, *text, steps, passes,
                        run.gen, report, index, should_stop, cond_cache,
                    )  # fmt: skip
                    t_denoise += time.perf_counter() - t0
                    report(stage="decode", chunk=index + 1, step=req.sample_steps)
                    t0 = time.perf_counter()
                    video = self.vae.decode(latent)  # [3, F, H, W] in [-1, 1]
                    if req.color_correction_strength > 0:
                        video = color.match_colors(video, colour_ref, req.color_correction_strength)
                    t_vae += time.perf_counter() - t0
                    motion = video[:, -seg.plan.motion_frame :].float().cpu().clone()
                    lo, hi = seg.plan.new_frames(k)
                    run.hand_over(index, media.to_uint8_frames(video[:, lo - start : hi - start]), motion)
                    index += 1
            run.finish()
        finally:
            if reader is not None:
                reader.close()
        timings["denoise_s"] = t_denoise
        timings["vae_decode_s"] = t_vae

    # -----------------------------------------------------------------------------------------
    # one chunk

    def _encode_one_frame(self, frame: Tensor) -> Tensor:
        """VAE latents [16, 1, h, w] of one frame [3, 1, H, W] (pipeline.denoise.encode_one_frame)."""
        return denoise.encode_one_frame(self.vae, frame, self.config.vae.temporal_stride)

    def _reference_frame(self, prepared: Prepared, reader: media.FrameReader | None, frame: int) -> Tensor:
        return reference_frame(prepared, reader, frame, self.device)

    def _image_conditions(
        self, prepared: Prepared, frame: int, cond: Tensor, frame_num: int, lat_hw: tuple[int, int],
        cache: dict[str, tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(CLIP features [1, 257, Dc], y [1, 20, f, h, w]) of the reference frame, in the DiT's
        dtype; computed once for a still image (`cache`), per chunk for a source video."""
        key = "image" if not prepared.is_video else f"frame-{frame}"
        if key not in cache:
            cache.clear()
            dtype = self.dit.dtype
            clip_fea = self.image_encoder.encode_image_clip(cond[:, 0][None]).to(dtype)
            y = denoise.image_condition(self.vae, cond, frame_num, lat_hw)
            cache[key] = (clip_fea, y[None].to(dtype))
        return cache[key]

    def _denoise_chunk(
        self,
        prepared: Prepared,
        seg: Segment,
        start: int,
        cond: Tensor,
        motion_frames: Tensor | None,
        context: Tensor,
        context_null: Tensor,
        steps: Tensor,
        passes: tuple[str, ...],
        gen: torch.Generator,
        report: _Reporter,
        chunk_index: int,
        should_stop: Callable[[], bool] | None,
        cond_cache: dict[str, tuple[Tensor, Tensor]],
    ) -> Tensor:
        """Sample one chunk's latents [16, f, h, w] (float32): noise, conditions, denoise_chunk."""
        req, v, frame_num = prepared.request, self.config.vae, seg.plan.frame_num
        h, w = prepared.target
        lat_hw = (h // v.spatial_stride, w // v.spatial_stride)
        lat_f = (frame_num - 1) // v.temporal_stride + 1
        # audio windows: [1, P, F, 5, K, C]
        windows_ = [windows.chunk_audio(f, start, frame_num, seg.plan.end) for f in seg.features]
        audio = torch.stack(windows_)[None].to(self.device, self.dit.dtype)
        noise = torch.randn(v.z_dim, lat_f, *lat_hw, generator=gen, dtype=torch.float32, device=gen.device)
        latent = noise.to(self.device)
        if motion_frames is not None:  # the generator moves on as the reference's (parity note there)
            denoise.advance_motion_noise(
                gen, v.z_dim, motion_frames.shape[1], lat_hw, len(steps), v.temporal_stride
            )
        clip_fea, y = self._image_conditions(prepared, seg.start + start, cond, frame_num, lat_hw, cond_cache)
        if motion_frames is None:
            motion = self._encode_one_frame(cond)  # [16, 1, h, w]
        else:
            motion = self.vae.encode(motion_frames.to(self.device))  # [16, 1 + (M-1)/4, h, w]
        conditions = denoise.ChunkConditions(
            clip_fea=clip_fea,
            y=y,
            motion=motion,
            masks=prepared.masks.to(self.device) if prepared.masks is not None else None,
            by_pass=guidance_inputs(context, context_null, audio),
        )

        def on_step(step: int) -> None:
            self.dit_calls += len(passes)
            report(stage="denoise", chunk=chunk_index + 1, step=step)

        # APG's momentum restarts every chunk, as in the reference
        apg = guidance.APG(req.apg_momentum, req.apg_norm_threshold) if req.use_apg else None
        text_scale, audio_scale = req.sample_text_guide_scale, req.sample_audio_guide_scale
        return denoise.denoise_chunk(
            self.dit, latent, conditions, steps, passes, text_scale, audio_scale, apg,
            on_step=on_step, should_stop=should_stop,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# helpers


def check_request(config: ModelConfig, plan: Placement | None, request: GenerationRequest) -> None:
    """Raise ValueError naming the field for a request this model cannot render."""
    if not 1 <= len(request.audio) <= 2:
        raise ValueError(f"audio: one or two speech files are supported, got {len(request.audio)}")
    if request.size not in config.buckets:
        raise ValueError(f"size: {request.size!r} is not one of {sorted(config.buckets)}")
    covered = dict(plan.extra).get("sizes") if plan is not None else None
    if plan is not None and covered is not None and request.size not in covered.split(","):
        raise ValueError(
            f"size: {request.size!r} needs more GPU memory than the memory plan's budget of "
            f"{plan.budget_bytes / 2**30:.1f} GiB gives ([performance] gpu_memory_gib); "
            f"this plan renders {covered}"
        )
    if request.sample_steps < 1:
        raise ValueError(f"sample_steps must be at least 1, got {request.sample_steps}")
    if request.bbox is not None and len(request.bbox) != len(request.audio):
        raise ValueError(f"bbox: {len(request.bbox)} boxes for {len(request.audio)} speakers")
    if request.audio.count(None) and (len(request.audio) != 2 or request.audio.count(None) != 1):
        raise ValueError(f"audio: only one of two speakers can be silent (None), got {request.audio}")
    speaking = [p for p in request.audio if p is not None]
    for name, path in [("cond_video", request.cond_media), *(("cond_audio", p) for p in speaking)]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name}: file not found: {path}")


def audio_features(
    audio_encoder: Any, dit_dtype: torch.dtype, request: GenerationRequest, work_dir: Path
) -> tuple[Tensor, ...]:
    """The wav2vec2 features [T, K, C] of each speaker's speech (one row per video frame), saved
    to `work_dir/features.pt` and memory-mapped back: a long audio's features (12 x 768 floats a
    frame) do not stay in host memory; the DiT reads them in its dtype anyway."""
    from pipeline.audio import load_speech

    # voiced speech is not loudness-normalised: the reference's TTS path only resamples it
    speech = load_speech(request.audio, request.audio_type, loudness=request.tts is None)
    num_rows = speech.num_frames(FPS)
    if num_rows < 1:  # shorter than a chunk is fine: one chunk, cut to the speech (windows.py)
        names = ", ".join(Path(p).name for p in request.audio if p is not None)
        raise ValueError(
            f"cond_audio: {names} gives {speech.duration_s:.3f} s of speech "
            f"({num_rows} frames at {FPS} fps); at least one frame ({1 / FPS:.2f} s) is needed"
        )
    features = tuple(audio_encoder.audio_features(track, num_frames=num_rows) for track in speech.tracks)
    del speech
    dtype = dit_dtype if dit_dtype != torch.float16 else torch.float32
    torch.save(
        {f"person{i + 1}": f.to(dtype).contiguous() for i, f in enumerate(features)},
        work_dir / "features.pt",
    )
    mapped = torch.load(work_dir / "features.pt", mmap=True, weights_only=True)
    return tuple(mapped[f"person{i + 1}"] for i in range(len(features)))


def reference_frame(
    prepared: Prepared, reader: media.FrameReader | None, frame: int, device: torch.device
) -> Tensor:
    """The reference frame for output frame `frame`: [3, 1, H, W] in [-1, 1] on the device."""
    if reader is None or frame == 0:
        pixels = prepared.first_frame
    else:
        index = int(frame / FPS * prepared.source_fps + 1e-6)  # the source frame at that time
        pixels = buckets.resize_and_crop(reader.get(index), prepared.target)
    return buckets.to_model_frame(pixels).to(device)


def guidance_inputs(context: Tensor, context_null: Tensor, audio: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """(text context, audio windows) of each guidance pass (pipeline.guidance): the null text is
    the negative prompt's, the null audio zeros."""
    null_audio = torch.zeros_like(audio[:, :1])
    return {
        guidance.COND: (context, audio),
        guidance.DROP_TEXT: (context_null, audio),
        guidance.UNCOND: (context_null, null_audio),
        guidance.DROP_AUDIO: (context, null_audio),
    }


def chunk_frames(config: ModelConfig, request: GenerationRequest) -> tuple[int, int]:
    """(frames of a chunk, motion frames): the request's, or a tiny model's own."""
    frame_num = config.generation.frame_num if config.is_tiny else request.frame_num
    motion = request.motion_frame
    if config.is_tiny and motion >= frame_num:
        motion = config.generation.motion_frame
    return frame_num, motion


def _shift(request: GenerationRequest) -> float:
    return request.sample_shift if request.sample_shift is not None else SHIFT_BY_SIZE.get(request.size, 7.0)


def speaker_masks(
    src_h: int,
    src_w: int,
    bbox: tuple[tuple[float, float, float, float], ...] | None,
    target: tuple[int, int],
) -> Tensor:
    """Speaker regions [3, lat_h, lat_w] (person 1, person 2, background) as the reference
    builds them: boxes [row_min, col_min, row_max, col_max] in source pixels, or the default
    left/right halves with a 5 % margin; then resized and cropped like the frame."""
    masks = torch.zeros(2, src_h, src_w)
    if bbox is not None:
        for i, (r0, c0, r1, c1) in enumerate(bbox):
            masks[i, int(r0) : int(r1), int(c0) : int(c1)] = 1
    else:
        r0, r1 = int(src_h * FACE_SCALE), int(src_h * (1 - FACE_SCALE))
        half = src_w // 2
        for i in range(2):
            c0, c1 = int(half * FACE_SCALE + i * half), int(half * (1 - FACE_SCALE) + i * half)
            masks[i, r0:r1, c0:c1] = 1
    background = (masks.sum(0) == 0).float()
    full = torch.cat([masks, background[None]])  # [3, src_h, src_w]
    cropped = buckets.resize_and_crop_masks(full, target)  # [3, H, W]
    lat = torch.nn.functional.interpolate(
        cropped[None], size=(target[0] // 8, target[1] // 8), mode="nearest"
    )[0]
    return (lat > 0).float()


def plan_segments(
    features: tuple[Tensor, ...], cuts: list[int], request: GenerationRequest, frame_num: int, motion: int
) -> tuple[Segment, ...]:
    """Split the render at scene cuts (output frames) into independent segments, each longer than
    one chunk (shorter shots are merged into the previous one), and plan each one's chunks."""
    rows = features[0].shape[0]
    whole = windows.plan_chunks(
        rows, frame_num=frame_num, motion_frame=motion, max_frame_num=request.max_frame_num, mode=request.mode
    )
    total = whole.total_frames
    bounds = [0]
    for cut in sorted(set(cuts)):
        if cut - bounds[-1] > frame_num and total - cut > frame_num:
            bounds.append(cut)
    if len(bounds) == 1:
        return (Segment(start=0, plan=whole, features=features),)
    bounds.append(total)
    segments = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        plan = windows.plan_chunks(
            b - a, frame_num=frame_num, motion_frame=motion, max_frame_num=None, mode="streaming"
        )
        segments.append(Segment(start=a, plan=plan, features=tuple(f[a:b] for f in features)))
    return tuple(segments)


def _encode_and_save(
    frames: np.ndarray, seg_path: Path, state: checkpoint.ChunkState, work: Path, motion: Tensor, rng: Tensor
) -> None:
    """Encoder thread: write the chunk's H.264 segment, then its checkpoint (the commit point)."""
    media.encode_segment(frames, seg_path)
    checkpoint.save(work, state, motion=motion, rng_state=rng)


def _finish(
    prepared: Prepared,
    run: _Run,
    report: _Reporter,
    out_path: Path,
    poster_path: Path | None,
    timings: dict[str, float],
    t_start: float,
) -> RenderResult:
    """4. the MP4 of a render whose chunks are all written: segments joined, original audio,
    faststart; the poster copied out."""
    req = prepared.request
    work = prepared.work_dir
    report.frames_done = run.frames_written
    report(stage="encode", chunk=prepared.num_chunks, step=req.sample_steps)
    t0 = time.perf_counter()
    segments = [work / s for s in run.seg_files]
    media.assemble_mp4(segments, out_path, num_frames=prepared.total_frames, audio_wav=prepared.audio_wav)
    if poster_path is not None and run.poster is not None:
        shutil.copyfile(work / run.poster, poster_path)
    timings["mux_s"] = time.perf_counter() - t0
    timings["render_s"] = time.perf_counter() - t_start
    report(stage="done", chunk=prepared.num_chunks, step=req.sample_steps)
    h, w = prepared.target
    return RenderResult(
        video_path=out_path,
        poster_path=poster_path,
        num_frames=prepared.total_frames,
        fps=FPS,
        duration_s=prepared.total_frames / FPS,
        width=w,
        height=h,
        seed=req.seed,
        timings_s=timings,
        resumed_from_chunk=run.start_chunk,
    )


@dataclass
class _Run:
    """One render's state between chunks (what a chunk checkpoint saves) and its encoder thread."""

    work: Path
    fingerprint: str
    gen: torch.Generator
    start_chunk: int = 0
    frames_written: int = 0
    seg_files: list[str] = field(default_factory=list)
    motion_frames: Tensor | None = None  # the last M frames of the last chunk (float32, CPU)
    poster: str | None = None
    encoder: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
    )
    pending: Future[None] | None = None

    @classmethod
    def start(cls, work: Path, fingerprint: str, gen: torch.Generator, resume: bool, num_chunks: int) -> _Run:
        """A fresh run, or (with `resume`) the one the checkpoint in `work` left off."""
        run = cls(work=work, fingerprint=fingerprint, gen=gen)
        saved = checkpoint.load(work, fingerprint) if resume else None
        if saved is not None:
            state, run.motion_frames, rng = saved
            gen.set_state(rng)
            run.start_chunk, run.frames_written = state.next_chunk, state.frames_written
            run.seg_files, run.poster = list(state.segments), state.poster
            logger.info(
                "resuming at chunk %d of %d (%d frames done)",
                run.start_chunk + 1,
                num_chunks,
                run.frames_written,
            )
        elif not resume:
            checkpoint.clear(work)
        return run

    def hand_over(self, index: int, new: np.ndarray, motion_frames: Tensor) -> None:
        """Chunk `index`'s new frames to the encoder thread (after the previous chunk's), which
        writes its H.264 segment, then its checkpoint; the poster comes from the first chunk."""
        self.motion_frames = motion_frames
        if self.pending is not None:
            self.pending.result()
        seg_name = f"seg_{index:05d}.mp4"
        self.seg_files.append(seg_name)
        if self.poster is None:
            self.poster = "poster.jpg"
            media.write_poster(new[min(len(new) - 1, len(new) // 2)], self.work / self.poster)
        self.frames_written += len(new)
        state = checkpoint.ChunkState(
            fingerprint=self.fingerprint,
            next_chunk=index + 1,
            frames_written=self.frames_written,
            segments=tuple(self.seg_files),
            tensors=f"tensors_{index:05d}.safetensors",
            poster=self.poster,
        )
        self.pending = self.encoder.submit(
            _encode_and_save, new, self.work / seg_name, state, self.work, motion_frames, self.gen.get_state()
        )

    def finish(self) -> None:
        """Wait for the last chunk's segment and checkpoint."""
        if self.pending is not None:
            self.pending.result()

    def close(self) -> None:
        self.encoder.shutdown(wait=True)


class _Reporter:
    """Builds Progress values and hands them to the callback."""

    def __init__(
        self, callback: ProgressCallback | None, num_chunks: int, num_steps: int, total_frames: int
    ) -> None:
        self.callback = callback
        self.num_chunks = num_chunks
        self.num_steps = num_steps
        self.total_frames = total_frames
        self.frames_done = 0

    def __call__(self, *, stage: str, chunk: int, step: int) -> None:
        if self.callback is None:
            return
        self.callback(
            Progress(
                stage=stage,
                chunk=chunk,
                num_chunks=self.num_chunks,
                step=step,
                num_steps=self.num_steps,
                frames_done=self.frames_done,
                total_frames=self.total_frames,
            )
        )


__all__ = [
    "InfiniteTalkPipeline",
    "Prepared",
    "Segment",
    "first_frame_mask",
    "load_dit_variant",
    "measured_dit_sizes",
    "plan_memory",
    "resolve_loras",
    "vae_peak_estimate",
]
