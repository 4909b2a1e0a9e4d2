"""`infinitetalk bench`: speed and memory of the whole stack with random full-size weights.

No weight files are read: every model is built on the meta device and materialised straight
on the GPU with random values (N(0, 0.02) for matrices, ones for norm gains, zeros for biases),
which does not change the speed of dense kernels (GEMM, attention, convolution). Inputs are
random too, never zeros. What is measured (CUDA events, after warm-up; median and min):

1. build time of the random weights, and the real load path (`pipeline.weights.load_files`:
   memory-mapped safetensors straight to the GPU) on a real-size shard written to local disk,
   extrapolated to the 37.8 GB DiT;
2. seconds per DiT forward for each size, on the plain path (the reference's numerics: float64
   RoPE, default SDPA, eager) and the fast path (`pipeline.perf.PerfConfig()`: cuDNN attention,
   fp32 RoPE, compiled block; fp8 tensor-core linears with --dtype fp8), with the relative
   error of each fast path against the plain one on the same weights and inputs;
3. a chunk loop like the pipeline's (CLIP, VAE encode of the conditioning and motion frames, the
   lightx2v recipe's 4 Euler steps with 1 or 2 DiT passes each, VAE decode) over 2 chunks, by
   phase; the second chunk is the steady state (72 new frames = 2.88 s of video at 25 fps),
   which gives GPU-seconds per second of video;
4. peak GPU memory (whole stack resident: DiT, VAE, CLIP, umT5 unless --no-t5) and the GPU,
   driver, CUDA, cuDNN and torch versions.

Every section catches its own failure and reports it, so one broken path does not hide the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from pipeline import denoise
from pipeline.choices import FP8_ATTENTION
from pipeline.config import DiTConfig
from pipeline.perf import PerfConfig
from pipeline.presets import SHIFT_BY_SIZE
from pipeline.types import FPS

logger = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: nominal pixel sizes of the benchmark (performance.md section 1.1): 32 760 and 75 600 tokens
SIZES: dict[str, tuple[int, int]] = {"480": (480, 832), "720": (720, 1280)}
GiB = 1024**3
#: chinese-wav2vec2-base in float32 (not built by the bench; the plan reserves it like the daemon's)
WAV2VEC_BYTES = 380_000_000


# ---------------------------------------------------------------------------------------------
# options and scenario


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    sizes: tuple[str, ...] = ("480", "720")
    dtypes: tuple[str, ...] = ("bf16",)  # "bf16" and/or "fp8" (fp8 runs after bf16, same weights)
    passes: tuple[int, ...] = (1, 2)  # DiT passes per step in the chunk loop
    compile: bool = True
    attention: str = "auto"
    fp8_attention: str = "auto"  # with --dtype fp8: "auto" (where available), "on", "off"
    fp8_scaling: str = "row"  # with --dtype fp8: "row" or "tensor" (pipeline.quant.FP8_SCALING)
    baseline: bool = True  # also time the plain (reference-numerics) path
    chunk_sizes: tuple[str, ...] = ("480",)  # sizes whose chunk loop is run (the rest: forward only)
    num_chunks: int = 2
    steps: int = 4
    warmup: int = 2
    repeats: int = 5
    t5: bool = True
    load_probe_blocks: int = 4  # DiT blocks written to disk and loaded back; 0 = skip
    profile: bool = True  # kernel breakdown of one fast forward at the first size (CUDA only)
    frame_num: int = 81
    motion_frame: int = 9
    device: str = "cuda"
    seed: int = 0
    #: GPU memory budgets (GiB) whose placement plan the chunk loop also runs under (enforced with
    #: torch.cuda.set_per_process_memory_fraction); empty: only the unconstrained loop
    gpu_memory_gib: tuple[float, ...] = ()
    unconstrained: bool = True  # with budgets: also run the chunk loop with everything resident
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: Any = None  # VAEConfig (default full size)
    clip: Any = None  # ClipConfig
    t5_config: Any = None  # T5Config
    pixel_sizes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(SIZES))

    def __post_init__(self) -> None:
        for s in (*self.sizes, *self.chunk_sizes):
            if s not in self.pixel_sizes:
                raise ValueError(f"size {s!r} is not one of {sorted(self.pixel_sizes)}")
        bad = [d for d in self.dtypes if d not in ("bf16", "fp8")]
        if bad or not self.dtypes:
            raise ValueError(f"dtypes must be bf16 and/or fp8, got {self.dtypes}")
        if any(p not in (1, 2) for p in self.passes):
            raise ValueError(f"passes must be 1 and/or 2, got {self.passes}")
        if self.fp8_attention not in FP8_ATTENTION:
            raise ValueError(f"fp8_attention must be auto, on or off, got {self.fp8_attention!r}")
        if self.num_chunks < 1 or self.steps < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("num_chunks, steps and repeats must be >= 1 and warmup >= 0")
        if any(not g > 0 for g in self.gpu_memory_gib):
            raise ValueError(f"gpu_memory_gib budgets must be > 0, got {self.gpu_memory_gib}")


# ---------------------------------------------------------------------------------------------
# timing


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    median_s: float
    min_s: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        return cls(median_s=statistics.median(samples), min_s=min(samples), samples=tuple(samples))

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": round(self.median_s, 4),
            "min_s": round(self.min_s, 4),
            "samples": [round(s, 4) for s in self.samples],
        }


class Clock:
    """Times regions of device work: CUDA events on a GPU, the host clock (synchronised) elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """Seconds of `fn()`'s device work, and its result."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    def repeat(self, fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[Stats, float, Any]:
        """(stats over `repeats` timed calls, seconds of the first warm-up call, last result)."""
        first = 0.0
        out = None
        for i in range(warmup):
            dt, out = self.time(fn)
            if i == 0:
                first = dt
        samples = []
        for _ in range(repeats):
            dt, out = self.time(fn)
            samples.append(dt)
        return Stats.of(samples), first, out


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (NaN if either has a non-finite value)."""
    a64, b64 = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        return float("nan")
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# random models built on the device


