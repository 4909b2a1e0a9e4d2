"""Probe the self-attention kernels of a DiT forward on this GPU: speed and accuracy.

    PYTHONPATH=. python3 tools/probe_attention.py [--sizes 480,720] [--json OUT]

For the 480p (32 760 tokens) and 720p (75 600) self-attention of one chunk, 40 heads x 128:
torch's cuDNN SDPA (what the bf16 path runs), every cuDNN bf16 plan through the frontend, and
the fp8 path (`pipeline.models.attention_fp8`: kernel alone, and with the quantisation, eager
and compiled); accuracy of each against fp32 attention on 512 sampled queries, on random
inputs shaped like the DiT's (plain normal; "peaked": q·3 and a shared key offset). Also the
FFN's first GEMM with its tanh-GELU in the cuBLASLt epilogue against GEMM + compiled GELU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM = 40, 128
TOKENS = {"480": 32760, "720": 75600}


def timed(fn: Callable[[], Any], warmup: int = 2, repeats: int = 6) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def tflops(ms: float, seq: int) -> float:
    return 4 * seq * seq * HEADS * HEAD_DIM / (ms * 1e-3) / 1e12


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp32 attention for the sampled query rows: [B, R, N, Dh]."""
    out = []
    for h in range(q.shape[2]):
        qh = q[0, rows, h].float()  # [R, Dh]
        kh, vh = k[0, :, h].float(), v[0, :, h].float()
        p = torch.softmax(qh @ kh.t() / math.sqrt(q.shape[-1]), dim=-1)
        out.append(p @ vh)
    return torch.stack(out, dim=1)[None]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def torch_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)


def bf16_sdpa_graph(shape: torch.Size) -> Any:
    """The cuDNN frontend graph of a bf16 SDPA on [B, L, N, Dh] tensors (uids 1-3 q, k, v; 4 the
    output), validated and with its operation graph built."""
    import cudnn

    b, seq, n, d = shape
    graph = cudnn.pygraph(
        io_data_type=cudnn.data_type.BFLOAT16,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
    )
    stride = (seq * n * d, d, n * d, 1)
    tq, tk, tv = (
        graph.tensor(uid=u, dim=(b, n, seq, d), stride=stride, data_type=cudnn.data_type.BFLOAT16)
        for u in (1, 2, 3)
    )
    o, _ = graph.sdpa(q=tq, k=tk, v=tv, is_inference=True, attn_scale=d**-0.5, use_causal_mask=False)
    o.set_uid(4).set_output(True).set_dim((b, n, seq, d)).set_stride(stride).set_data_type(
        cudnn.data_type.BFLOAT16
    )
    graph.validate()
    graph.build_operation_graph()
    return graph


def frontend_bf16_plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[dict[str, Any]]:
    """Every cuDNN bf16 SDPA plan the frontend can build for this shape, timed."""
    import cudnn

    from pipeline.models.attention_fp8 import _handle

    graph = bf16_sdpa_graph(q.shape)
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    out = torch.empty_like(q)
    results = []
    for index in range(graph.get_execution_plan_count()):
        try:
            ws = torch.empty(
                max(int(graph.get_workspace_size_plan_at_index(index)), 1), dtype=torch.uint8, device=q.device
            )

            def run(index: int = index, ws: torch.Tensor = ws) -> None:
                graph.execute_plan_at_index({1: q, 2: k, 3: v, 4: out}, ws, index, handle=_handle(q.device))

            ms = timed(run)
            results.append(
                {"plan": index, "name": graph.get_plan_name_at_index(index), "ms": ms, "out": out.clone()}
            )
        except Exception as exc:  # a plan that cannot run here
            results.append({"plan": index, "error": repr(exc)[:200]})
    return results


