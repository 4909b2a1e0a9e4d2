"""Speed settings of a loaded model stack, in one frozen value, applied in one place.

    perf = PerfConfig(attention="auto", rope="fast", compile=True, fp8=False, vae_dtype="bf16")
    report = apply_perf(perf, dit=pipe.dit, vae=pipe.vae)

Each setting is independent and has a plain (reference-equivalent) value, so every fast path can
be checked against the plain one on the same weights (`infinitetalk bench`, tests/gpu):

| setting     | fast (default)  | plain            | what it does |
|-------------|-----------------|------------------|--------------|
| attention   | "auto"          | "sdpa"           | cuDNN SDPA on Hopper (logged), flash-attn where faster, else SDPA |
| rope        | "fast"          | "exact"          | fp32 cos/sin tables built once per token grid, not float64 complex per call |
| compile     | True            | False            | `torch.compile` of the repeated DiT block (CUDA only) |
| fp8         | False           | False            | e4m3 weights + dynamic row-wise activations on the fp8 tensor cores, after the LoRA merge |
| fp8_scaling | "row"           | "row"            | fp8 activation scales: "row" (one per token, row-wise kernel) or "tensor" (one per call, tensor-wise kernel, weight row scales on the output) |
| fp8_attention | False         | False            | self-attention through cuDNN's fp8 flash attention (`pipeline.models.attention_fp8`); on by default with fp8 where available (`resolve_fp8_attention`) |
| vae_dtype   | "bf16"          | "fp32"           | VAE weights/activations in bf16 (CUDA only; the reference runs fp32) |
| channels_last | True          | False            | VAE 3-D convolutions in channels-last-3d layout (cuDNN's fastest on Hopper) |

The reference's one-speaker attention map is never computed (pipeline.models.dit). Where the
weights live (resident, streamed blocks, encoders on the CPU or in and out) is the memory plan's
business (pipeline.placement, pipeline.offload), decided once at load, not per chunk.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from pipeline.choices import ATTENTION, FP8_ATTENTION, FP8_SCALING, AttentionName, Fp8ScalingName

if TYPE_CHECKING:
    from pipeline.models.dit import InfiniteTalkDiT
    from pipeline.models.vae import WanVAE

logger = logging.getLogger(__name__)

Attention = AttentionName


@dataclass(frozen=True, slots=True, kw_only=True)
class PerfConfig:
    attention: Attention = "auto"
    rope: Literal["fast", "exact"] = "fast"
    compile: bool = True
    fp8: bool = False
    fp8_scaling: Fp8ScalingName = "row"
    fp8_attention: bool = False
    vae_dtype: Literal["bf16", "fp32"] = "bf16"
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.rope not in ("fast", "exact"):
            raise ValueError(f"rope must be 'fast' or 'exact', got {self.rope!r}")
        if self.fp8_scaling not in FP8_SCALING:
            raise ValueError(f"fp8_scaling must be one of {FP8_SCALING}, got {self.fp8_scaling!r}")
        if self.vae_dtype not in ("bf16", "fp32"):
            raise ValueError(f"vae_dtype must be 'bf16' or 'fp32', got {self.vae_dtype!r}")

    @classmethod
    def plain(cls) -> PerfConfig:
        """The reference-equivalent settings (what the fast paths are checked against)."""
        return cls(
            attention="sdpa", rope="exact", compile=False, fp8=False, vae_dtype="fp32", channels_last=False
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_fp8_attention(setting: str, *, fp8: bool, device: torch.device | str) -> tuple[bool, str | None]:
    """The `[performance] fp8_attention` / `--fp8-attention` setting on `device`: (on, why fp8
    attention cannot run there or None). "auto" is on with fp8 weights where cuDNN fp8 attention
    runs (logged either way), "on" is on (applying it fails with the reason where it cannot
    run), "off" is off. The one place the setting is decided (the worker, the pipeline, bench)."""
    if setting not in FP8_ATTENTION:
        raise ValueError(f"fp8_attention must be auto, on or off, got {setting!r}")
    if setting == "off" or (setting == "auto" and not fp8):
        return False, None
    from pipeline.models.attention_fp8 import unavailable_reason

    reason = unavailable_reason(device, test_run=True)
    if setting == "on":
        return True, reason
    logger.info("fp8 attention: %s", "on" if reason is None else f"off ({reason})")
    return reason is None, reason


def apply_dit_perf(perf: PerfConfig, dit: InfiniteTalkDiT) -> dict[str, Any]:
    """Set the DiT's attention kernels and RoPE mode, fp8 math and block compilation, in place."""
    from pipeline.compile import compile_blocks, is_compiled, uncompile_blocks

    device = next(dit.parameters()).device
    if perf.fp8_attention:
        from pipeline.models.attention_fp8 import unavailable_reason

        reason = unavailable_reason(device, test_run=True)
        if reason is not None:
            raise ValueError(f"fp8_attention is on but cannot run here: {reason}")
    backend = dit.use_attention(perf.attention, fp8=perf.fp8_attention)
    dit.rope_mode = perf.rope
    fp8_layers = 0
    if perf.fp8:
        from pipeline.fp8 import to_fp8

        fp8_layers = to_fp8(dit, scaling=perf.fp8_scaling)
    compiled = perf.compile and device.type == "cuda"
    if compiled and not is_compiled(dit):
        compile_blocks(dit)
    elif not compiled and is_compiled(dit):
        uncompile_blocks(dit)
    logger.info(
        "DiT speed settings: attention=%s fp8_attention=%s rope=%s fp8_layers=%d fp8_scaling=%s compiled=%s",
        backend,
        perf.fp8_attention,
        perf.rope,
        fp8_layers,
        perf.fp8_scaling,
        compiled,
    )
    return {
        "attention": backend,
        "fp8_attention": perf.fp8_attention,
        "rope": perf.rope,
        "fp8_layers": fp8_layers,
        "fp8_scaling": perf.fp8_scaling if fp8_layers else None,
        "compiled": compiled,
    }