@torch.no_grad()
def randomise_(module: nn.Module, gen: torch.Generator, std: float = 0.02) -> None:
    """Fill parameters in place: >= 2-D N(0, std), 1-D gains (names ending in weight/gamma) 1, biases 0."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim >= 2:
            p.normal_(0.0, std, generator=gen)
        elif leaf == "bias":
            p.zero_()
        else:
            p.fill_(1.0)
    for b in module.buffers():
        if b.is_floating_point():
            b.normal_(0.0, std, generator=gen)


def materialise(
    module: ModuleT, device: torch.device, dtype: torch.dtype, gen: torch.Generator, std: float = 0.02
) -> ModuleT:
    """A meta-device module -> random weights of `dtype` allocated directly on `device`."""
    module.to(dtype=dtype)  # free on meta
    module.to_empty(device=device)  # in place: returns self
    randomise_(module, gen, std)
    return module.eval().requires_grad_(False)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def build_random_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    from pipeline.models.dit import build_dit

    return materialise(build_dit(cfg), device, dtype, _generator(device, seed))


def build_random_vae(cfg: Any, device: torch.device, seed: int) -> nn.Module:
    from pipeline.models.vae import WanVAE

    with torch.device("meta"):
        model = WanVAE(cfg)
    model = materialise(model, device, torch.float32, _generator(device, seed + 1), std=0.05)
    with torch.no_grad():  # RMSNorm gains are [C, 1, 1(, 1)] tensors: ones, not noise
        for m in model.modules():
            gamma = getattr(m, "gamma", None)
            if isinstance(gamma, Tensor):
                gamma.fill_(1.0)
    return model


def build_random_clip(cfg: Any, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    from transformers import CLIPVisionModel

    from pipeline.models.clip import ImageEncoder, _hf_config, _materialise_buffers

    with torch.device("meta"):
        model = CLIPVisionModel(_hf_config(cfg))
    model = model.to(dtype=dtype).to_empty(device=device)
    randomise_(model, _generator(device, seed + 2))
    for module in model.modules():  # position ids: rebuilt, not noise
        for name, buf in list(module.named_buffers(recurse=False)):
            if name == "position_ids":
                module.register_buffer(
                    name, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False
                )
    _materialise_buffers(model, device)
    return ImageEncoder(model.eval().requires_grad_(False), cfg)


def build_random_t5(cfg: Any, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    from transformers import UMT5EncoderModel

    from pipeline.models.t5 import _hf_config

    with torch.device("meta"):
        model = UMT5EncoderModel(_hf_config(cfg))
    model = materialise(model, device, dtype, _generator(device, seed + 3))
    model.encoder.embed_tokens = model.shared
    return model


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    name: str
    height: int
    width: int
    frame_num: int

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frame_num - 1) // 4 + 1, self.height // 8, self.width // 8

    def tokens(self, cfg: DiTConfig) -> int:
        f, h, w = self.latent
        pt, ph, pw = cfg.patch_size
        return (f // pt) * (h // ph) * (w // pw)


def dit_inputs(
    cfg: DiTConfig, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, Tensor]:
    """Random DiT inputs of one chunk (one speaker): performance.md 4.1 item 3."""
    g = torch.Generator(device=device).manual_seed(seed)
    f, h, w = shape.latent
    fa = (f - 1) * cfg.vae_scale + 1

    def randn(*size: int, dt: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).to(dt)

    return {
        "x": randn(1, cfg.out_dim, f, h, w),
        "t": torch.tensor([999.0], device=device),
        "context": randn(1, cfg.text_len, cfg.text_dim, dt=dtype),
        "clip_fea": randn(1, cfg.clip_tokens, cfg.clip_dim, dt=dtype),
        "y": randn(1, cfg.in_dim - cfg.out_dim, f, h, w, dt=dtype),
        "audio": randn(1, 1, fa, cfg.audio_window, cfg.audio_blocks, cfg.audio_channels, dt=dtype),
    }


# ---------------------------------------------------------------------------------------------
# environment


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / GiB, 1),
            "sms": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
        }
        env |= nvidia_smi()
    else:
        env["gpu"] = None
    return env


def nvidia_smi() -> dict[str, Any]:
    query = "driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    values = [v.strip() for v in out.split(",")]
    return dict(
        zip(
            ("driver", "sm_clock_mhz", "max_sm_clock_mhz", "power_w", "power_limit_w", "temp_c"),
            values,
            strict=False,  # an older nvidia-smi may leave a field out
        )
    )


def memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {
        "allocated_gib": round(torch.cuda.memory_allocated(device) / GiB, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 2),
    }


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------
# the bench


class Bench:
    """State of one benchmark run: the random models, the report being filled."""

    def __init__(
        self,
        opts: BenchOptions,
        log: Callable[[str], None] = print,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        from pipeline.models.clip import ClipConfig
        from pipeline.models.t5 import T5Config
        from pipeline.models.vae import VAEConfig

        self.opts = opts
        self.log = log
        self.device = torch.device(opts.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "infinitetalk bench needs a CUDA device (or --device cpu for a tiny smoke run)"
            )
        self.clock = Clock(self.device)
        self.cfg = opts.dit
        self.vae_cfg = opts.vae or VAEConfig()
        self.clip_cfg = opts.clip or ClipConfig()
        self.t5_cfg = opts.t5_config or T5Config()
        self.report: dict[str, Any] = {"options": _jsonable(opts), "errors": {}}
        self.dit: Any = None
        self.vae: Any = None
        self.clip: Any = None
        self.t5: Any = None
        self.plain_out: dict[str, Tensor] = {}
        self.placer = Placer(self)
        self.checkpoint = checkpoint  # called with the report after every section (partial results)

    # -- sections -------------------------------------------------------------------------------

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.log(f"[bench] {name} ...")
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every section reports its own failure
            self.report["errors"][name] = f"{type(e).__name__}: {e}"
            self.log(f"[bench] {name} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        finally:
            self.log(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s")
            if self.checkpoint is not None:
                self.checkpoint(_jsonable(self.report))

    def run(self) -> dict[str, Any]:
        opts = self.opts
        self.report["environment"] = environment(self.device)
        with self.section("build"):
            self.build()
        if opts.load_probe_blocks > 0:
            with self.section("load"):
                self.report["load"] = self.load_probe()
        fast = PerfConfig(
            attention=opts.attention,  # type: ignore[arg-type]
            compile=opts.compile,
            fp8_scaling=opts.fp8_scaling,  # type: ignore[arg-type]
        )
        if opts.baseline and self.dit is not None:
            for size in opts.sizes:  # on the bf16 weights, before any fp8 quantisation
                with self.section(f"forward {size} plain"):
                    self.forward(self.shape(size), PerfConfig.plain(), "plain")
        for dtype_name in opts.dtypes:
            if self.dit is None:
                break
            if dtype_name == "fp8":
                with self.section("fp8 quantise"):
                    self.to_fp8()
            fp8 = dtype_name == "fp8"
            attn8 = fp8 and self.fp8_attention()
            for size in opts.sizes:
                with self.section(f"forward {size} {dtype_name}"):
                    self.forward(self.shape(size), replace(fast, fp8=fp8), dtype_name)
                if attn8:
                    with self.section(f"forward {size} fp8+attn"):
                        self.forward(
                            self.shape(size), replace(fast, fp8=True, fp8_attention=True), "fp8+attn"
                        )
            if opts.profile and self.device.type == "cuda" and opts.sizes:
                with self.section(f"profile {opts.sizes[0]} {dtype_name}"):
                    self.profile(self.shape(opts.sizes[0]), "fp8+attn" if attn8 else dtype_name)
            if self.vae is not None and dtype_name == opts.dtypes[0]:
                for size in opts.sizes:
                    with self.section(f"vae {size}"):
                        self.vae_phase(self.shape(size))
            for size in opts.chunk_sizes:
                for n_pass in opts.passes:
                    perf = replace(fast, fp8=fp8, fp8_attention=attn8)
                    if opts.unconstrained or not opts.gpu_memory_gib:
                        with self.section(f"chunks {size} {dtype_name} {n_pass}-pass"):
                            self.chunks(self.shape(size), dtype_name, n_pass, perf)
                    for budget in opts.gpu_memory_gib:
                        with self.section(f"chunks {size} {dtype_name} {n_pass}-pass {budget:g} GiB"):
                            self.budget_chunks(self.shape(size), dtype_name, n_pass, perf, budget)
        self.report["summary"] = summarise(self.report)
        self.report["environment_after"] = nvidia_smi() if self.device.type == "cuda" else {}
        return self.report

    def fp8_attention(self) -> bool:
        """Whether the fp8 runs also put the self-attention in fp8 (logged when it cannot)."""
        from pipeline.perf import resolve_fp8_attention

        on, reason = resolve_fp8_attention(self.opts.fp8_attention, fp8=True, device=self.device)
        if reason is not None:
            if on:
                raise ValueError(f"--fp8-attention on: {reason}")
            self.log(f"[bench] fp8 attention skipped: {reason}")
            self.report["fp8_attention_unavailable"] = reason
            return False
        return on

    def shape(self, size: str) -> Shape:
        h, w = self.opts.pixel_sizes[size]
        return Shape(name=size, height=h, width=w, frame_num=self.opts.frame_num)

    # -- build and load ---------------------------------------------------------------------------

    def build(self) -> None:
        from pipeline.loading import resolve_dtype

        dev, seed = self.device, self.opts.seed
        dtype = resolve_dtype("auto", dev)  # bf16 on CUDA, fp32 on the CPU, as a render
        out: dict[str, Any] = {}
        reset_peak(dev)
        t, self.dit = self.clock.time(lambda: build_random_dit(self.cfg, dev, dtype, seed))
        out["dit_s"] = round(t, 2)
        out["dit_gb"] = round(module_bytes(self.dit) / 1e9, 2)
        out["dit_params_b"] = round(sum(p.numel() for p in self.dit.parameters()) / 1e9, 3)
        t, self.vae = self.clock.time(lambda: build_random_vae(self.vae_cfg, dev, seed))
        out["vae_s"], out["vae_gb"] = round(t, 2), round(module_bytes(self.vae) / 1e9, 3)
        clip_dtype = torch.float16 if dev.type == "cuda" else torch.float32
        t, self.clip = self.clock.time(lambda: build_random_clip(self.clip_cfg, dev, clip_dtype, seed))
        out["clip_s"], out["clip_gb"] = round(t, 2), round(module_bytes(self.clip.model) / 1e9, 3)
        if self.opts.t5:
            t, self.t5 = self.clock.time(lambda: build_random_t5(self.t5_cfg, dev, dtype, seed))
            out["t5_s"], out["t5_gb"] = round(t, 2), round(module_bytes(self.t5) / 1e9, 2)
        else:
            out["t5"] = "skipped (--no-t5): umT5-XXL runs once per video (~10 TFLOP, ~13 ms at peak)"
        out["memory"] = memory(dev)
        self.report["build"] = out
        self.log(f"[bench] built random weights: {out}")

    def load_probe(self) -> dict[str, Any]:
        """Write `load_probe_blocks` real-size DiT blocks as one safetensors shard, drop the page
        cache if allowed, load it back through `pipeline.weights.load_files` (mmap -> GPU)."""
        from safetensors.torch import save_file

        from pipeline.models.dit import WanAttentionBlock
        from pipeline.weights import load_files

        n = self.opts.load_probe_blocks
        state = {
            f"blocks.{i}.{k}": v.detach().to("cpu", copy=True).contiguous()
            for i in range(n)
            for k, v in self.dit.blocks[i].state_dict().items()
        }
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        with tempfile.TemporaryDirectory(
            prefix="itbench-", dir=os.environ.get("INFINITETALK_BENCH_TMP")
        ) as tmp:
            path = Path(tmp) / "probe-00001-of-00001.safetensors"
            t0 = time.perf_counter()
            save_file(state, str(path))
            os.sync()
            write_s = time.perf_counter() - t0
            del state
            cold = _drop_page_cache() if self.device.type == "cuda" else False

            class Probe(nn.Module):
                def __init__(self, cfg: DiTConfig) -> None:
                    super().__init__()
                    self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(n)])

            with torch.device("meta"):
                probe = Probe(self.cfg)
            dtype = self.dit.dtype
            self.clock.sync()
            t0 = time.perf_counter()
            load_files(probe, [path], device=self.device, dtype=dtype)
            self.clock.sync()
            load_s = time.perf_counter() - t0
            del probe
        gbps = nbytes / 1e9 / load_s
        full_gb = module_bytes(self.dit) / 1e9
        return {
            "blocks": n,
            "shard_gb": round(nbytes / 1e9, 2),
            "write_s": round(write_s, 2),
            "page_cache_dropped": cold,
            "load_s": round(load_s, 4),
            "load_gbps": round(gbps, 2),
            "dit_gb": round(full_gb, 2),
            "dit_load_s_extrapolated": round(full_gb / gbps, 1),
        }

    def to_fp8(self) -> None:
        from pipeline.compile import uncompile_blocks
        from pipeline.fp8 import to_fp8

        uncompile_blocks(self.dit)
        reset_peak(self.device)
        t, n = self.clock.time(lambda: to_fp8(self.dit))
        self.report["fp8"] = {
            "quantise_s": round(t, 2),
            "layers": n,
            "dit_gb": round(module_bytes(self.dit) / 1e9, 2),
            "memory": memory(self.device),
        }
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- DiT forward -------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, shape: Shape, perf: PerfConfig, label: str) -> None:
        from pipeline.compile import graph_breaks
        from pipeline.perf import apply_dit_perf

        opts = self.opts
        applied = apply_dit_perf(perf, self.dit)
        inputs = dit_inputs(self.cfg, shape, self.device, self.dit.dtype, opts.seed + 10)
        big = shape.name == "720"
        warmup = max(1, opts.warmup - 1) if big else opts.warmup
        repeats = max(2, opts.repeats - 2) if big else opts.repeats
        if label == "plain":
            warmup, repeats = min(warmup, 1), min(repeats, 3 if not big else 2)
        breaks0 = graph_breaks()
        reset_peak(self.device)
        stats, first, out = self.clock.repeat(lambda: self.dit(**inputs), warmup, repeats)
        entry: dict[str, Any] = {
            "tokens": shape.tokens(self.cfg),
            **stats.as_dict(),
            "first_call_s": round(first, 2),
            "settings": applied,
            "graph_breaks": graph_breaks() - breaks0,
            "memory": memory(self.device),
        }
        flops = dit_forward_flops(self.cfg, shape)
        entry["pflop"] = round(flops / 1e15, 3)
        entry["tflops_per_s"] = round(flops / stats.median_s / 1e12, 1)
        key = f"{shape.name}"
        if label == "plain":
            self.plain_out[key] = out.detach().float().cpu()
        elif key in self.plain_out:
            entry["rel_err_vs_plain"] = rel_err(out.float().cpu(), self.plain_out[key])
        self.report.setdefault("forward", {}).setdefault(shape.name, {})[label] = entry
        self.log(
            f"[bench] forward {shape.name} {label}: median {stats.median_s:.3f} s, min {stats.min_s:.3f} s "
            f"(first {first:.1f} s) {entry.get('rel_err_vs_plain', '')}"
        )

    @torch.no_grad()
    def profile(self, shape: Shape, label: str) -> None:
        """CUDA kernel time of one forward on the current settings, by kind and top kernels."""
        from torch.profiler import ProfilerActivity, profile

        inputs = dit_inputs(self.cfg, shape, self.device, self.dit.dtype, self.opts.seed + 10)
        self.dit(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            self.dit(**inputs)
            torch.cuda.synchronize()
        kernels: dict[str, float] = {}
        for event in prof.key_averages():
            if "cuda" not in str(getattr(event, "device_type", "")).lower():
                continue  # CPU-side op: its kernels are counted as their own (CUDA) events
            t = float(
                getattr(event, "self_device_time_total", 0.0) or getattr(event, "device_time_total", 0.0)
            )
            if t > 0:
                kernels[event.key] = kernels.get(event.key, 0.0) + t / 1e6
        total = sum(kernels.values())
        kinds: dict[str, float] = {}
        for name, t in kernels.items():
            kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + t
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
        entry = {
            "device_s": round(total, 3),
            "by_kind_s": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [[name[:120], round(t, 4)] for name, t in top],
        }
        self.report.setdefault("profile", {})[f"{shape.name}_{label}"] = entry
        self.log(f"[bench] profile {shape.name} {label}: {json.dumps(entry, indent=1)}")

    # -- VAE ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def vae_phase(self, shape: Shape) -> None:
        """Decode 21 latents and encode 81 and 9 frames, fp32 (the reference) vs the fast VAE."""
        from pipeline.perf import apply_vae_perf

        g = torch.Generator(device=self.device).manual_seed(self.opts.seed + 20)
        f, h, w = shape.latent
        latents = torch.randn(self.vae_cfg.z_dim, f, h, w, generator=g, device=self.device)
        video = (
            torch.rand(3, shape.frame_num, shape.height, shape.width, generator=g, device=self.device) * 2 - 1
        )
        motion = video[:, -self.opts.motion_frame :]
        entry: dict[str, Any] = {}
        decoded: dict[str, Tensor] = {}
        warmup, repeats = min(1, self.opts.warmup), min(2, self.opts.repeats)
        for label, perf in (("fp32", PerfConfig.plain()), ("fast", PerfConfig())):
            entry[label] = {"settings": apply_vae_perf(perf, self.vae)}
            reset_peak(self.device)
            st, _, out = self.clock.repeat(lambda: self.vae.decode(latents), warmup, repeats)
            decoded[label] = out[:, :: max(1, shape.frame_num // 9)].cpu()
            entry[label]["decode"] = st.as_dict()
            st, _, _ = self.clock.repeat(lambda: self.vae.encode(video), warmup, repeats)
            entry[label]["encode_all"] = st.as_dict()
            st, _, _ = self.clock.repeat(lambda: self.vae.encode(motion), warmup, repeats)
            entry[label]["encode_motion"] = st.as_dict()
            entry[label]["memory"] = memory(self.device)
            del out
        entry["fast_decode_rel_err_vs_fp32"] = rel_err(decoded["fast"], decoded["fp32"])
        self.report.setdefault("vae", {})[shape.name] = entry
        self.log(f"[bench] vae {shape.name}: {json.dumps(entry)}")

    # -- the chunk loop, under a memory budget or not ------------------------------------------

    @torch.no_grad()
    def budget_chunks(
        self, shape: Shape, dtype_name: str, n_pass: int, fast: PerfConfig, budget_gib: float
    ) -> dict[str, Any]:
        """The chunk loop under the plan for `budget_gib`, the budget enforced on the allocator."""
        placement = self.placer.plan_for(shape, n_pass, budget_gib)
        self.log(f"[bench] plan: {placement.summary()}")
        self.placer.place(placement)
        fraction = 1.0
        index = self.device.index if self.device.index is not None else 0
        try:
            if self.device.type == "cuda":
                index = torch.cuda.current_device() if self.device.index is None else index
                total = torch.cuda.get_device_properties(index).total_memory
                fraction = min(1.0, budget_gib * GiB / total)
                torch.cuda.set_per_process_memory_fraction(fraction, index)
            entry = self.chunks(shape, dtype_name, n_pass, fast, label=f"{n_pass}-pass@{budget_gib:g}GiB")
        finally:
            if self.device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, index)
            self.placer.unplace()
        entry["placement"] = placement.as_dict()
        entry["memory_fraction"] = round(fraction, 4)
        entry["budget_gib"] = budget_gib
        within = entry["memory"].get("peak_reserved_gib", 0) <= budget_gib
        entry["peak_within_budget"] = within
        self.log(
            f"[bench] {budget_gib:g} GiB: {entry['steady_chunk_s']} s per chunk, "
            f"{entry['gpu_s_per_video_s']} GPU-s per video-s, peak {entry['memory']}, "
            f"h2d {entry.get('h2d_gb_per_forward')} GB per forward"
        )
        return entry

    @torch.no_grad()
    def chunks(
        self, shape: Shape, dtype_name: str, n_pass: int, fast: PerfConfig, label: str | None = None
    ) -> dict[str, Any]:
        from pipeline.perf import apply_perf

        applied = apply_perf(fast, dit=self.dit, vae=self.vae)
        reset_peak(self.device)
        runner = ChunkRunner(self, shape, n_pass)
        per_chunk = []
        t_start = time.perf_counter()
        for k in range(self.opts.num_chunks):
            per_chunk.append(runner.chunk(k))
            self.log(f"[bench] chunk {k + 1} {shape.name} {dtype_name} {n_pass}-pass: {per_chunk[-1]}")
        wall = time.perf_counter() - t_start
        steady = per_chunk[-1] if len(per_chunk) > 1 else per_chunk[0]
        new_frames = self.opts.frame_num - self.opts.motion_frame
        video_s = new_frames / FPS
        entry = {
            "settings": applied,
            "passes": n_pass,
            "steps": self.opts.steps,
            "chunks": per_chunk,
            "wall_s": round(wall, 2),
            "steady_chunk_s": steady["total_s"],
            "new_frames_per_chunk": new_frames,
            "gpu_s_per_video_s": round(steady["total_s"] / video_s, 2),
            "memory": memory(self.device),
            "frames_shape": list(runner.last_video_shape),
            "finite": runner.finite,
            "dit_forwards_per_chunk": runner.forwards,
        }
        if runner.h2d_bytes:  # host-to-device weight traffic of the steady chunk's denoising
            per_step = runner.h2d_bytes * n_pass // runner.forwards
            entry["h2d_bytes_per_step"] = per_step
            entry["h2d_gb_per_forward"] = round(runner.h2d_bytes / runner.forwards / 1e9, 2)
            entry["h2d_gb_per_step"] = round(per_step / 1e9, 2)
        self.report.setdefault("chunks", {}).setdefault(shape.name, {}).setdefault(dtype_name, {})[
            label or f"{n_pass}-pass"
        ] = entry
        return entry


class Placer:
    """Where the bench's models live under a memory plan (the pipeline's `place`, for the bench):
    the plan for a budget, the streamed blocks' pinned buffers (reused across budgets), the
    in/out shuttles of the encoders."""

    def __init__(self, bench: Bench) -> None:
        self.b = bench
        #: pinned host buffers of streamed blocks and the device slots, reused across budgets
        self.pool: dict[Any, Any] = {}
        self.shuttles: dict[str, Any] = {}

    def plan_for(self, shape: Shape, n_pass: int, budget_gib: float) -> Any:
        """The placement plan (pipeline.placement) of this stack for `shape` under the budget."""
        from pipeline.offload import module_bytes as nbytes
        from pipeline.placement import GiB as GIB
        from pipeline.placement import MemoryBudget, ModelSizes, estimate_working_set, host_memory_bytes, plan

        blocks = [nbytes(b) for b in self.b.dit.blocks]
        sizes = ModelSizes(
            num_blocks=len(blocks),
            block_bytes=max(blocks),
            dit_other_bytes=nbytes(self.b.dit) - sum(blocks),
            t5_bytes=nbytes(self.b.t5) if self.b.t5 is not None else 0,
            clip_bytes=nbytes(self.b.clip.model),
            # not built here (a CPU-stage model): reserved as the daemon does (full size only)
            wav2vec_bytes=WAV2VEC_BYTES if self.b.cfg.dim >= 1024 else 0,
            vae_bytes=nbytes(self.b.vae),
        )
        from pipeline.loading import vae_peak_estimate

        work = estimate_working_set(
            dim=self.b.cfg.dim,
            height=shape.height,
            width=shape.width,
            frame_num=shape.frame_num,
            passes=n_pass,
            vae_estimate=vae_peak_estimate(self.b.vae_cfg, self.b.device.type),
            text_dim=self.b.cfg.text_dim,
            text_len=self.b.cfg.text_len,
        )
        gpu = int(budget_gib * GIB)
        margin = max(int(0.5 * GIB), int(0.03 * gpu)) if self.b.device.type == "cuda" else 0
        budget = MemoryBudget(
            gpu_bytes=gpu,
            host_bytes=host_memory_bytes() + self.pinned_bytes(),
            margin_bytes=margin,
            source=f"--gpu-memory-gib {budget_gib:g}",
            device_type=self.b.device.type,
        )
        return plan(sizes, work, budget)

    def pinned_bytes(self) -> int:
        return sum(t.numel() for k, t in self.pool.items() if k != "slots")

    def place(self, placement: Any) -> None:
        """Move the models where `placement` puts them (the pipeline's `place`, for the bench)."""
        from pipeline.models.vae import VaeTiling
        from pipeline.offload import BlockSwap, OnDemand

        dev = self.b.device
        if placement.swapped_blocks:
            self.b.dit.block_swap = BlockSwap(
                self.b.dit.blocks,
                resident=placement.resident_blocks,
                device=dev,
                slots=placement.swap_slots,
                pool=self.pool,
            )
        self.shuttles = {}
        if self.b.t5 is not None and placement.t5 == "cpu":
            self.b.t5.to("cpu")
        elif self.b.t5 is not None and placement.t5 == "inout":
            self.shuttles["t5"] = OnDemand(self.b.t5, dev)
        if placement.clip == "inout":
            self.shuttles["clip"] = OnDemand(self.b.clip.model, dev)
        rows, cols = placement.vae_tiles
        self.b.vae.tiling = VaeTiling(rows=rows, cols=cols) if rows * cols > 1 else None
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def unplace(self) -> None:
        """Everything resident again."""
        swap = getattr(self.b.dit, "block_swap", None)
        if swap is not None:
            swap.detach()
            self.b.dit.block_swap = None
        if self.b.t5 is not None:
            self.b.t5.to(self.b.device)
        self.b.clip.model.to(self.b.device)
        self.b.vae.tiling = None
        self.shuttles = {}

    def use(self, name: str) -> Any:
        """The context in which component `name` is on the device (in/out components)."""
        import contextlib

        shuttle = self.shuttles.get(name)
        return shuttle.use() if shuttle is not None else contextlib.nullcontext()


class ChunkRunner:
    """The pipeline's chunk loop (`pipeline.denoise.denoise_chunk`, then the VAE decode) on random
    inputs, timed by phase. Conditioning of a still image (CLIP, y) is computed in chunk 0 and kept."""

    def __init__(self, bench: Bench, shape: Shape, n_pass: int) -> None:
        from pipeline import guidance, sampler

        self.b = bench
        self.shape = shape
        self.n_pass = n_pass
        dev = bench.device
        self.gen = torch.Generator(device="cpu").manual_seed(bench.opts.seed + 30)
        g = torch.Generator(device=dev).manual_seed(bench.opts.seed + 31)
        self.cond = torch.rand(3, 1, shape.height, shape.width, generator=g, device=dev) * 2 - 1
        cfg = bench.cfg
        f = shape.latent[0]
        fa = (f - 1) * cfg.vae_scale + 1
        dtype = bench.dit.dtype
        self.context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=dev).to(dtype)
        self.audio = torch.randn(
            1, 1, fa, cfg.audio_window, cfg.audio_blocks, cfg.audio_channels, generator=g, device=dev
        ).to(dtype)
        null_audio = torch.zeros_like(self.audio)
        self.by_pass = {
            guidance.COND: (self.context, self.audio),
            guidance.DROP_AUDIO: (self.context, null_audio),
        }
        self.passes = (guidance.COND,) if n_pass == 1 else (guidance.COND, guidance.DROP_AUDIO)
        self.audio_scale = 1.0 if n_pass == 1 else 2.0
        self.steps = sampler.timesteps(
            bench.opts.steps, SHIFT_BY_SIZE.get(f"infinitetalk-{shape.name}", 7.0)
        ).to(dev)
        self.cache: tuple[Tensor, Tensor] | None = None
        self.motion_frames: Tensor | None = None
        self.last_video_shape: tuple[int, ...] = ()
        self.finite = True
        self.forwards = 0  # DiT passes of the last chunk
        self.h2d_bytes = 0  # streamed-block bytes copied in the last chunk's denoising

    def chunk(self, k: int) -> dict[str, float]:
        """One chunk as the pipeline runs it (`pipeline.denoise`), each phase timed."""
        b, clock = self.b, self.b.clock
        times: dict[str, float] = {}
        wall0 = time.perf_counter()
        if b.t5 is not None and k == 0:
            times["t5_s"] = self.text()
        if self.cache is None:
            times["clip_s"], clip_fea = clock.time(self.clip)
            frame_num, (_, h, w) = self.shape.frame_num, self.shape.latent
            encode_y = lambda: denoise.image_condition(b.vae, self.cond, frame_num, (h, w))  # noqa: E731
            times["vae_encode_y_s"], y = clock.time(encode_y)
            self.cache = (clip_fea.to(b.dit.dtype), y[None].to(b.dit.dtype))
        clip_fea, y = self.cache
        frames = self.motion_frames
        encode = (
            (lambda: denoise.encode_one_frame(b.vae, self.cond))
            if frames is None
            else (lambda: b.vae.encode(frames))
        )
        times["vae_encode_motion_s"], motion = clock.time(encode)
        latent = torch.randn(b.vae_cfg.z_dim, *self.shape.latent, generator=self.gen).to(b.device)
        cond = denoise.ChunkConditions(
            clip_fea=clip_fea, y=y, motion=motion, masks=None, by_pass=self.by_pass
        )
        swap = getattr(b.dit, "block_swap", None)
        copied0 = swap.bytes_copied if swap is not None else 0
        steps, passes, scale = self.steps, self.passes, self.audio_scale
        run = lambda: denoise.denoise_chunk(b.dit, latent, cond, steps, passes, 1.0, scale)  # noqa: E731
        times["denoise_s"], latent = clock.time(run)
        self.forwards = (len(steps) - 1) * len(passes)  # DiT passes of the chunk
        self.h2d_bytes = (swap.bytes_copied - copied0) if swap is not None else 0
        times["vae_decode_s"], video = clock.time(lambda: b.vae.decode(latent))
        self.finite = self.finite and bool(torch.isfinite(video).all())
        self.motion_frames = video[:, -b.opts.motion_frame :].clone()
        self.last_video_shape = tuple(video.shape)
        clock.sync()
        out = {k2: round(v, 3) for k2, v in times.items()}
        out["total_s"] = round(sum(times.values()), 3)
        out["wall_s"] = round(time.perf_counter() - wall0, 3)
        return out

    def text(self) -> float:
        """Seconds of umT5 on a prompt pair; on the CPU 128 tokens (a long prompt), not the 512
        padded slots."""
        b = self.b
        t5_device = next(b.t5.parameters()).device
        n_tok = b.cfg.text_len if t5_device.type == "cuda" or "t5" in b.placer.shuttles else 128
        ids = torch.randint(0, b.t5_cfg.vocab_size, (2, n_tok), generator=self.gen)

        def run() -> Tensor:
            with b.placer.use("t5"):
                dev = next(b.t5.parameters()).device
                return b.t5(input_ids=ids.to(dev)).last_hidden_state.to(b.device)

        return self.b.clock.time(run)[0]

    def clip(self) -> Tensor:
        with self.b.placer.use("clip"):
            return self.b.clip.encode_image_clip(self.cond[:, 0][None])


