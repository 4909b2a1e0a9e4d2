"""Loading InfiniteTalk: one `LoadOptions`, one way from a weights folder to a resident pipeline.

    opts = LoadOptions.from_strings(device="auto", dtype="auto", quant="auto", attention="auto",
                                    perf={"rope": "fast", ...}, max_running=3)
    pipe = load_pipeline(weights_dir, opts)          # InfiniteTalkPipeline, warmed up if asked

The render worker (daemon/runner.py), `infinitetalk render` (daemon/render_cmd.py), the GPU group
(pipeline/parallel_pipeline.py) and `InfiniteTalkPipeline.from_weights` all load through here, so
a setting (the device and dtype rules, `quant`, the LoRAs, `attention`, `[performance]`, the GPU
memory budget) means the same everywhere. Also here: the one/two-speaker variant swap (with the
LoRA re-merge), the memory plan of a loaded stack and putting each model where the plan says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.config import ModelConfig, load_model_config
from pipeline.placement import Placement

if TYPE_CHECKING:
    from pipeline.perf import PerfConfig
    from pipeline.pipeline import InfiniteTalkPipeline

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadOptions:
    """How to load a model stack (picklable, strings as in the config file)."""

    device: str = "auto"  # auto (cuda when there is one, else cpu) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on the CPU) | bf16 | fp16 | fp32
    quant: str = "auto"  # auto | none | fp8 (pipeline.placement.resolve_quant)
    #: "auto": the lightx2v LoRA when the folder has it; None: none; else these files, in order
    #: (relative ones under the weights folder)
    lora: str | tuple[str, ...] | None = "auto"
    lora_scale: float = 1.0
    attention: str = "auto"
    rope: str = "exact"
    #: [performance] settings (pipeline.perf.PerfConfig fields but attention/fp8, plus
    #: fp8_attention auto/on/off), used on CUDA; None: the pipeline's defaults (perf.default_perf)
    perf: tuple[tuple[str, object], ...] | None = None
    #: the memory plan's budget in GiB: "auto" (free memory minus a headroom), a number, or None
    #: (no plan: everything resident)
    gpu_memory_gib: float | str | None = "auto"
    max_running: int = 1  # jobs whose CPU stage may run beside a render (counted in the plan)
    warmup: bool = False  # one DiT forward after loading (load_pipeline)

    @classmethod
    def from_strings(
        cls,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quant: str = "auto",
        lora: Sequence[str] = (),
        lora_scale: float = 1.0,
        attention: str = "auto",
        perf: Mapping[str, object] | None = None,
        max_running: int = 1,
        warmup: bool = False,
    ) -> LoadOptions:
        """From the config's settings: `lora` () means "auto"; `perf` is the [performance] table
        (its gpu_memory_gib becomes the field of that name; its warmup is the caller's `warmup`)."""
        settings = {k: v for k, v in (perf or {}).items() if k not in ("gpu_memory_gib", "warmup")}
        budget: Any = (perf or {}).get("gpu_memory_gib", "auto")
        return cls(
            device=device,
            dtype=dtype,
            quant=quant,
            lora=tuple(lora) or "auto",
            lora_scale=lora_scale,
            attention=attention,
            perf=tuple(settings.items()) if perf is not None else None,
            gpu_memory_gib=budget,
            max_running=max_running,
            warmup=warmup,
        )

    def resolved_device(self) -> torch.device:
        return torch.device(resolve_device(self.device))


def resolve_device(device: str) -> str:
    """ "auto" is cuda when a GPU is there, else cpu; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """ "auto" is bf16 on CUDA and fp32 elsewhere; bf16/fp16/fp32 (or a torch dtype) as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def perf_config(
    opts: LoadOptions, device: torch.device, quant_used: str | None, given: PerfConfig | None = None
) -> PerfConfig | None:
    """The speed settings of `opts` on `device`, or the `given` ones (None: the pipeline's
    defaults). With quant = auto, fp8 (and fp8 attention) follow what auto picked."""
    if given is not None:
        fp8 = quant_used == "fp8"
        if opts.quant == "auto" and given.fp8 != fp8:
            return dataclasses.replace(given, fp8=fp8, fp8_attention=given.fp8_attention and fp8)
        return given
    if opts.perf is None or device.type != "cuda":
        return None
    from pipeline.perf import PerfConfig, resolve_fp8_attention

    settings: dict[str, Any] = {k: v for k, v in opts.perf if k not in ("warmup", "gpu_memory_gib")}
    fp8 = opts.quant in ("fp8", "auto")  # auto: fp8 (and its attention) off below where it picks none
    attention, _ = resolve_fp8_attention(str(settings.pop("fp8_attention", "auto")), fp8=fp8, device=device)
    if opts.quant == "auto":
        fp8 = quant_used == "fp8"
        attention = attention and fp8
    return PerfConfig(attention=opts.attention, fp8=fp8, fp8_attention=attention, **settings)  # type: ignore[arg-type]


def load_pipeline(weights_dir: Path, opts: LoadOptions) -> InfiniteTalkPipeline:
    """The InfiniteTalk pipeline of `weights_dir` loaded as `opts` says (then warmed up if asked)."""
    from pipeline.pipeline import InfiniteTalkPipeline

    pipe = InfiniteTalkPipeline.load(Path(weights_dir), opts)
    if opts.warmup:
        logger.info("warm-up forward took %.1f s", pipe.warmup())
    return pipe


def apply_perf(pipe: InfiniteTalkPipeline, perf: PerfConfig | None = None) -> dict[str, Any]:
    """Apply speed settings to `pipe`'s DiT and VAE (pipeline.perf.PerfConfig; docs/benchmarks.md).
    None: the fast defaults on CUDA (cuDNN attention, fp32 RoPE, compiled blocks, fp8 math when
    quant is fp8, VAE in bf16 channels-last), nothing elsewhere (CPU runs keep the reference
    numerics). Returns the applied settings."""
    from pipeline.perf import apply_perf as apply
    from pipeline.perf import default_perf

    if perf is None:
        perf = default_perf(pipe.device, quant=pipe.quant, attention=pipe.attention)
    pipe.perf = perf
    if perf is not None:
        pipe.perf_settings = apply(perf, dit=pipe.dit, vae=pipe.vae)
    return pipe.perf_settings


def lora_option(lora: Path | str | Sequence[Path | str] | None) -> str | tuple[str, ...] | None:
    """`LoadOptions.lora` of a `from_weights` argument: "auto", None, one path or several."""
    if lora is None or (isinstance(lora, str) and lora == "auto"):
        return lora
    return (str(lora),) if isinstance(lora, (str, Path)) else tuple(map(str, lora))


@torch.inference_mode()
def warmup(pipe: InfiniteTalkPipeline, size: str = "infinitetalk-480") -> float:
    """One DiT forward on random inputs at a full chunk of the first bucket of `size`, so the
    first job does not pay for kernel selection or block compilation (a daemon reports
    ready after this). Touches no request state; returns the seconds it took."""
    t0 = time.perf_counter()
    d, v, g = pipe.config.dit, pipe.config.vae, pipe.config.generation
    h, w = pipe.config.buckets[size][0]
    lat_f = (g.frame_num - 1) // v.temporal_stride + 1
    lat_h, lat_w = h // v.spatial_stride, w // v.spatial_stride
    gen = torch.Generator().manual_seed(0)
    dtype = pipe.dit.dtype

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(pipe.device, dtype)

    x = rand(1, v.z_dim, lat_f, lat_h, lat_w)  # [1, 16, F, H, W]
    t = torch.full((1,), 999.0, device=pipe.device)
    context = rand(1, 16, d.text_dim)  # [1, Lt, text_dim]
    clip_fea = rand(1, d.clip_tokens, d.clip_dim)  # [1, 257, Dc]
    y = rand(1, 4 + v.z_dim, lat_f, lat_h, lat_w)  # [1, 20, F, H, W]
    audio = rand(1, 1, g.frame_num, d.audio_window, d.audio_blocks, d.audio_channels)
    pipe.dit(x, t, context, clip_fea, y, audio, None)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the stack


def load_stack(
    cls: type[InfiniteTalkPipeline],
    weights_dir: Path,
    opts: LoadOptions,
    placement: Placement | None = None,
    perf: PerfConfig | None = None,
) -> InfiniteTalkPipeline:
    """Load DiT, VAE, T5, CLIP and wav2vec2 from a weights folder (released layout or tiny) and
    place them: with a memory budget (or a forced `placement`) the encoders load on the CPU first
    and move where the plan puts them. `perf` overrides the speed settings of `opts`. The VAE and
    wav2vec2 run in float32, CLIP in float16 on CUDA (float32 on the CPU), the DiT and T5 in
    `opts.dtype`, as the reference."""
    from pipeline.placement import dit_sizes, resolve_budget

    t0 = time.perf_counter()
    device = opts.resolved_device()
    dtype = resolve_dtype(opts.dtype, device)
    cfg = load_model_config(weights_dir)
    loras = resolve_loras(weights_dir, opts.lora)
    budget = resolve_budget(device, opts.gpu_memory_gib, max_running=opts.max_running)
    planned = budget is not None or placement is not None
    encoders = _load_encoders(weights_dir, cfg, device, dtype, on_host=planned)
    sizes = encoders[0], encoders[1].model, encoders[2].model, encoders[3].model

    def plan_for(q: str | None) -> Placement | None:
        if placement is not None or budget is None:
            return placement
        return plan_memory(cfg, budget, dit_sizes(cfg.dit, dtype, q), sizes)

    quant_used, quant_reason = _pick_quant(opts.quant, device, plan_for)
    pre = plan_for(quant_used)
    streamed = pre is not None and pre.swapped_blocks > 0
    pipe = cls(
        config=cfg,
        weights_dir=weights_dir,
        dit=None,
        vae=encoders[0],
        text_encoder=encoders[1],
        image_encoder=encoders[2],
        audio_encoder=encoders[3],
        device=device,
        dtype=dtype,
        loras=loras,
        lora_scale=opts.lora_scale,
        quant=quant_used,
        attention=opts.attention,
        rope=opts.rope,
    )
    pipe.quant_requested, pipe.quant_reason = opts.quant, quant_reason
    pipe.dit = _dit_of(pipe, "single", torch.device("cpu") if streamed else device)
    if planned:  # the plan again, from the loaded sizes (unless one is forced)
        final = placement or plan_memory(cfg, budget, measured_dit_sizes(pipe.dit), sizes)
        place(pipe, dataclasses.replace(final, quant=quant_used or "bf16"))
    took, names = time.perf_counter() - t0, [p.name for p in loras]
    logger.info(
        "loaded InfiniteTalk from %s in %.1f s (lora=%s, quant=%s: %s)",
        *(weights_dir, took, names, quant_used, quant_reason),
    )
    pipe.apply_perf(perf_config(opts, device, quant_used, perf))
    return pipe


def _load_encoders(
    weights_dir: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, *, on_host: bool
) -> tuple[Any, Any, Any, Any]:
    """(VAE, T5, CLIP, wav2vec2); with `on_host` all but the VAE load on the CPU."""
    from pipeline.models.clip import load_clip
    from pipeline.models.t5 import load_t5
    from pipeline.models.vae import load_vae
    from pipeline.models.wav2vec import load_wav2vec

    host = torch.device("cpu") if on_host else device
    clip_dtype = torch.float16 if device.type == "cuda" else torch.float32
    return (
        load_vae(weights_dir, cfg.vae, device=device, dtype=torch.float32),
        load_t5(weights_dir, cfg.t5, device=host, dtype=dtype),
        load_clip(weights_dir, cfg.clip, device=host, dtype=clip_dtype),
        load_wav2vec(weights_dir, cfg.wav2vec2, device=host, dtype=torch.float32),
    )


def _pick_quant(
    quant: str, device: torch.device, plan_for: Callable[[str | None], Placement | None]
) -> tuple[str | None, str]:
    from pipeline.placement import resolve_quant

    return resolve_quant(
        quant,
        device_type=device.type,
        capability=torch.cuda.get_device_capability(device) if device.type == "cuda" else None,
        bf16_all_resident=lambda: (p := plan_for(None)) is None or p.swapped_blocks == 0,
    )


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
        lora = loras[0] if loras else None
        return load_dit(weights_dir, cfg.dit, quant=quant, lora=lora, lora_scale=lora_scale, **common)  # type: ignore[arg-type]
    from pipeline.lora import merge_lora

    model = load_dit(weights_dir, cfg.dit, quant=None, **common)
    for path in loras:
        report = merge_lora(model, path, scale=lora_scale)
        logger.info("merged LoRA %s at scale %s: %d tensors", path.name, lora_scale, report.applied)
    if quant == "fp8":
        quantize_linears(model, prefix=FP8_RUNTIME_PREFIX)
    return model


def _dit_of(pipe: InfiniteTalkPipeline, variant: str, device: torch.device) -> Any:
    """`pipe`'s DiT in `variant`, loaded again with the pipeline's own settings."""
    return load_dit_variant(
        pipe.weights_dir,
        pipe.config,
        variant,
        device=device,
        dtype=pipe.dtype,
        quant=pipe.quant,
        loras=pipe.loras,
        lora_scale=pipe.lora_scale,
        attention=pipe.attention,
        rope=pipe.rope,
    )


# ---------------------------------------------------------------------------------------------
# the one/two-speaker variant


def swap_variant(pipe: InfiniteTalkPipeline, variant: str) -> None:
    """Switch the DiT's audio adapter between the one- and two-speaker weights. The Wan base
    is shared, so without quantization only the audio tensors are swapped in place (and the
    LoRA's audio part merged again); a quantized DiT is loaded again in the other variant."""
    if variant == pipe.variant:
        return
    from pipeline.weights import swap_audio_weights

    if pipe.quant is not None:
        pipe.dit = None
        if pipe.device.type == "cuda":
            torch.cuda.empty_cache()
        streamed = pipe.placement is not None and pipe.placement.swapped_blocks > 0
        pipe.dit = _dit_of(pipe, variant, torch.device("cpu") if streamed else pipe.device)
        _place_dit(pipe)
        if pipe.perf is not None:
            from pipeline.perf import apply_perf

            apply_perf(pipe.perf, dit=pipe.dit)
    else:
        with torch.no_grad():
            swap_audio_weights(pipe.dit, pipe.weights_dir, variant)  # type: ignore[arg-type]
        _remerge_lora_on_audio(pipe.dit, pipe.loras, pipe.lora_scale)
    pipe.variant = variant
    logger.info("DiT now uses the %s-speaker audio weights", "two" if variant == "multi" else "one")


def _remerge_lora_on_audio(dit: Any, loras: tuple[Path, ...], scale: float) -> None:
    """Re-apply the part of the LoRA(s) that touches the swapped audio tensors (if any)."""
    from pipeline.lora import merge_lora, plan_lora, read_lora
    from pipeline.models.dit import is_audio_key

    for path in loras:
        tensors = read_lora(path)
        targets, _, _ = plan_lora(list(tensors))
        keys = {s for t, sources in targets.items() if is_audio_key(t) for s in sources}
        if keys:
            merge_lora(dit, {k: tensors[k] for k in keys}, scale=scale)


# ---------------------------------------------------------------------------------------------
# the memory plan


def place(pipe: InfiniteTalkPipeline, placement: Placement) -> None:
    """Put every model of `pipe` where `placement` says (pipeline.placement) and log the plan."""
    from pipeline.models.vae import VaeTiling
    from pipeline.offload import OnDemand

    dev = pipe.device
    pipe.placement = placement
    pipe.memory_slots = threading.BoundedSemaphore(placement.job_slots)
    _place_dit(pipe)
    for attr, where in (("text_encoder", placement.t5), ("image_encoder", placement.clip)):
        encoder = getattr(pipe, attr)
        inner = encoder.inner if isinstance(encoder, Placed) else encoder
        if where == "gpu":
            inner.model.to(dev)
            setattr(pipe, attr, inner)
        else:
            shuttle = OnDemand(inner.model, dev) if where == "inout" else None
            setattr(pipe, attr, Placed(inner, dev, shuttle))
    if placement.wav2vec == "gpu":
        pipe.audio_encoder.model.to(dev)
    rows, cols = placement.vae_tiles
    pipe.vae.tiling = VaeTiling(rows=rows, cols=cols) if rows * cols > 1 else None
    logger.info("memory plan (%s): %s", placement.source or "given", placement.summary())


def _place_dit(pipe: InfiniteTalkPipeline) -> None:
    from pipeline.offload import BlockSwap

    plan = pipe.placement
    if plan is None or plan.swapped_blocks == 0:
        pipe.dit.to(pipe.device)
        return
    for name, child in pipe.dit.named_children():
        if name != "blocks":
            child.to(pipe.device)
    pipe.dit.block_swap = BlockSwap(
        pipe.dit.blocks, resident=plan.resident_blocks, device=pipe.device, slots=plan.swap_slots
    )


class Placed:
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
