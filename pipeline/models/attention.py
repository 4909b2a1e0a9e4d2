"""The one place that picks the attention kernel.

Layout everywhere in the DiT: q [B, Lq, N, Dh], k and v [B, Lk, N, Dh] -> out [B, Lq, N, Dh].
No masks: the InfiniteTalk DiT attends over full sequences (one sample per batch entry, no
padding on one GPU), so a kernel never needs one.

Backends:
- "sdpa": `torch.nn.functional.scaled_dot_product_attention` (default; CPU and CUDA; PyTorch picks
  its flash / memory-efficient / cuDNN kernel on CUDA);
- "cudnn": SDPA restricted to its cuDNN kernel (CUDA fp16/bf16; FA3-class on Hopper: 37 ms vs
  62 ms for FA2 on a 480p self-attention, docs/benchmarks.md);
- "flash": FlashAttention, CUDA and fp16/bf16 only: FlashAttention 4 (`flash_attn.cute`, package
  `flash-attn-4`, CuTe DSL kernels compiled on first use; Hopper and newer) when installed,
  else FlashAttention 3 (`flash_attn_interface`), else 2 (`flash_attn`);
- "auto": on CUDA fp16/bf16 on Hopper and newer (compute capability >= 9.0): "fa4" when
  FlashAttention 4 is installed (688 vs 585 TFLOP/s for cuDNN on a 480p self-attention on an
  H100, docs/benchmarks.md), else "cudnn"; on older GPUs "flash" when installed, else "sdpa";
  "sdpa" on the CPU. "fa4" runs FlashAttention 4 for long key sequences (the self-attention)
  and cuDNN below `FA4_MIN_KEYS` keys (the cross-attention, where cuDNN is faster).

FlashAttention 4 runs as a `torch.library` custom op, so a compiled DiT block keeps one graph.
"fp8" (`pipeline.models.attention_fp8`) is the self-attention's kernel when `fp8_attention` is on.

A kernel is a function `(q, k, v) -> out` (`Kernel`), one per concrete name in `KERNELS`. `pick`
turns a user-facing name (`NAMES`, from the torch-free `pipeline.choices`) into a kernel once, for
a device and dtype; each DiT attention module holds the kernel it was given
(`InfiniteTalkDiT.use_attention`, called by `pipeline.perf.apply_dit_perf`), so nothing is looked
up per call. A new kernel costs one function and one `KERNELS` entry, plus one
`pipeline.choices.ATTENTION` entry if users may name it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.choices import ATTENTION
from pipeline.models.attention_fp8 import attention_fp8

logger = logging.getLogger(__name__)

#: q, k, v [B, L, N, Dh] -> out [B, Lq, N, Dh]
Kernel = Callable[[Tensor, Tensor, Tensor], Tensor]
Backend = Literal["auto", "sdpa", "cudnn", "flash", "fa4"]
#: the names a user picks from (pipeline.choices.ATTENTION)
NAMES: tuple[str, ...] = ATTENTION
#: below this many keys FlashAttention 4 hands over to cuDNN (the text/image/audio cross-attention:
#: 769 keys or fewer; cuDNN took 57 ms of a 480p forward for them, FlashAttention 4 75 ms, H100)
FA4_MIN_KEYS = 4096

_logged: set[str] = set()
_fa4: bool | None = None
_fa4_ok: dict[str, bool] = {}


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def fa4_available() -> bool:
    """FlashAttention 4 (`flash_attn.cute`, package flash-attn-4) is importable (looked up once)."""
    global _fa4
    if _fa4 is None:
        _fa4 = _module_available("flash_attn.cute")
    return _fa4


def fa4_works(device: torch.device) -> bool:
    """FlashAttention 4 is installed and runs on `device`: one small attention, checked against
    SDPA, once per device. An install that imports but fails (driver, toolkit or DSL mismatch)
    is logged and left out, so "auto" falls back to cuDNN instead of failing every render."""
    if not fa4_available():
        return False
    key = str(device)
    if key not in _fa4_ok:
        _fa4_ok[key] = _fa4_test_run(device)
    return _fa4_ok[key]


def error_on_small_input(kernel: Kernel, device: torch.device) -> float:
    """Relative error of `kernel` against fp32 SDPA on one small random bf16 attention
    (q, k, v [1, 256, 2, 128]): the test run an optional kernel passes before it is used."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(1, 256, 2, 128, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    with torch.no_grad():
        out = kernel(q, k, v).float()
        ref = sdpa(q.float(), k.float(), v.float())
    return float((out - ref).norm() / ref.norm())


