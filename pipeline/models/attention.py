"""The one place that picks the attention kernel.

Layout everywhere in the DiT: q [B, Lq, N, Dh], k and v [B, Lk, N, Dh] -> out [B, Lq, N, Dh].
No masks: the InfiniteTalk DiT attends over full sequences (one sample per batch entry, no
padding on one GPU), so a kernel never needs one.

Backends:
- "sdpa": `torch.nn.functional.scaled_dot_product_attention` (default; CPU and CUDA; PyTorch picks
  its flash / memory-efficient / cuDNN kernel on CUDA);
- "cudnn": SDPA restricted to its cuDNN kernel (CUDA fp16/bf16; FA3-class on Hopper: 37 ms vs
  62 ms for FA2 on a 480p self-attention, docs/benchmarks.md);
- "flash": the `flash_attn` package (FlashAttention 3 `flash_attn_interface` if importable, else 2),
  CUDA and fp16/bf16 only;
- "auto": on CUDA fp16/bf16, "cudnn" on Hopper and newer (compute capability >= 9.0) when cuDNN
  is available, else "flash" when it is installed, else "sdpa"; "sdpa" elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

Backend = Literal["auto", "sdpa", "cudnn", "flash"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "cudnn", "flash")

_logged: set[str] = set()


def flash_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("flash_attn_interface", "flash_attn"))


def cudnn_preferred(device: torch.device) -> bool:
    """True where cuDNN SDPA is the fastest exact kernel torch offers (Hopper and newer)."""
    if device.type != "cuda" or not torch.backends.cudnn.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def resolve_backend(backend: Backend, q: Tensor) -> Backend:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if half and cudnn_preferred(q.device):
            backend = "cudnn"
        else:
            backend = "flash" if half and flash_available() else "sdpa"
    if backend not in _logged:
        _logged.add(backend)
        logger.info("attention backend: %s", backend)
    return backend


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: Backend = "auto") -> Tensor:
    """softmax(q kᵀ / √Dh) v per head. q [B, Lq, N, Dh], k/v [B, Lk, N, Dh] -> [B, Lq, N, Dh]."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention expects q [B,Lq,N,D], k/v [B,Lk,N,D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    chosen = resolve_backend(backend, q)
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


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash attention needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    if importlib.util.find_spec("flash_attn_interface") is not None:
        import flash_attn_interface

        out = flash_attn_interface.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    import flash_attn

    return flash_attn.flash_attn_func(q, k, v)
