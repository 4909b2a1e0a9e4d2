"""InfiniteTalkPipeline: load every model once, then render requests to MP4.

    pipe = InfiniteTalkPipeline.from_weights(weights_dir, device="cuda", dtype=torch.bfloat16)
    result = pipe.generate(request, out_path, poster_path=..., on_progress=..., should_stop=...,
                           checkpoint_dir=...)

A render has a CPU part and a GPU part, exposed separately so a daemon can overlap jobs:

    prepared = pipe.prepare(request, work_dir)      # CPU: media decode, speech, wav2vec2 features,
                                                    #      the mixed original audio, chunk plan
    result = pipe.render(prepared, out_path, ...)   # GPU: text, per-chunk CLIP/VAE/DiT loop;
                                                    #      H.264 encoding runs in a background thread

The chunk loop (model.md 1.7-1.10), per chunk k of a segment:
  1. reference frame: the image, or the source video's frame at the chunk's time (dubbing);
  2. audio windows [P, F, 5, K, C] from the per-frame features; noise from the job's generator;
  3. CLIP of the reference frame; y = mask | VAE([reference, F-1 grey frames]);
     motion latents = VAE(reference) for a segment's first chunk, else VAE(last M frames);
  4. Euler steps; before and after each the motion latents overwrite the first latent frames;
     each step runs only the DiT passes the guidance scales need (pipeline.guidance);
  5. VAE decode, Lab colour match to the segment's first reference frame, keep the last M
     frames for the next chunk, hand the new frames to the encoder thread, which writes the
     chunk's H.264 segment and then the chunk checkpoint.
A source video with hard scene cuts is rendered as independent segments, one per shot (each
starts fresh from its shot's first frame), joined in one output.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from pipeline import buckets, checkpoint, color, guidance, media, sampler, windows
from pipeline.config import ModelConfig, load_model_config
from pipeline.noise import noise_generator
from pipeline.placement import Placement
from pipeline.text_cache import TextEmbeddingCache
from pipeline.types import GenerationRequest, Progress, ProgressCallback, RenderResult, StopRequested

logger = logging.getLogger(__name__)

FPS = 25
FACE_SCALE = 0.05  # margin of the default two-speaker halves (reference: face_scale)
SHIFT_BY_SIZE = {"infinitetalk-480": 7.0, "infinitetalk-720": 11.0}


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
    # loading

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
        perf: Any = None,
        gpu_memory_gib: float | str | None = "auto",
        max_running: int = 1,
        placement: Placement | None = None,
    ) -> InfiniteTalkPipeline:
        """Load DiT, VAE, T5, CLIP and wav2vec2 from a weights folder (released layout or tiny).

        lora: "auto" merges the lightx2v LoRA when the folder has it; None merges none; a path
        or a list of paths (relative ones under `weights_dir`) merges those, in order.
        dtype is the DiT and T5 compute dtype; the VAE and wav2vec2 run in float32, CLIP in
        float16 on CUDA (float32 on the CPU), as the reference.
        quant: "auto" (fp8 where the GPU has fp8 tensor cores, weight-only fp8 where it has not
        but the bf16 DiT does not fit the budget, none on the CPU), None/"none" or "fp8".
        gpu_memory_gib: the memory budget of the placement plan (pipeline.placement): "auto" is
        the free memory now minus a headroom; None keeps everything resident (no plan); on the
        CPU a number plans as if the CPU were a device of that size (tests). `placement` forces
        a plan. `max_running`: jobs whose CPU stage may run beside a render (counted in the plan).
        """
        from pipeline.models.clip import load_clip
        from pipeline.models.t5 import load_t5
        from pipeline.models.vae import load_vae
        from pipeline.models.wav2vec import load_wav2vec
        from pipeline.placement import dit_sizes, resolve_budget, resolve_quant

        weights_dir = Path(weights_dir)
        device = torch.device(device)
        cfg = load_model_config(weights_dir)
        loras = resolve_loras(weights_dir, lora)
        t0 = time.perf_counter()
        budget = resolve_budget(device, gpu_memory_gib, max_running=max_running)
        planned = budget is not None or placement is not None
        # with a plan the encoders load on the CPU first and move where the plan puts them
        host = torch.device("cpu") if planned else device
        clip_dtype = torch.float16 if device.type == "cuda" else torch.float32
        vae = load_vae(weights_dir, cfg.vae, device=device, dtype=torch.float32)
        text_encoder = load_t5(weights_dir, cfg.t5, device=host, dtype=dtype)
        image_encoder = load_clip(weights_dir, cfg.clip, device=host, dtype=clip_dtype)
        audio_encoder = load_wav2vec(weights_dir, cfg.wav2vec2, device=host, dtype=torch.float32)
        encoders = (vae, text_encoder.model, image_encoder.model, audio_encoder.model)

        def plan_for(q: str | None) -> Placement | None:
            if placement is not None or budget is None:
                return placement
            block, other = dit_sizes(cfg.dit, dtype, q)
            return plan_memory(cfg, budget, (block, other), encoders)

        quant_used, quant_reason = resolve_quant(
            quant,
            device_type=device.type,
            capability=torch.cuda.get_device_capability(device) if device.type == "cuda" else None,
            bf16_all_resident=lambda: (p := plan_for(None)) is None or p.swapped_blocks == 0,
        )
        if perf is not None and quant == "auto" and perf.fp8 != (quant_used == "fp8"):
            fp8 = quant_used == "fp8"  # the caller's speed settings follow what auto picked
            perf = dataclasses.replace(perf, fp8=fp8, fp8_attention=perf.fp8_attention and fp8)
        pre = plan_for(quant_used)
        streamed = pre is not None and pre.swapped_blocks > 0
        dit = load_dit_variant(
            weights_dir,
            cfg,
            "single",
            device=torch.device("cpu") if streamed else device,
            dtype=dtype,
            quant=quant_used,
            loras=loras,
            lora_scale=lora_scale,
            attention=attention,
            rope=rope,
        )
        pipe = cls(
            config=cfg,
            weights_dir=weights_dir,
            dit=dit,
            vae=vae,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            audio_encoder=audio_encoder,
            device=device,
            dtype=dtype,
            loras=loras,
            lora_scale=lora_scale,
            quant=quant_used,
            attention=attention,
            rope=rope,
        )
        pipe.quant_requested = quant if quant is not None else "none"
        pipe.quant_reason = quant_reason
        if planned:
            final = placement
            if final is None and budget is not None:  # again, from the loaded sizes
                final = plan_memory(cfg, budget, measured_dit_sizes(dit), encoders)
            assert final is not None
            pipe.place(dataclasses.replace(final, quant=quant_used or "bf16"))
        logger.info(
            "loaded InfiniteTalk from %s in %.1f s (lora=%s, quant=%s: %s)",
            weights_dir,
            time.perf_counter() - t0,
            [p.name for p in loras],
            quant_used,
            quant_reason,
        )
        pipe.apply_perf(perf)
        return pipe

    def place(self, placement: Placement) -> None:
        """Put every model where `placement` says (pipeline.placement) and log the plan."""
        from pipeline.models.vae import VaeTiling
        from pipeline.offload import OnDemand

        dev = self.device
        self.placement = placement
        self.memory_slots = threading.BoundedSemaphore(placement.job_slots)
        self._place_dit()
        for attr, where in (("text_encoder", placement.t5), ("image_encoder", placement.clip)):
            encoder = getattr(self, attr)
            inner = encoder.inner if isinstance(encoder, _Placed) else encoder
            if where == "gpu":
                inner.model.to(dev)
                setattr(self, attr, inner)
            else:
                shuttle = OnDemand(inner.model, dev) if where == "inout" else None
                setattr(self, attr, _Placed(inner, dev, shuttle))
        if placement.wav2vec == "gpu":
            self.audio_encoder.model.to(dev)
        rows, cols = placement.vae_tiles
        self.vae.tiling = VaeTiling(rows=rows, cols=cols) if rows * cols > 1 else None
        logger.info("memory plan (%s): %s", placement.source or "given", placement.summary())

    def _place_dit(self) -> None:
        from pipeline.offload import BlockSwap

        plan = self.placement
        if plan is None or plan.swapped_blocks == 0:
            self.dit.to(self.device)
            return
        for name, child in self.dit.named_children():
            if name != "blocks":
                child.to(self.device)
        self.dit.block_swap = BlockSwap(
            self.dit.blocks, resident=plan.resident_blocks, device=self.device, slots=plan.swap_slots
        )

    def apply_perf(self, perf: Any = None) -> dict[str, Any]:
        """Speed settings (pipeline.perf.PerfConfig; docs/benchmarks.md). None: the fast defaults
        on CUDA (cuDNN attention, fp32 RoPE, compiled blocks, fp8 math when quant is fp8, VAE in
        bf16 channels-last), nothing elsewhere (CPU runs keep the reference numerics)."""
        from pipeline.perf import apply_perf, default_perf

        if perf is None:
            perf = default_perf(self.device, quant=self.quant, attention=self.attention)
        self.perf = perf
        if self.perf is not None:
            self.perf_settings = apply_perf(self.perf, dit=self.dit, vae=self.vae)
        return self.perf_settings

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

    @torch.inference_mode()
    def warmup(self, size: str = "infinitetalk-480") -> float:
        """One DiT forward on random inputs at a full chunk of the first bucket of `size`, so the
        first job does not pay for kernel selection or block compilation (a daemon sends READY=1
        after this). Touches no request state; returns the seconds it took."""
        t0 = time.perf_counter()
        d, v, g = self.config.dit, self.config.vae, self.config.generation
        h, w = self.config.buckets[size][0]
        lat_f = (g.frame_num - 1) // v.temporal_stride + 1
        lat_h, lat_w = h // v.spatial_stride, w // v.spatial_stride
        gen = torch.Generator().manual_seed(0)
        dtype = self.dit.dtype

        def rand(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen).to(self.device, dtype)

        x = rand(1, v.z_dim, lat_f, lat_h, lat_w)  # [1, 16, F, H, W]
        t = torch.full((1,), 999.0, device=self.device)
        context = rand(1, 16, d.text_dim)  # [1, Lt, text_dim]
        clip_fea = rand(1, d.clip_tokens, d.clip_dim)  # [1, 257, Dc]
        y = rand(1, 4 + v.z_dim, lat_f, lat_h, lat_w)  # [1, 20, F, H, W]
        audio = rand(1, 1, g.frame_num, d.audio_window, d.audio_blocks, d.audio_channels)
        self.dit(x, t, context, clip_fea, y, audio, None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _use_variant(self, variant: str) -> None:
        """Switch the DiT's audio adapter between the one- and two-speaker weights. The Wan base
        is shared, so without quantization only the audio tensors are swapped in place."""
        if variant == self.variant:
            return
        from pipeline.weights import swap_audio_weights

        if self.quant is not None:
            self.dit = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            streamed = self.placement is not None and self.placement.swapped_blocks > 0
            self.dit = load_dit_variant(
                self.weights_dir,
                self.config,
                variant,
                device=torch.device("cpu") if streamed else self.device,
                dtype=self.dtype,
                quant=self.quant,
                loras=self.loras,
                lora_scale=self.lora_scale,
                attention=self.attention,
                rope=self.rope,
            )
            self._place_dit()
            if self.perf is not None:
                from pipeline.perf import apply_perf

                apply_perf(self.perf, dit=self.dit)
        else:
            with torch.no_grad():
                swap_audio_weights(self.dit, self.weights_dir, variant)  # type: ignore[arg-type]
            self._remerge_lora_on_audio()
        self.variant = variant
        logger.info("DiT now uses the %s-speaker audio weights", "two" if variant == "multi" else "one")

    def _remerge_lora_on_audio(self) -> None:
        """Re-apply the part of the LoRA(s) that touches the swapped audio tensors (if any)."""
        from pipeline.lora import merge_lora, plan_lora, read_lora
        from pipeline.models.dit import is_audio_key

        for path in self.loras:
            tensors = read_lora(path)
            targets, _, _ = plan_lora(list(tensors))
            keys = {s for t, sources in targets.items() if is_audio_key(t) for s in sources}
            if keys:
                merge_lora(self.dit, {k: tensors[k] for k in keys}, scale=self.lora_scale)

    # -----------------------------------------------------------------------------------------
    # CPU stage

    def check_request(self, request: GenerationRequest) -> None:
        """Raise ValueError naming the field for a request this model cannot render."""
        if not 1 <= len(request.audio) <= 2:
            raise ValueError(f"audio: one or two speech files are supported, got {len(request.audio)}")
        if request.size not in self.config.buckets:
            raise ValueError(f"size: {request.size!r} is not one of {sorted(self.config.buckets)}")
        plan = self.placement
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

    def _generation(self, request: GenerationRequest) -> tuple[int, int]:
        frame_num = self.config.generation.frame_num if self.config.is_tiny else request.frame_num
        motion = request.motion_frame
        if self.config.is_tiny and motion >= frame_num:
            motion = self.config.generation.motion_frame
        return frame_num, motion

    def prepare(self, request: GenerationRequest, work_dir: Path) -> Prepared:
        """Everything of a render that runs on the CPU before the model: decode the reference,
        pick the bucket, load and compose the speech, compute the wav2vec2 features, write the
        mixed original audio, plan the chunks (and the shots of a source video)."""
        from pipeline.audio import load_speech

        self.check_request(request)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        frame_num, motion = self._generation(request)
        is_video = media.is_video(request.cond_media)
        source_fps = media.probe_video(request.cond_media).fps if is_video else float(FPS)
        first = media.read_reference(request.cond_media, 0)
        target = buckets.closest_bucket(self.config.buckets, request.size, first.height, first.width)
        first_frame = buckets.resize_and_crop(first, target)
        masks = None
        if len(request.audio) == 2:
            masks = speaker_masks(first.height, first.width, request.bbox, target)
        timings["media_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        speech = load_speech(request.audio, request.audio_type)
        num_rows = speech.num_frames(FPS)
        if num_rows < 1:  # shorter than a chunk is fine: one chunk, cut to the speech (windows.py)
            names = ", ".join(Path(p).name for p in request.audio if p is not None)
            raise ValueError(
                f"cond_audio: {names} gives {speech.duration_s:.3f} s of speech "
                f"({num_rows} frames at {FPS} fps); at least one frame ({1 / FPS:.2f} s) is needed"
            )
        features = tuple(
            self.audio_encoder.audio_features(track, num_frames=num_rows) for track in speech.tracks
        )
        del speech
        # on disk and memory-mapped: a long audio's features (12 x 768 floats a frame) do not
        # stay in host memory; the DiT reads them in its dtype anyway
        dtype = self.dit.dtype if self.dit.dtype != torch.float16 else torch.float32
        torch.save(
            {f"person{i + 1}": f.to(dtype).contiguous() for i, f in enumerate(features)},
            work_dir / "features.pt",
        )
        mapped = torch.load(work_dir / "features.pt", mmap=True, weights_only=True)
        features = tuple(mapped[f"person{i + 1}"] for i in range(len(features)))
        timings["audio_features_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        media.mix_original_audio(request.audio, request.audio_type, work_dir / "audio.wav")
        timings["audio_mix_s"] = time.perf_counter() - t0

        cuts: list[int] = []
        if is_video and request.mode == "streaming":
            cuts = [round(c / source_fps * FPS) for c in media.detect_scene_cuts(request.cond_media)]
        segments = plan_segments(features, cuts, request, frame_num, motion)
        total = sum(s.plan.total_frames for s in segments)
        return Prepared(
            request=request,
            target=target,
            segments=segments,
            total_frames=total,
            num_speakers=len(request.audio),
            is_video=is_video,
            source_fps=source_fps,
            first_frame=first_frame,
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
            return self._render(
                prepared,
                out_path,
                poster_path=poster_path,
                on_progress=on_progress,
                should_stop=should_stop,
                resume=resume,
            )

    @torch.inference_mode()
    def _render(
        self,
        prepared: Prepared,
        out_path: Path,
        *,
        poster_path: Path | None = None,
        on_progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        resume: bool = True,
    ) -> RenderResult:
        req = prepared.request
        t_start = time.perf_counter()
        timings = dict(prepared.timings_s)
        work = prepared.work_dir
        fingerprint = self.fingerprint(prepared)
        gen = noise_generator(req.noise, req.seed, self.device)  # pipeline/noise.py
        start_chunk, frames_written, seg_files, motion_frames, poster = 0, 0, [], None, None
        saved = checkpoint.load(work, fingerprint) if resume else None
        if saved is not None:
            state, motion_frames, rng = saved
            gen.set_state(rng)
            start_chunk, frames_written, seg_files = (
                state.next_chunk,
                state.frames_written,
                list(state.segments),
            )
            poster = state.poster
            logger.info(
                "resuming at chunk %d of %d (%d frames done)",
                start_chunk + 1,
                prepared.num_chunks,
                frames_written,
            )
        elif not resume:
            checkpoint.clear(work)
        self._use_variant("multi" if prepared.num_speakers == 2 else "single")

        # 1. text: prompt and negative prompt, encoded once per distinct prompt (pipeline.text_cache)
        t0 = time.perf_counter()
        prompts = [req.prompt, req.negative_prompt]
        embeddings = self.text_cache.encode(self.text_encoder, prompts, device=self.device)
        context, context_null = (c[None] for c in embeddings)
        timings["text_s"] = time.perf_counter() - t0

        steps = sampler.timesteps(req.sample_steps, _shift(req)).to(self.device)
        passes = guidance.passes(req.sample_text_guide_scale, req.sample_audio_guide_scale)
        num_chunks = prepared.num_chunks
        report = _Reporter(on_progress, num_chunks, req.sample_steps, prepared.total_frames)
        encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        pending: Future[None] | None = None
        reader = media.FrameReader(req.cond_media) if prepared.is_video else None
        cond_cache: dict[str, tuple[Tensor, Tensor]] = {}
        t_denoise = t_vae = 0.0
        try:
            chunk_index = 0
            for seg in prepared.segments:
                colour_ref: Tensor | None = None
                for k, start in enumerate(seg.plan.starts):
                    if chunk_index < start_chunk:
                        chunk_index += 1
                        continue
                    report.frames_done = frames_written
                    report(stage="prepare", chunk=chunk_index + 1, step=0)
                    # 1. reference frame of this chunk
                    cond = self._reference_frame(prepared, reader, seg.start + start)  # [3, 1, H, W]
                    if colour_ref is None:
                        colour_ref = self._reference_frame(prepared, reader, seg.start)
                    first_chunk = k == 0
                    if not first_chunk and motion_frames is None:
                        raise RuntimeError("internal: motion frames missing for a continuing chunk")
                    # 2-4. denoise
                    t0 = time.perf_counter()
                    latent = self._denoise_chunk(
                        prepared,
                        seg,
                        start,
                        cond,
                        None if first_chunk else motion_frames,
                        context,
                        context_null,
                        steps,
                        passes,
                        gen,
                        report,
                        chunk_index,
                        should_stop,
                        cond_cache,
                    )
                    t_denoise += time.perf_counter() - t0
                    # 5. decode, colour match, hand over to the encoder
                    report(stage="decode", chunk=chunk_index + 1, step=req.sample_steps)
                    t0 = time.perf_counter()
                    video = self.vae.decode(latent)  # [3, F, H, W] in [-1, 1]
                    if req.color_correction_strength > 0:
                        video = color.match_colors(video, colour_ref, req.color_correction_strength)
                    t_vae += time.perf_counter() - t0
                    motion_frames = video[:, -seg.plan.motion_frame :].float().cpu().clone()
                    lo, hi = seg.plan.new_frames(k)
                    new = media.to_uint8_frames(video[:, lo - start : hi - start])
                    if pending is not None:
                        pending.result()
                    seg_name = f"seg_{chunk_index:05d}.mp4"
                    seg_files.append(seg_name)
                    if poster is None:
                        poster = "poster.jpg"
                        media.write_poster(new[min(len(new) - 1, len(new) // 2)], work / poster)
                    frames_written += len(new)
                    state = checkpoint.ChunkState(
                        fingerprint=fingerprint,
                        next_chunk=chunk_index + 1,
                        frames_written=frames_written,
                        segments=tuple(seg_files),
                        tensors=f"tensors_{chunk_index:05d}.safetensors",
                        poster=poster,
                    )
                    pending = encoder.submit(
                        _encode_and_save, new, work / seg_name, state, work, motion_frames, gen.get_state()
                    )
                    chunk_index += 1
            if pending is not None:
                pending.result()
        finally:
            encoder.shutdown(wait=True)
            if reader is not None:
                reader.close()
        timings["denoise_s"] = t_denoise
        timings["vae_decode_s"] = t_vae

        # 6. the MP4: segments joined, original audio, faststart
        report.frames_done = frames_written
        report(stage="encode", chunk=num_chunks, step=req.sample_steps)
        t0 = time.perf_counter()
        out_path = Path(out_path)
        media.assemble_mp4(
            [work / s for s in seg_files],
            out_path,
            num_frames=prepared.total_frames,
            audio_wav=prepared.audio_wav,
        )
        if poster_path is not None and poster is not None:
            shutil.copyfile(work / poster, poster_path)
        timings["mux_s"] = time.perf_counter() - t0
        timings["render_s"] = time.perf_counter() - t_start
        report(stage="done", chunk=num_chunks, step=req.sample_steps)
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
            resumed_from_chunk=start_chunk,
        )

    # -----------------------------------------------------------------------------------------
    # one chunk

    def _encode_one_frame(self, frame: Tensor) -> Tensor:
        """VAE latents [16, 1, h, w] of one frame [3, 1, H, W]. The VAE is causal and encodes the
        first frame on its own, so the first latent of a clip that starts with the frame is the
        frame's latent; the clip form keeps to the encoder's 4n+1 input rule."""
        clip = torch.cat([frame, frame.expand(-1, self.config.vae.temporal_stride, -1, -1)], dim=1)
        return self.vae.encode(clip)[:, :1]

    def _reference_frame(self, prepared: Prepared, reader: media.FrameReader | None, frame: int) -> Tensor:
        """The reference frame for output frame `frame`: [3, 1, H, W] in [-1, 1] on the device."""
        if reader is None or frame == 0:
            pixels = prepared.first_frame
        else:
            index = int(frame / FPS * prepared.source_fps + 1e-6)  # the source frame at that time
            pixels = buckets.resize_and_crop(reader.get(index), prepared.target)
        return buckets.to_model_frame(pixels).to(self.device)

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
        """Sample one chunk's latents [16, f, h, w] (float32)."""
        req = prepared.request
        frame_num = seg.plan.frame_num
        h, w = prepared.target
        stride_s = self.config.vae.spatial_stride
        lat_f, lat_h, lat_w = (
            (frame_num - 1) // self.config.vae.temporal_stride + 1,
            h // stride_s,
            w // stride_s,
        )
        dtype = self.dit.dtype

        # audio windows: [1, P, F, 5, K, C]
        audio = torch.stack([windows.chunk_audio(f, start, frame_num, seg.plan.end) for f in seg.features])[
            None
        ]
        audio = audio.to(self.device, dtype)
        null_audio = torch.zeros_like(audio[:, :1])
        noise = torch.randn(
            self.config.vae.z_dim, lat_f, lat_h, lat_w, generator=gen, dtype=torch.float32, device=gen.device
        )
        latent = noise.to(self.device)
        if motion_frames is not None:
            # The reference noises the motion latents before the loop and after every step, then
            # overwrites them with the clean ones before the model sees them: the draws change
            # nothing but the generator's position. Drawing them too keeps every later chunk's
            # noise equal to the reference's for the same seed (not only the first chunk's).
            n_lat_motion = (motion_frames.shape[1] - 1) // self.config.vae.temporal_stride + 1
            for _ in range(len(steps)):
                torch.randn(
                    self.config.vae.z_dim,
                    n_lat_motion,
                    lat_h,
                    lat_w,
                    generator=gen,
                    dtype=torch.float32,
                    device=gen.device,
                )

        # conditioning: CLIP, y = mask | VAE(reference + grey) (computed once for a still image),
        # motion latents
        key = "image" if not prepared.is_video else f"frame-{seg.start + start}"
        if key not in cond_cache:
            cond_cache.clear()
            clip_fea = self.image_encoder.encode_image_clip(cond[:, 0][None]).to(dtype)  # [1, 257, Dc]
            pixels = torch.cat([cond, torch.zeros(3, frame_num - 1, h, w, device=self.device)], dim=1)
            y = torch.cat([first_frame_mask(frame_num, lat_h, lat_w, self.device), self.vae.encode(pixels)])
            cond_cache[key] = (clip_fea, y[None].to(dtype))  # [1, 257, Dc], [1, 20, f, h, w]
        clip_fea, y = cond_cache[key]
        if motion_frames is None:
            motion = self._encode_one_frame(cond)  # [16, 1, h, w]
        else:
            motion = self.vae.encode(motion_frames.to(self.device))  # [16, 1 + (M-1)/4, h, w]
        n_motion = motion.shape[1]
        masks = prepared.masks.to(self.device) if prepared.masks is not None else None
        conditions = {
            guidance.COND: (context, audio),
            guidance.DROP_TEXT: (context_null, audio),
            guidance.UNCOND: (context_null, null_audio),
            guidance.DROP_AUDIO: (context, null_audio),
        }

        # APG's momentum restarts every chunk, as in the reference
        apg = guidance.APG(req.apg_momentum, req.apg_norm_threshold) if req.use_apg else None
        for i in range(len(steps) - 1):
            if should_stop is not None and should_stop():
                raise StopRequested(f"stop requested before step {i + 1} of chunk {chunk_index + 1}")
            latent[:, :n_motion] = motion
            t = steps[i : i + 1]
            inputs = [
                (latent[None], t, conditions[n][0], clip_fea, y, conditions[n][1], masks) for n in passes
            ]
            forward_passes = getattr(self.dit, "forward_passes", None)
            if forward_passes is not None and len(inputs) > 1:  # streamed blocks: one copy per step
                outs = forward_passes(inputs)
            else:
                outs = [self.dit(*args) for args in inputs]
            preds = {name: out[0] for name, out in zip(passes, outs, strict=True)}
            self.dit_calls += len(passes)
            velocity = guidance.combine(preds, req.sample_text_guide_scale, req.sample_audio_guide_scale, apg)
            latent = sampler.euler_step(latent, velocity, steps[i], steps[i + 1])
            latent[:, :n_motion] = motion
            report(stage="denoise", chunk=chunk_index + 1, step=i + 1)
        return latent