def knob_sweep(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[dict[str, Any]]:
    """Every KERNEL_CFG value of every cuDNN engine for the bf16 SDPA graph, timed."""
    import cudnn

    from pipeline.models.attention_fp8 import _handle

    seq = q.shape[1]

    def make() -> Any:
        graph = bf16_sdpa_graph(q.shape)
        graph._lower_backend_graph()  # the C++ graph (python engines keep it lazy)
        return graph._lowered_graph

    from cudnn._handle import to_backend_handle

    graph = make()
    results: list[dict[str, Any]] = []
    configs: list[tuple[int, dict[Any, int]]] = []
    for engine in range(graph.get_engine_count()):
        try:
            knobs = graph.get_knobs_for_engine(engine)
        except Exception as exc:
            results.append({"engine": engine, "knobs_error": repr(exc)[:120]})
            continue
        results.append({"engine": engine, "knobs": [repr(kb) for kb in knobs]})
        for kb in knobs:
            if kb.type == cudnn.knob_type.KERNEL_CFG:
                for value in range(kb.min_value, kb.max_value + 1, max(kb.stride, 1)):
                    configs.append((engine, {cudnn.knob_type.KERNEL_CFG: value}))
    out = torch.empty_like(q)
    for engine, knob in configs:
        try:
            g = make()
            g.create_execution_plan(engine, knob)
            g.check_support()
            g.build_plans()
            ws = torch.empty(max(int(g.get_workspace_size()), 1), dtype=torch.uint8, device=q.device)
            pack = {1: q.data_ptr(), 2: k.data_ptr(), 3: v.data_ptr(), 4: out.data_ptr()}
            handle = to_backend_handle(_handle(q.device))

            def run(
                g: Any = g, ws: torch.Tensor = ws, pack: dict[int, int] = pack, handle: Any = handle
            ) -> None:
                g._execute(pack, ws.data_ptr(), handle, None, None, None)

            ms = timed(run, warmup=1, repeats=3)
            name = g.get_plan_name_at_index(0)
            err = rel(out.float(), torch_cudnn(q, k, v).float())
            results.append(
                {
                    "engine": engine,
                    "cfg": list(knob.values())[0],
                    "name": name,
                    "ms": ms,
                    "tflops": tflops(ms, seq),
                    "err_vs_torch": err,
                }
            )
        except Exception as exc:
            results.append({"engine": engine, "cfg": list(knob.values())[0], "error": repr(exc)[:100]})
    return results


@dataclass(frozen=True)
class Sample:
    """One random attention input [1, seq, N, Dh] (bf16) and what a kernel is measured against:
    fp32 attention (`ref`) of the sampled query `rows`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rows: torch.Tensor
    ref: torch.Tensor
    seq: int

    def rel_err(self, out: torch.Tensor) -> float:
        """`out`'s sampled rows against the fp32 reference."""
        return rel(out[:, self.rows], self.ref)


def guarded(key: str, probe: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The results `probe` writes into a fresh dict; when it raises, the traceback's tail under
    `key` beside what it wrote before."""
    res: dict[str, Any] = {}
    try:
        probe(res)
    except Exception:
        res[key] = {"error": traceback.format_exc()[-1500:]}
    return res


def fp8_case(s: Sample) -> dict[str, Any]:
    """The fp8 path on one input: kernel alone (centred and uncentred k), eager and compiled."""
    from pipeline.models import attention_fp8 as fa

    q, k, v = s.q, s.k, s.v

    def probe(res: dict[str, Any]) -> None:
        q8, dq = fa.quantize_per_tensor(q)
        ks = k - k.float().mean(dim=1, keepdim=True).to(k.dtype)
        k8, dk = fa.quantize_per_tensor(ks)
        v8, dv = fa.quantize_per_tensor(v)
        ms = timed(lambda: fa.cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv))
        res["fp8_kernel"] = {"ms": ms, "tflops": tflops(ms, s.seq)}
        k8n, dkn = fa.quantize_per_tensor(k)
        res["fp8_kernel"]["rel_err"] = s.rel_err(fa.cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv).float() * dv)
        unsmoothed = fa.cudnn_fp8_sdpa(q8, k8n, v8, dq, dkn, dv).float() * dv
        res["fp8_kernel"]["rel_err_unsmoothed_k"] = s.rel_err(unsmoothed)
        ms = timed(lambda: fa.attention_fp8(q, k, v))
        res["fp8_eager"] = {"ms": ms, "rel_err": s.rel_err(fa.attention_fp8(q, k, v))}
        compiled = torch.compile(fa.attention_fp8, dynamic=False, fullgraph=True)
        out = compiled(q, k, v)
        ms = timed(lambda: compiled(q, k, v))
        res["fp8_compiled"] = {"ms": ms, "tflops": tflops(ms, s.seq), "rel_err": s.rel_err(out)}

    return guarded("fp8", probe)


def fa4_case(s: Sample) -> dict[str, Any]:
    """FlashAttention 4 (`flash_attn.cute`, CuTe DSL; its SM90 forward on Hopper), bf16."""
    import time

    def probe(res: dict[str, Any]) -> None:
        from flash_attn.cute import flash_attn_func

        def run() -> torch.Tensor:
            out = flash_attn_func(s.q, s.k, s.v)
            return out[0] if isinstance(out, tuple) else out

        t0 = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ms = timed(run)
        res["fa4_bf16"] = {"ms": ms, "tflops": tflops(ms, s.seq), "rel_err": s.rel_err(out), "first_s": first}

    return guarded("fa4_bf16", probe)


def probe_size(
    size: str,
    report: dict[str, Any],
    frontend_plans: bool = True,
    knobs: bool = False,
    fp8: bool = True,
    fa4: bool = False,
) -> None:

    seq = TOKENS[size]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = torch.randperm(seq, device="cuda", generator=gen)[:512]
    cases: dict[str, Any] = {}
    for case in ("normal", "peaked"):
        q = torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
        k = torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
        v = torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
        if case == "peaked":
            q = q * 3
            offset = 2 * torch.randn(
                1, 1, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16
            )
            k = k + offset
        ref = reference(q, k, v, rows)
        res: dict[str, Any] = {}
        try:
            ms = timed(lambda q=q, k=k, v=v: torch_cudnn(q, k, v))
            res["torch_cudnn_bf16"] = {
                "ms": ms,
                "tflops": tflops(ms, seq),
                "rel_err": rel(torch_cudnn(q, k, v)[:, rows], ref),
            }
        except Exception:
            res["torch_cudnn_bf16"] = {"error": traceback.format_exc()[-600:]}
        if case == "normal" and knobs:
            try:
                res["knob_sweep"] = knob_sweep(q, k, v)
            except Exception:
                res["knob_sweep"] = [{"error": traceback.format_exc()[-600:]}]
        if case == "normal" and frontend_plans:
            try:
                plans = frontend_bf16_plans(q, k, v)
                res["frontend_bf16_plans"] = [
                    {key: val for key, val in p.items() if key != "out"}
                    | (
                        {"tflops": tflops(p["ms"], seq), "rel_err": rel(p["out"][:, rows], ref)}
                        if "ms" in p
                        else {}
                    )
                    for p in plans
                ]
            except Exception:
                res["frontend_bf16_plans"] = {"error": traceback.format_exc()[-600:]}
        sample = Sample(q, k, v, rows, ref, seq)
        res |= fp8_case(sample) if fp8 else {}
        if fa4:
            res |= fa4_case(sample)
        cases[case] = res
        print(size, case, json.dumps(res, indent=1), flush=True)
    report[size] = cases


def probe_gelu(report: dict[str, Any]) -> None:
    m, kdim, ndim = 32760, 5120, 13824
    x = torch.randn(m, kdim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(ndim, kdim, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(ndim, device="cuda", dtype=torch.bfloat16) * 0.02

    def plain() -> torch.Tensor:
        return F.gelu(F.linear(x, w, bias), approximate="tanh")

    compiled = torch.compile(plain)
    fused_ms = timed(lambda: torch._addmm_activation(bias, x, w.t(), use_gelu=True))
    res = {
        "linear_only_ms": timed(lambda: F.linear(x, w, bias)),
        "linear_gelu_compiled_ms": timed(compiled),
        "addmm_gelu_epilogue_ms": fused_ms,
        "rel_err_epilogue": rel(torch._addmm_activation(bias, x, w.t(), use_gelu=True), plain()),
    }
    print("gelu", json.dumps(res), flush=True)
    report["ffn_up_gelu"] = res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="480,720")
    parser.add_argument("--json", default=None)
    parser.add_argument("--knobs", action="store_true", help="time every cuDNN kernel config (bf16)")
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--fa4", action="store_true", help="also time FlashAttention 4 (flash-attn-4)")
    parser.add_argument("--no-plans", action="store_true", help="skip timing every cuDNN bf16 plan")
    args = parser.parse_args(argv)
    from pipeline.models import attention_fp8 as fa

    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "fp8_unavailable": fa.unavailable_reason(),
    }
    try:
        import cudnn

        report["frontend"] = getattr(cudnn, "__version__", "?")
        report["cudnn_backend"] = cudnn.backend_version()
    except Exception as exc:
        report["frontend"] = repr(exc)
    print(json.dumps(report), flush=True)
    for size in args.sizes.split(","):
        probe_size(
            size,
            report,
            frontend_plans=not args.no_plans,
            knobs=args.knobs,
            fp8=not args.skip_fp8,
            fa4=args.fa4,
        )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
    try:
        probe_gelu(report)
    except Exception:
        report["ffn_up_gelu"] = {"error": traceback.format_exc()[-600:]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
