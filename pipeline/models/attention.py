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
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

Backend = Literal["auto", "sdpa", "cudnn", "flash", "fa4"]
#: the settings a user picks from ("fa4" is what "auto"/"flash" become where FlashAttention 4 runs)
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "cudnn", "flash")
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


def error_on_small_input(kernel: Callable[[Tensor, Tensor, Tensor], Tensor], device: torch.device) -> float:
    """Relative error of `kernel` against fp32 SDPA on one small random bf16 attention
    (q, k, v [1, 256, 2, 128]): the test run an optional kernel passes before it is used."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(1, 256, 2, 128, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    with torch.no_grad():
        out = kernel(q, k, v).float()
        ref = attention(q.float(), k.float(), v.float(), backend="sdpa")
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


def resolve_backend(backend: Backend, q: Tensor) -> Backend:
    """The concrete kernel for `backend` and tensors like q: sdpa, cudnn, flash (2/3) or fa4."""
    if backend not in (*BACKENDS, "fa4"):
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("auto", "flash"):  # device queries only here: concrete backends stay traceable
        half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        hopper = half and cudnn_preferred(q.device)
        if backend == "auto" and hopper:
            backend = "fa4" if fa4_works(q.device) else "cudnn"
        elif backend == "auto":
            backend = "flash" if half and flash_available() else "sdpa"
        elif hopper and fa4_works(q.device):
            backend = "fa4"
    if backend not in _logged:
        _logged.add(backend)
        logger.info("attention backend: %s", _describe(backend))
    return backend


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: Backend = "auto") -> Tensor:
    """softmax(q kᵀ / √Dh) v per head. q [B, Lq, N, Dh], k/v [B, Lk, N, Dh] -> [B, Lq, N, Dh]."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention expects q [B,Lq,N,D], k/v [B,Lk,N,D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    chosen = resolve_backend(backend, q)
    if chosen == "fa4":
        if k.shape[1] >= FA4_MIN_KEYS:
            return fa4_attention(q, k, v)
        chosen = "cudnn"  # short key sequences: cuDNN is faster there
    if chosen == "flash":
        return _flash(q, k, v)
    if chosen == "cudnn":
        return _cudnn(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, Lq, N, Dh]


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