# ---------------------------------------------------------------------------------------------
# helpers


def resolve_loras(weights_dir: Path, lora: Path | str | Sequence[Path | str] | None) -> tuple[Path, ...]:
    """The LoRA files to merge: "auto" -> the lightx2v LoRA if present; relative paths under weights_dir."""
    from pipeline.weights import LORA_FILE

    if lora is None:
        return ()
    if isinstance(lora, str) and lora == "auto":
        candidate = weights_dir / LORA_FILE
        return (candidate,) if candidate.is_file() else ()
    items = [lora] if isinstance(lora, (str, Path)) else list(lora)
    paths = tuple(p if p.is_absolute() else weights_dir / p for p in map(Path, items))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"LoRA file(s) not found: {', '.join(missing)}")
    return paths


def load_dit_variant(
    weights_dir: Path,
    cfg: ModelConfig,
    variant: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quant: str | None,
    loras: tuple[Path, ...],
    lora_scale: float,
    attention: str,
    rope: str,
) -> Any:
    """The DiT with the one- or two-speaker audio weights and the LoRA(s) merged (then fp8)."""
    from pipeline.weights import FP8_RUNTIME_PREFIX, load_dit, quantize_linears

    common: dict[str, Any] = {
        "variant": variant,
        "device": device,
        "dtype": dtype,
        "rope": rope,
        "attention_backend": attention,
    }
    if len(loras) <= 1:
        return load_dit(
            weights_dir,
            cfg.dit,
            quant=quant,  # type: ignore[arg-type]  # checked by PipelineConfig
            lora=loras[0] if loras else None,
            lora_scale=lora_scale,
            **common,
        )
    from pipeline.lora import merge_lora

    model = load_dit(weights_dir, cfg.dit, quant=None, **common)
    for path in loras:
        report = merge_lora(model, path, scale=lora_scale)
        logger.info("merged LoRA %s at scale %s: %d tensors", path.name, lora_scale, report.applied)
    if quant == "fp8":
        quantize_linears(model, prefix=FP8_RUNTIME_PREFIX)
    return model


