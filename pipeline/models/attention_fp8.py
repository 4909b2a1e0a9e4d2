"""fp8 self-attention on Hopper: cuDNN's fused fp8 flash attention (package `nvidia-cudnn-frontend`).

Shapes: q, k, v [B, L, N, Dh] bf16 -> out [B, L, N, Dh] bf16 (the layout of
`pipeline.models.attention`).

Self-attention is half of a 480p DiT forward (docs/benchmarks.md). With bf16 inputs the best
kernel torch offers on an H100 (cuDNN SDPA) runs at ~590 TFLOP/s; cuDNN's fp8 kernel multiplies
QKᵀ and PV on the fp8 tensor cores. Steps, all on the GPU (no host sync):

1. k and v are centred per head and channel over the tokens. Both are exact: k - mean_L k
   subtracts q·mean(k), one constant per query row, which softmax ignores; the rows of P sum
   to 1, so P·v = P·(v - mean_L v) + mean_L v (the mean is added back in bf16). It removes the
   offset the tokens share, so the fp8 grid spends its range on what differs between them.
2. q, k and v are each quantised to e4m3 with one scale per tensor (amax / 448, computed on the
   GPU; the kernel takes the inverse scales as device tensors).
3. The kernel keeps the softmax in fp32; the probabilities P (in [0, 1] after the running-max
   shift) are quantised to e4m3 with the fixed scale `P_SCALE` before the PV product. On Hopper
   cuDNN writes the output in e4m3 only (bf16 output is Blackwell-only): its scale is v's,
   which is safe because every output row is a convex combination of rows of v (|o| <= amax|v|).
   The output is dequantised to bf16 on the way to the `o` projection (fused by the compiler).

The cuDNN call is a `torch.library` custom op, so a compiled DiT block keeps one graph (the
quantisation fuses into the kernels around it). Built cuDNN graphs are cached per shape and
device. Only the `nvidia-cudnn-frontend` package is needed on top of torch; it loads the cuDNN
library torch ships. `available()` says whether this machine can run it (CUDA, compute
capability >= 9.0, cuDNN >= 9.14, the package importable).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.quant import FP8, FP8_MAX  # e4m3 and its largest value, 448

logger = logging.getLogger(__name__)

#: fixed scale of the softmax probabilities before their fp8 cast (P <= 1, so P·256 <= 256 < 448)
P_SCALE = 256.0
#: the cuDNN release that added fp8 SDPA forward on Hopper with these options
MIN_CUDNN = 91400
PACKAGE = "nvidia-cudnn-frontend"

_UID_Q, _UID_K, _UID_V, _UID_O = 1, 2, 3, 4
_UID_DQ, _UID_DK, _UID_DV, _UID_DS, _UID_SS, _UID_SO = 5, 6, 7, 8, 9, 10
_UID_AMAX_S, _UID_AMAX_O = 11, 12


def package_installed() -> bool:
    return importlib.util.find_spec("cudnn") is not None


def unavailable_reason(device: torch.device | str | None = None, *, test_run: bool = False) -> str | None:
    """Why fp8 attention cannot run on `device` (None when it can). With `test_run`, a small
    attention is also run and checked once per device (a cuDNN that declines the graph, or a
    broken install, is reported here rather than in every render)."""
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return f"fp8 attention needs a CUDA device, got {dev}"
    cap = torch.cuda.get_device_capability(dev)
    if cap[0] < 9:
        return f"fp8 attention needs compute capability >= 9.0 (Hopper), got {cap[0]}.{cap[1]}"
    version = torch.backends.cudnn.version() or 0
    if version < MIN_CUDNN:
        return f"fp8 attention needs cuDNN >= 9.14 (torch has {version})"
    if not package_installed():
        return f"fp8 attention needs the {PACKAGE} package (pip install {PACKAGE})"
    if test_run:
        key = str(dev)
        if key not in _tested:
            _tested[key] = try_run(dev)
        return _tested[key]
    return None


_tested: dict[str, str | None] = {}


def try_run(device: torch.device) -> str | None:
    """Run one small fp8 attention on `device` against fp32 attention: None, or what went wrong."""
    from pipeline.models.attention import error_on_small_input

    try:
        err = error_on_small_input(attention_fp8, device)
        if not err < 0.15:
            return f"fp8 attention test run on {device}: relative error {err:.3g} against fp32 attention"
        return None
    except Exception as exc:
        return f"fp8 attention failed a test run on {device}: {type(exc).__name__}: {exc}"


def available(device: torch.device | str | None = None) -> bool:
    return unavailable_reason(device) is None


def quantize_per_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (any float) -> (e4m3 x·s, 1/s as fp32 [1, 1, 1, 1]) with s = 448 / amax(|x|)."""
    amax = x.abs().amax().float().clamp(min=1e-6)
    scale = FP8_MAX / amax
    data = (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return data, (1.0 / scale).reshape(1, 1, 1, 1)


def attention_fp8(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √Dh) v with fp8 products. q [B, Lq, N, Dh], k/v [B, Lk, N, Dh] -> bf16 [B, Lq, N, Dh]."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention expects q [B,Lq,N,D], k/v [B,Lk,N,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    k = k.float() - k.float().mean(dim=1, keepdim=True)
    v_mean = v.float().mean(dim=1, keepdim=True)  # [B, 1, N, Dh]
    q8, dq = quantize_per_tensor(q)
    k8, dk = quantize_per_tensor(k)
    v8, dv = quantize_per_tensor(v.float() - v_mean)
    o8 = cudnn_fp8_sdpa(q8.contiguous(), k8.contiguous(), v8.contiguous(), dq, dk, dv)
    return (o8.float() * dv + v_mean).to(torch.bfloat16)


@torch.library.custom_op("infinitetalk::cudnn_fp8_sdpa", mutates_args=())
def cudnn_fp8_sdpa(
    q: Tensor, k: Tensor, v: Tensor, descale_q: Tensor, descale_k: Tensor, descale_v: Tensor
) -> Tensor:
    """cuDNN fp8 flash attention: e4m3 q [B, Lq, N, Dh], k/v [B, Lk, N, Dh] (contiguous), fp32
    inverse scales [1, 1, 1, 1] -> e4m3 [B, Lq, N, Dh] on v's scale (times `descale_v` is o)."""
    return run_cudnn(q, k, v, descale_q, descale_k, descale_v)


def run_cudnn(
    q: Tensor, k: Tensor, v: Tensor, descale_q: Tensor, descale_k: Tensor, descale_v: Tensor
) -> Tensor:
    """The body of `cudnn_fp8_sdpa` (CUDA): checks the inputs, runs the cached cuDNN graph."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != FP8 or not t.is_cuda or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous CUDA float8_e4m3fn tensor, got {t.dtype} {t.device}"
            )
    out = torch.empty(q.shape, dtype=FP8, device=q.device)
    _graph_for(q, k).run(q, k, v, descale_q, descale_k, descale_v, out)
    return out


@cudnn_fp8_sdpa.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, descale_q: Tensor, descale_k: Tensor, descale_v: Tensor) -> Tensor:
    return torch.empty(q.shape, dtype=FP8, device=q.device)


@dataclass(frozen=True, slots=True)
class _Key:
    b: int
    lq: int
    lk: int
    heads: int
    head_dim: int
    device: int


class _Graph:
    """One built cuDNN fp8 SDPA graph (fixed shape), with its constants and workspace size."""

    def __init__(self, key: _Key) -> None:
        import cudnn

        self.key = key
        b, lq, lk, n, d = key.b, key.lq, key.lk, key.heads, key.head_dim
        graph = cudnn.pygraph(
            io_data_type=cudnn.data_type.FP8_E4M3,
            intermediate_data_type=cudnn.data_type.FLOAT,
            compute_data_type=cudnn.data_type.FLOAT,
        )

        def bshd(uid: int, seq: int) -> Any:  # [B, L, N, Dh] memory seen as (b, h, s, d)
            return graph.tensor(
                uid=uid,
                dim=(b, n, seq, d),
                stride=(seq * n * d, d, n * d, 1),
                data_type=cudnn.data_type.FP8_E4M3,
            )

        def scalar(uid: int) -> Any:
            return graph.tensor(
                uid=uid, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT
            )

        o, _stats, amax_s, amax_o = graph.sdpa_fp8(
            q=bshd(_UID_Q, lq),
            k=bshd(_UID_K, lk),
            v=bshd(_UID_V, lk),
            descale_q=scalar(_UID_DQ),
            descale_k=scalar(_UID_DK),
            descale_v=scalar(_UID_DV),
            descale_s=scalar(_UID_DS),
            scale_s=scalar(_UID_SS),
            scale_o=scalar(_UID_SO),
            is_inference=True,
            attn_scale=d**-0.5,
            use_causal_mask=False,
        )
        o.set_uid(_UID_O).set_output(True).set_dim((b, n, lq, d)).set_stride((lq * n * d, d, n * d, 1))
        o.set_data_type(cudnn.data_type.FP8_E4M3)
        for uid, t in ((_UID_AMAX_S, amax_s), (_UID_AMAX_O, amax_o)):
            t.set_uid(uid).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1))
            t.set_data_type(cudnn.data_type.FLOAT)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = int(graph.get_workspace_size())
        dev = torch.device("cuda", key.device)
        self.consts = {
            _UID_DS: torch.full((1, 1, 1, 1), 1.0 / P_SCALE, dtype=torch.float32, device=dev),
            _UID_SS: torch.full((1, 1, 1, 1), P_SCALE, dtype=torch.float32, device=dev),
        }

    def run(self, q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, out: Tensor) -> None:
        amax = torch.empty(2, dtype=torch.float32, device=q.device)
        workspace = torch.empty(max(self.workspace, 1), dtype=torch.uint8, device=q.device)
        pack = {
            _UID_Q: q,
            _UID_K: k,
            _UID_V: v,
            _UID_O: out,
            _UID_DQ: dq.float().contiguous(),
            _UID_DK: dk.float().contiguous(),
            _UID_DV: dv.float().contiguous(),
            _UID_SO: (1.0 / dv.float()).contiguous(),  # o on v's scale: |o| <= amax|v|
            _UID_AMAX_S: amax[0:1],
            _UID_AMAX_O: amax[1:2],
            **self.consts,
        }
        self.graph.execute(pack, workspace, handle=_handle(q.device))


_graphs: dict[_Key, _Graph] = {}
_handles: dict[tuple[int, int], Any] = {}
_lock = threading.Lock()


def _graph_for(q: Tensor, k: Tensor) -> _Graph:
    b, lq, n, d = q.shape
    key = _Key(b, lq, k.shape[1], n, d, q.device.index or 0)
    graph = _graphs.get(key)
    if graph is None:
        with _lock:
            graph = _graphs.get(key)
            if graph is None:
                graph = _Graph(key)
                _graphs[key] = graph
                logger.info("fp8 attention: cuDNN graph built for %s (workspace %d B)", key, graph.workspace)
    return graph


def _handle(device: torch.device) -> Any:
    """A cuDNN handle per (thread, device), bound to torch's current stream."""
    import cudnn

    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (threading.get_ident(), index)
    handle = _handles.get(key)
    if handle is None:
        with torch.cuda.device(index):
            handle = cudnn.create_handle()
        _handles[key] = handle
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(index).cuda_stream)
    return handle


__all__ = ["attention_fp8", "available", "cudnn_fp8_sdpa", "quantize_per_tensor", "unavailable_reason"]