def kernel_kind(name: str) -> str:
    """Rough class of a CUDA kernel by its name (for the profile summary)."""
    n = name.lower()
    if "triton" in n:  # inductor names its kernels after the ops they fuse (_scaled_mm, sdpa, ...)
        return "fused (triton)"
    if "double" in n or "f64" in n or "complex" in n:
        return "float64/complex"
    if "sdpa" in n or "fmha" in n or "flash" in n or "attention" in n or "cudnn" in n:
        return "attention"
    if "gemm" in n or "nvjet" in n or "cutlass" in n or "xmma" in n or "matmul" in n or "_mm" in n:
        return "gemm"
    if "conv" in n:
        return "conv"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "other element-wise"


def _drop_page_cache() -> bool:
    """Drop the OS page cache so the load reads the disk (root on Linux only); False if not allowed."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# FLOP model (performance.md section 1.2)


def dit_forward_flops(cfg: DiTConfig, shape: Shape) -> float:
    """FLOPs of one DiT forward, one speaker (2 per MAC; attention 4·Lq·Lk·D per layer)."""
    d, ffn = cfg.dim, cfg.ffn_dim
    seq = shape.tokens(cfg)
    f = shape.latent[0]
    ctx = cfg.text_len + cfg.clip_tokens
    per_layer = 2 * seq * (8 * d * d + 2 * d * ffn)  # linear layers on the L tokens
    per_layer += 2 * ctx * 3 * d * d + 2 * f * cfg.context_tokens * cfg.output_dim * 2 * d  # k/v of contexts
    per_layer += 4 * seq * seq * d  # self-attention
    per_layer += 4 * seq * ctx * d + 4 * seq * cfg.context_tokens * d  # cross and audio attention
    return float(per_layer * cfg.num_layers)


# ---------------------------------------------------------------------------------------------
# summary and text report


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size, modes in report.get("forward", {}).items():
        for mode, e in modes.items():
            out[f"forward_{size}_{mode}_s"] = e["median_s"]
    for size, by_dtype in report.get("chunks", {}).items():
        for dtype_name, by_pass in by_dtype.items():
            for p, e in by_pass.items():
                out[f"chunk_{size}_{dtype_name}_{p}_s"] = e["steady_chunk_s"]
                out[f"gpu_s_per_video_s_{size}_{dtype_name}_{p}"] = e["gpu_s_per_video_s"]
                out[f"peak_gib_{size}_{dtype_name}_{p}"] = e["memory"].get("peak_allocated_gib")
    if "load" in report:
        out["dit_load_s_extrapolated"] = report["load"]["dit_load_s_extrapolated"]
    return out


def format_report(report: dict[str, Any]) -> str:
    """The report as text: set-up, DiT forwards, VAE, chunk loops, errors."""
    lines = _setup_lines(report)
    lines.append("")
    lines += _forward_lines(report)
    lines += _vae_lines(report)
    lines.append("")
    lines += _chunk_lines(report)
    if report.get("errors"):
        lines.append("")
        for name, err in report["errors"].items():
            lines.append(f"ERROR in {name}: {err}")
    return "\n".join(lines)


def _setup_lines(report: dict[str, Any]) -> list[str]:
    env = report.get("environment", {})
    lines = [
        (
            f"GPU: {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, {env.get('sms')} SMs), "
            f"driver {env.get('driver')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}"
        ),
    ]
    build = report.get("build", {})
    if build:
        lines.append(
            f"random weights built on the device: DiT {build.get('dit_gb')} GB in {build.get('dit_s')} s; "
            f"VAE {build.get('vae_gb')} GB, CLIP {build.get('clip_gb')} GB, T5 {build.get('t5_gb', '-')} GB"
        )
    load = report.get("load")
    if load:
        lines.append(
            f"load path (mmap safetensors -> GPU): {load['shard_gb']} GB in {load['load_s']} s = "
            f"{load['load_gbps']} GB/s (page cache dropped: {load['page_cache_dropped']}); "
            f"DiT {load['dit_gb']} GB -> ~{load['dit_load_s_extrapolated']} s"
        )
    if "fp8" in report:
        lines.append(
            f"fp8: {report['fp8']['layers']} linear layers quantised in {report['fp8']['quantise_s']} s, "
            f"DiT now {report['fp8']['dit_gb']} GB"
        )
    return lines


def _forward_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    lines.append(
        f"{'DiT forward':<26}{'median s':>10}{'min s':>9}{'TFLOP/s':>9}{'first s':>9}{'peak GiB':>10}"
        f"{'rel err':>10}  settings"
    )
    for size, modes in report.get("forward", {}).items():
        for mode, e in modes.items():
            err = e.get("rel_err_vs_plain")
            s = e["settings"]
            lines.append(
                f"{size + 'p ' + mode:<26}{e['median_s']:>10.3f}{e['min_s']:>9.3f}{e['tflops_per_s']:>9.0f}"
                f"{e['first_call_s']:>9.1f}{e['memory'].get('peak_allocated_gib', 0):>10.1f}"
                f"{'' if err is None else f'{err:.2e}':>10}  {s['attention']}/{s['rope']}/"
                f"{'compiled' if s['compiled'] else 'eager'}/fp8:{s['fp8_layers'] > 0 or mode == 'fp8'}"
                f" breaks={e['graph_breaks']}"
            )
    return lines


def _vae_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for size, e in report.get("vae", {}).items():
        for label in ("fp32", "fast"):
            v = e[label]
            lines.append(
                f"VAE {size}p {label:<5}: decode {v['decode']['median_s']:.2f} s, encode "
                f"{report['options']['frame_num']} frames "
                f"{v['encode_all']['median_s']:.2f} s, encode {report['options']['motion_frame']} frames "
                f"{v['encode_motion']['median_s']:.2f} s  ({v['settings']})"
            )
        lines.append(f"VAE {size}p fast decode rel err vs fp32: {e['fast_decode_rel_err_vs_fp32']:.2e}")
    return lines


def _chunk_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for size, by_dtype in report.get("chunks", {}).items():
        for dtype_name, by_pass in by_dtype.items():
            for p, e in by_pass.items():
                phases = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in e["chunks"][-1].items())
                lines.append(
                    f"chunk {size}p {dtype_name} {p} ({e['steps']} steps): steady chunk {e['steady_chunk_s']:.2f} s "
                    f"= {e['gpu_s_per_video_s']:.2f} GPU-s per video-s; peak "
                    f"{e['memory'].get('peak_allocated_gib')} GiB; [{phases}]"
                )
                if len(e["chunks"]) > 1:
                    first = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in e["chunks"][0].items())
                    lines.append(f"    first chunk: [{first}]")
                if "placement" in e:
                    lines.append(
                        f"    plan: {e['placement']['summary']}; host-to-device "
                        f"{e.get('h2d_gb_per_forward', 0)} GB per DiT forward; peak reserved "
                        f"{e['memory'].get('peak_reserved_gib')} GiB"
                    )
    return lines


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def run_bench(
    opts: BenchOptions,
    *,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every section `opts` asks for; returns the JSON-ready report (`checkpoint` gets the
    partial report after each section)."""
    return _jsonable(Bench(opts, log=log, checkpoint=checkpoint).run())