def _shift(request: GenerationRequest) -> float:
    return request.sample_shift if request.sample_shift is not None else SHIFT_BY_SIZE.get(request.size, 7.0)


def first_frame_mask(frame_num: int, lat_h: int, lat_w: int, device: torch.device) -> Tensor:
    """The I2V mask channels [4, f, lat_h, lat_w]: latent frame 0 (the reference) is all ones."""
    lat_f = (frame_num - 1) // 4 + 1
    mask = torch.zeros(4, lat_f, lat_h, lat_w, device=device)
    mask[:, 0] = 1.0
    return mask


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


def chunks_for(
    audio_seconds: float,
    *,
    frame_num: int = 81,
    motion_frame: int = 9,
    max_frame_num: int | None = None,
    mode: str = "streaming",
) -> int:
    """How many chunks a render of that much audio takes (for ETAs)."""
    rows = int(audio_seconds * FPS)
    return (
        windows.plan_chunks(
            rows, frame_num=frame_num, motion_frame=motion_frame, max_frame_num=max_frame_num, mode=mode
        ).num_chunks
        if rows >= 1
        else 0
    )


class _Placed:
    """An encoder kept off the GPU: run on the CPU, or moved in for the call (`shuttle`); its
    outputs are handed back on the pipeline's device. Other attributes are the encoder's."""

    def __init__(self, inner: Any, device: torch.device, shuttle: Any) -> None:
        self.inner = inner
        self.target = device
        self.shuttle = shuttle

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self.shuttle.use() if self.shuttle is not None else contextlib.nullcontext():
            out = getattr(self.inner, method)(*args, **kwargs)
        if isinstance(out, Tensor):
            return out.to(self.target)
        return [o.to(self.target) for o in out]

    def encode_text(self, prompts: Sequence[str]) -> list[Tensor]:
        return self._call("encode_text", prompts)

    def encode_image_clip(self, frames: Tensor) -> Tensor:
        return self._call("encode_image_clip", frames)