def _fa4_test_run(device: torch.device) -> bool:
    try:
        err = error_on_small_input(fa4_attention, device)
        if not err < 2e-2:
            raise ValueError(f"relative error {err:.3g} against SDPA")
        return True
    except Exception as exc:
        logger.warning(
            "FlashAttention 4 is installed but failed a test run on %s (%s: %s); using cuDNN",
            device,
            type(exc).__name__,
            exc,
        )
        return False


def flash_available() -> bool:
    return fa4_available() or _module_available("flash_attn_interface") or _module_available("flash_attn")


def cudnn_preferred(device: torch.device) -> bool:
    """True where cuDNN SDPA is the fastest exact kernel torch offers (Hopper and newer)."""
    if device.type != "cuda" or not torch.backends.cudnn.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The concrete kernel name `name` means on `device` for `dtype`: sdpa, cudnn, flash (2/3) or
    fa4 (logged once per concrete name). A concrete name queries nothing, so it stays traceable."""
    if name not in (*NAMES, "fa4"):
        raise ValueError(f"attention backend must be one of {NAMES}, got {name!r}")
    backend = cast(Backend, name)
    if backend in ("auto", "flash"):  # device queries only here: concrete backends stay traceable
        half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        hopper = half and cudnn_preferred(device)
        if backend == "auto" and hopper:
            backend = "fa4" if fa4_works(device) else "cudnn"
        elif backend == "auto":
            backend = "flash" if half and flash_available() else "sdpa"
        elif hopper and fa4_works(device):
            backend = "fa4"
    if backend not in _logged:
        _logged.add(backend)
        logger.info("attention backend: %s", _describe(backend))
    return backend


def resolve_backend(backend: str, q: Tensor) -> Backend:
    """`resolve` for tensors like q."""
    return resolve(backend, q.device, q.dtype)


def pick(name: str, device: torch.device, dtype: torch.dtype, *, long_keys: bool) -> Kernel:
    """The kernel `name` means on `device` for `dtype` ("auto" and "flash" resolved here, once).

    `long_keys`: the keys are a token sequence (self-attention, the speaker map), where "fa4" runs
    FlashAttention 4 from `FA4_MIN_KEYS` keys on and cuDNN below; for the cross-attention (at most
    769 keys) "fa4" is cuDNN.
    """
    backend = resolve(name, device, dtype)
    return _cudnn if backend == "fa4" and not long_keys else KERNELS[backend]


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto") -> Tensor:
    """softmax(q kᵀ / √Dh) v per head. q [B, Lq, N, Dh], k/v [B, Lk, N, Dh] -> [B, Lq, N, Dh].

    `backend` is resolved from q on every call (the DiT calls the kernel `pick` gave it instead).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention expects q [B,Lq,N,D], k/v [B,Lk,N,D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    return pick(backend, q.device, q.dtype, long_keys=True)(q, k, v)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`torch.nn.functional.scaled_dot_product_attention` in the [B, L, N, Dh] layout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, Lq, N, Dh]


def _fa4_routed(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """FlashAttention 4 from `FA4_MIN_KEYS` keys on; cuDNN (faster there) for shorter key sequences."""
    return fa4_attention(q, k, v) if k.shape[1] >= FA4_MIN_KEYS else _cudnn(q, k, v)


def _cudnn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"cudnn attention needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _describe(backend: str) -> str:
    if backend == "fa4":
        return f"fa4 (FlashAttention 4 for >= {FA4_MIN_KEYS} keys, cuDNN below)"
    if backend == "flash":
        return (
            "flash (FlashAttention 3)"
            if _module_available("flash_attn_interface")
            else "flash (FlashAttention 2)"
        )
    return backend


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash attention needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    if _module_available("flash_attn_interface"):
        import flash_attn_interface

        out = flash_attn_interface.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    import flash_attn

    if not hasattr(flash_attn, "flash_attn_func"):
        raise ValueError(
            "flash attention: no FlashAttention 2/3 installed (flash_attn has no flash_attn_func)"
        )
    return flash_attn.flash_attn_func(q, k, v)


@torch.library.custom_op("infinitetalk::fa4_attention", mutates_args=())
def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """FlashAttention 4: q [B, Lq, N, Dh], k/v [B, Lk, N, Dh] (CUDA fp16/bf16) -> [B, Lq, N, Dh]."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"FlashAttention 4 needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous())
    out = out[0] if isinstance(out, tuple) else out
    return out.contiguous()


@fa4_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


#: every concrete kernel by name ("auto" and "flash" resolve to one of these in `resolve`)
KERNELS: dict[str, Kernel] = {
    "sdpa": sdpa,
    "cudnn": _cudnn,
    "flash": _flash,
    "fa4": _fa4_routed,
    "fp8": attention_fp8,
}