def apply_vae_perf(perf: PerfConfig, vae: WanVAE) -> dict[str, Any]:
    """Cast the VAE to the configured dtype and lay its 3-D conv weights out channels-last (CUDA)."""
    device = next(vae.parameters()).device
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if perf.vae_dtype == "bf16" and on_cuda else torch.float32
    vae.to(dtype=dtype)
    channels_last = perf.channels_last and on_cuda
    if channels_last:
        vae.use_channels_last()  # weights and activations channels-last
    else:
        for param in vae.parameters():
            if param.ndim in (4, 5):
                param.data = param.data.contiguous()
        vae.channels_last = False
    if on_cuda:
        # cuDNN's algorithm search (benchmark mode) sizes its trial workspaces by the free device
        # memory: for the fp32 convolutions it took 38.7 GiB above the weights in the first decode
        # on an H200 with 84 GiB free (8.2 GiB after it; docs/benchmarks.md section 6). fp32 uses
        # cuDNN's heuristic choice instead (what the reference does); bf16 searches (3.8 GiB).
        torch.backends.cudnn.benchmark = dtype == torch.bfloat16
    return {"vae_dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last}


def default_perf(
    device: torch.device | str,
    *,
    quant: str | None = None,
    attention: str = "auto",
    fp8_attention: bool | None = None,
) -> PerfConfig | None:
    """The settings a pipeline gets when none are given: the fast path on CUDA, None elsewhere.

    `fp8_attention=None` is "auto": on with fp8 weights where it can run (`resolve_fp8_attention`).
    """
    if torch.device(device).type != "cuda":
        return None
    if attention not in ATTENTION:
        if not str(attention).startswith("flash"):
            raise ValueError(f"attention must be one of {ATTENTION} (or flash2/flash3), got {attention!r}")
        attention = "flash"
    fp8 = quant == "fp8"
    if fp8_attention is None:
        fp8_attention, _ = resolve_fp8_attention("auto", fp8=fp8, device=device)
    return PerfConfig(attention=attention, fp8=fp8, fp8_attention=fp8_attention)  # type: ignore[arg-type]


def apply_perf(
    perf: PerfConfig, *, dit: InfiniteTalkDiT | None = None, vae: WanVAE | None = None
) -> dict[str, Any]:
    """Apply `perf` to whichever models are given; returns what was actually set (for manifests)."""
    report: dict[str, Any] = {}
    if dit is not None:
        report |= apply_dit_perf(perf, dit)
    if vae is not None:
        report |= apply_vae_perf(perf, vae)
    return report