def measured_dit_sizes(dit: Any) -> tuple[int, int]:
    """(bytes of the largest block, bytes of the rest) of a loaded DiT."""
    from pipeline.offload import module_bytes

    blocks = [module_bytes(b) for b in dit.blocks]
    return max(blocks), module_bytes(dit) - sum(blocks)


def plan_memory(
    cfg: ModelConfig, budget: Any, dit: tuple[int, int], encoders: tuple[Any, Any, Any, Any]
) -> Placement:
    """The placement plan for this model under `budget`: measured encoder sizes, the DiT's
    (block, rest) bytes and the working set of the largest size bucket; when no plan covers the
    largest, the largest that fits (the plan's `sizes`; `check_request` refuses the others)."""
    from pipeline.placement import PlacementError

    def pixels(size: str) -> int:
        return max(h * w for h, w in cfg.buckets[size])

    names = sorted(cfg.buckets, key=pixels, reverse=True)
    errors: list[PlacementError] = []
    for name in names:
        h, w = max(cfg.buckets[name], key=lambda hw: hw[0] * hw[1])
        try:
            placement = _plan_memory(cfg, budget, dit, encoders, (h, w))
        except PlacementError as e:
            errors.append(e)
            continue
        if errors:
            logger.warning(
                "%s: jobs of size %s are refused (the plan for them needs %.1f GiB)",
                errors[0],
                names[0],
                (errors[0].min_gpu_bytes or 0) / 2**30,
            )
        covered = [n for n in names if pixels(n) <= pixels(name)]
        return dataclasses.replace(placement, extra=(("sizes", ",".join(covered)),))
    raise errors[-1]


def _plan_memory(
    cfg: ModelConfig,
    budget: Any,
    dit: tuple[int, int],
    encoders: tuple[Any, Any, Any, Any],
    hw: tuple[int, int],
) -> Placement:
    from pipeline.offload import module_bytes
    from pipeline.placement import ModelSizes, estimate_working_set, plan

    vae, t5, clip, wav2vec = encoders
    sizes = ModelSizes(
        num_blocks=cfg.dit.num_layers,
        block_bytes=dit[0],
        dit_other_bytes=dit[1],
        t5_bytes=module_bytes(t5),
        clip_bytes=module_bytes(clip),
        wav2vec_bytes=module_bytes(wav2vec),
        vae_bytes=module_bytes(vae),
    )
    h, w = hw
    work = estimate_working_set(
        dim=cfg.dit.dim,
        height=h,
        width=w,
        frame_num=cfg.generation.frame_num,
        vae_estimate=vae_peak_estimate(cfg.vae, budget.device_type),
        text_dim=cfg.dit.text_dim,
        text_len=cfg.dit.text_len,
    )
    return plan(sizes, work, budget)


def vae_peak_estimate(cfg: Any = None, device_type: str = "cuda") -> Callable[..., int]:
    """`(height, width, frame_num, (rows, cols)) -> bytes`: the larger of the VAE's decode and
    encode peaks of one chunk (`pipeline.models.vae.vae_peak_bytes`; bf16 on CUDA, fp32 else)."""
    from pipeline.models.vae import VAEConfig, VaeTiling, vae_peak_bytes

    vae_cfg = cfg if cfg is not None else VAEConfig()
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    t, s = vae_cfg.temporal_stride, vae_cfg.spatial_stride

    def estimate(height: int, width: int, frame_num: int, tiles: tuple[int, int]) -> int:
        latent = ((frame_num - 1) // t + 1, height // s, width // s)
        tiling = VaeTiling(rows=tiles[0], cols=tiles[1])
        return max(
            vae_peak_bytes(latent, op=op, tiling=tiling, dtype=dtype, cfg=vae_cfg, device_type=device_type)
            for op in ("decode", "encode")
        )

    return estimate


__all__ = ["InfiniteTalkPipeline", "Prepared", "Segment", "chunks_for"]
