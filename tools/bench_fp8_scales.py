"""Issue 21 measurements on one GPU: fp8 GEMM scalings, and the fp32 VAE's memory peak.

    PYTHONPATH=. python3 tools/bench_fp8_scales.py --out DIR [--parts gemm,forward,vae,requant]
                                                   [--deadline-s 280] [--smoke]

Parts (each writes DIR/h200-fp8-scales.json again when it ends, so a cut-off run keeps what it
measured; the log goes to stdout):

gemm     `torch._scaled_mm` on the DiT's GEMM shapes (32 760 and 75 600 tokens x 5120 -> 5120,
         5120 -> 13 824, 13 824 -> 5120): bf16 `F.linear`, row-wise fp8 (today), tensor-wise fp8
         with the weight's row scales applied after the GEMM (`fp8_scaling = "tensor"`), and
         tensor-wise fp8 with the weight re-quantised per tensor (bias in the epilogue); kernel
         time (CUDA events, median) and each variant's error against the fp32 product of the bf16
         inputs, on iid inputs and on rows whose norms spread over a log-normal (sigma 1).
forward  the full-size DiT (random N(0, 0.02) weights, one speaker, 480p, 81 frames): the plain
         path once (the reference's numerics, the error reference), then the fast fp8 path
         (compiled, `pipeline.perf.PerfConfig(fp8=True, fp8_scaling=...)`) with row and tensor
         scaling, each timed twice (row, tensor, row, tensor) and profiled once by kernel kind.
requant  the same forward with the weights re-quantised per tensor and the bias in the GEMM
         epilogue (an experiment, not a product mode: the released fp8 file has row scales).
vae      the fp32 VAE decode of a 480p chunk in fresh processes (cuDNN's algorithm search is per
         process): cudnn.benchmark on (today), off, on with all but ~32 GiB of the card taken
         (as free as an 80 GB card with the stack resident), on with cuDNN's workspace cap
         `CUDNN_CONV_WSCAP_DBG`, and bf16 channels-last (the default) for comparison; peak allocated
         memory above the VAE's weights in the first call (the algorithm search) and after.

`--smoke` runs every part on the CPU with small shapes (a check of this script, no timings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

GiB = 1024**3
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def timed(fn: Any, device: torch.device, warmup: int = 3, repeats: int = 15) -> float:
    """Median seconds of `fn()` (CUDA events on a GPU; host clock elsewhere)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2]


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.float()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# gemm


def quant_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    from pipeline.quant import FP8, FP8_MAX

    x2 = x.float()
    s = (x2.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x2 / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def quant_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    from pipeline.quant import FP8, FP8_MAX

    x2 = x.float()
    s = (x2.abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (x2 / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


@torch.no_grad()
def gemm_shape(
    dev: torch.device, g: torch.Generator, m: int, k: int, n: int, *, errors: bool, smoke: bool
) -> dict[str, Any]:
    """Kernel times of one GEMM shape, and (`errors`) each variant's error."""
    from pipeline.quant import Fp8Linear, quantize_fp8

    one = torch.ones((), dtype=torch.float32, device=dev)
    x = torch.randn(m, k, generator=g, device=dev).bfloat16()
    w = (torch.randn(n, k, generator=g, device=dev) * 0.02).bfloat16()
    bias = (torch.randn(n, generator=g, device=dev) * 0.02).bfloat16()
    w8, ws = quantize_fp8(w)
    wsf = ws.float().t().contiguous()
    amax = w.float().abs().amax()
    wt_s = (amax / 448.0).clamp(min=1e-12)
    wt8 = (w.float() / wt_s).clamp(-448, 448).to(w8.dtype)
    xr8, xrs = quant_rows(x)
    xt8, xts = quant_tensor(x)
    flops = 2.0 * m * k * n
    entry: dict[str, Any] = {}
    fns = {
        "bf16": lambda: F.linear(x, w, bias),
        "row": lambda: torch._scaled_mm(
            xr8, w8.t(), scale_a=xrs, scale_b=wsf, bias=bias, out_dtype=torch.bfloat16
        ),
        "tensor_gemm": lambda: torch._scaled_mm(
            xt8, w8.t(), scale_a=xts, scale_b=one, out_dtype=torch.bfloat16
        ),
        "tensor_requant": lambda: torch._scaled_mm(
            xt8, wt8.t(), scale_a=xts, scale_b=wt_s, bias=bias, out_dtype=torch.bfloat16
        ),
    }
    for name, fn in fns.items():
        s = timed(fn, dev, warmup=1 if smoke else 3, repeats=3 if smoke else 15)
        entry[f"{name}_ms"] = round(s * 1e3, 4)
        entry[f"{name}_tflops"] = round(flops / s / 1e12, 1)
    y = fns["tensor_gemm"]()
    ws_row = ws.t()
    entry["fold_epilogue_eager_ms"] = round(
        timed(lambda: y * ws_row + bias, dev, warmup=1, repeats=3 if smoke else 10) * 1e3, 4
    )
    if errors:  # on the first token count (the 480p chunk)
        layer = Fp8Linear(w8, ws, bias, compute_dtype=torch.bfloat16)
        layer.use_scaled_mm = True
        lognormal = torch.exp(torch.randn(m, 1, generator=g, device=dev))
        for label, inp in (("iid", x), ("rows_lognormal", (x.float() * lognormal).bfloat16())):
            ref = inp.float() @ w.float().t() + bias.float()
            errs = {"bf16": rel(F.linear(inp, w, bias), ref)}
            for scaling in ("row", "tensor"):
                layer.scaling = scaling  # type: ignore[assignment]
                errs[scaling] = rel(layer._scaled_mm(inp), ref)
            t8, ts = quant_tensor(inp)
            errs["tensor_requant"] = rel(
                torch._scaled_mm(t8, wt8.t(), scale_a=ts, scale_b=wt_s, bias=bias, out_dtype=torch.bfloat16),
                ref,
            )
            entry[f"rel_err_{label}"] = {k2: round(v, 5) for k2, v in errs.items()}
            del ref
    return entry


@torch.no_grad()
def part_gemm(dev: torch.device, smoke: bool) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    dims = [(5120, 5120), (5120, 13824), (13824, 5120)]
    tokens = [32760, 75600]
    if smoke:
        dims, tokens = [(64, 128), (128, 64)], [96]
    g = torch.Generator(device=dev).manual_seed(0)
    out: dict[str, Any] = {}
    for m in tokens:
        for k, n in dims:
            key = f"{m}x{k}->{n}"
            out[key] = gemm_shape(dev, g, m, k, n, errors=m == tokens[0], smoke=smoke)
            log(f"gemm {key}: {json.dumps(out[key])}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# forward


def profile_kinds(dit: Any, inputs: dict[str, Tensor]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from pipeline.bench import kernel_kind

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        dit(**inputs)
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        if "cuda" not in str(getattr(event, "device_type", "")).lower():
            continue
        t = float(getattr(event, "self_device_time_total", 0.0) or 0.0)
        if t > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + t / 1e6
    kinds: dict[str, float] = {}
    for name, t in kernels.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + t
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {
        "device_s": round(sum(kernels.values()), 4),
        "by_kind_s": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [[n[:110], round(t, 4)] for n, t in top],
    }


class Forward:
    def __init__(self, dev: torch.device, smoke: bool) -> None:
        from pipeline.bench import Shape, build_random_dit, dit_inputs
        from pipeline.config import DiTConfig

        self.dev, self.smoke = dev, smoke
        if smoke:
            from pipeline.tiny import tiny_dit_config

            self.cfg = tiny_dit_config(64, 32, 8, 2, 16)
            shape = Shape(name="tiny", height=64, width=64, frame_num=9)
            dtype = torch.float32
        else:
            self.cfg = DiTConfig()
            shape = Shape(name="480", height=480, width=832, frame_num=81)
            dtype = torch.bfloat16
        t = time.perf_counter()
        self.dit = build_random_dit(self.cfg, dev, dtype, 0)
        log(f"forward: DiT built in {time.perf_counter() - t:.1f} s")
        self.inputs = dit_inputs(self.cfg, shape, dev, dtype, 10)
        self.ref: Tensor | None = None

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def plain(self) -> dict[str, Any]:
        from pipeline.perf import PerfConfig, apply_dit_perf

        apply_dit_perf(PerfConfig.plain(), self.dit)
        self.sync()
        t = time.perf_counter()
        self.ref = self.dit(**self.inputs).float()
        self.sync()
        return {"plain_s_one_call": round(time.perf_counter() - t, 3)}

    @torch.no_grad()
    def run(self, scaling: str, repeats: int, warmup: int) -> dict[str, Any]:
        from pipeline.perf import PerfConfig, apply_dit_perf

        perf = PerfConfig(fp8=True, fp8_scaling=scaling, compile=not self.smoke)  # type: ignore[arg-type]
        applied = apply_dit_perf(perf, self.dit)
        if self.smoke:  # the CPU has _scaled_mm too: the same code path as on the GPU
            from pipeline.fp8 import set_scaled_mm

            set_scaled_mm(self.dit, True, scaling=scaling)
        return self.timed_forward(applied, repeats, warmup)

    def timed_forward(self, applied: dict[str, Any], repeats: int, warmup: int) -> dict[str, Any]:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.sync()
        t = time.perf_counter()
        out = self.dit(**self.inputs)
        self.sync()
        first = time.perf_counter() - t
        for _ in range(warmup - 1):
            self.dit(**self.inputs)
        s = timed(lambda: self.dit(**self.inputs), self.dev, warmup=0, repeats=repeats)
        out = self.dit(**self.inputs)
        assert self.ref is not None
        entry = {
            "settings": {k: v for k, v in applied.items() if k != "fp8_layers"},
            "median_s": round(s, 4),
            "first_call_s": round(first, 2),
            "rel_err_vs_plain": round(rel(out, self.ref), 5),
        }
        if self.dev.type == "cuda":
            entry["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(self.dev) / GiB, 2)
        return entry


def requantise_tensorwise(dit: Any) -> int:
    """Experiment: each fp8 layer's weight re-quantised with one scale, bias in the epilogue."""
    import types

    from pipeline.quant import FP8, FP8_MAX, Fp8Linear

    count = 0
    for module in dit.modules():
        if not isinstance(module, Fp8Linear):
            continue
        w = module.weight_fp8.float() * module.weight_scale.float()
        s = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
        module.weight_fp8 = (w / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        module.tensor_scale = s.reshape(())
        del w

        def forward(self: Any, x: Tensor) -> Tensor:
            shape = x.shape
            x8, xs = quant_tensor(x.reshape(-1, shape[-1]))
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            out = torch._scaled_mm(
                x8,
                self.weight_fp8.t(),
                scale_a=xs,
                scale_b=self.tensor_scale,
                bias=bias,
                out_dtype=self.compute_dtype,
            )
            return out.reshape(*shape[:-1], self.out_features)

        module.forward = types.MethodType(forward, module)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# vae (one variant per process)

VAE_VARIANTS = (
    "fp32_benchmark",
    "fp32_no_benchmark",
    "fp32_benchmark_32gib_free",
    "fp32_wscap_1gib",
    "bf16_benchmark",
)


@torch.no_grad()
def vae_child(variant: str, smoke: bool) -> dict[str, Any]:
    from pipeline.bench import build_random_vae
    from pipeline.models.vae import VAEConfig, vae_peak_bytes
    from pipeline.perf import PerfConfig, apply_vae_perf

    dev = torch.device("cpu" if smoke else "cuda")
    vae = build_random_vae(VAEConfig(), dev, 0)
    fast = variant.startswith("bf16")
    applied = apply_vae_perf(PerfConfig() if fast else PerfConfig.plain(), vae)
    if variant == "fp32_no_benchmark":
        torch.backends.cudnn.benchmark = False
    ballast = None
    if variant == "fp32_benchmark_32gib_free" and dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        ballast = torch.empty(max(0, free - 32 * GiB), dtype=torch.uint8, device=dev)
    latent = (2, 8, 8) if smoke else (21, 60, 104)
    g = torch.Generator(device=dev).manual_seed(20)
    z = torch.randn(16, *latent, generator=g, device=dev)
    if fast and dev.type == "cuda":
        z = z.bfloat16()
    entry: dict[str, Any] = {
        "variant": variant,
        "settings": applied,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "env_wscap": os.environ.get("CUDNN_CONV_WSCAP_DBG"),
        "estimate_gib": round(
            vae_peak_bytes(latent, dtype=torch.bfloat16 if fast else torch.float32) / GiB, 2
        ),
    }
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        entry["free_gib_at_start"] = round(torch.cuda.mem_get_info(dev)[0] / GiB, 1)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(3):
        t = time.perf_counter()
        out = vae.decode(z)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del out
        if cuda:
            peak = torch.cuda.max_memory_allocated(dev) - base
            entry[f"call{i + 1}_peak_above_weights_gib"] = round(peak / GiB, 2)
            entry[f"call{i + 1}_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / GiB, 2)
            torch.cuda.reset_peak_memory_stats(dev)
    entry["decode_s"] = [round(t, 3) for t in times]
    del ballast
    return entry


def part_vae(out_dir: Path, smoke: bool, deadline: float) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for variant in VAE_VARIANTS:
        if time.perf_counter() - T0 > deadline:
            res[variant] = "skipped (deadline)"
            continue
        env = dict(os.environ)
        if variant == "fp32_wscap_1gib":
            env["CUDNN_CONV_WSCAP_DBG"] = "1024"
        cmd = [sys.executable, __file__, "--vae-child", variant, "--out", str(out_dir)]
        if smoke:
            cmd.append("--smoke")
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VAE_RESULT ")]
        if proc.returncode == 0 and lines:
            res[variant] = json.loads(lines[-1].removeprefix("VAE_RESULT "))
        else:
            res[variant] = {"error": f"rc {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
        res[variant]["process_s"] = round(time.perf_counter() - t, 1)
        log(f"vae {variant}: {json.dumps(res[variant])}")
    return res


# ---------------------------------------------------------------------------------------------


def environment(dev: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / GiB, 1)}
        try:
            env["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except OSError as e:
            env["nvidia_smi"] = str(e)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="gemm,forward,vae,requant")
    ap.add_argument("--deadline-s", type=float, default=280.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--vae-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vae_child:
        print("VAE_RESULT " + json.dumps(vae_child(args.vae_child, args.smoke)), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.smoke else "cuda")
    parts = args.parts.split(",")
    report: dict[str, Any] = {"environment": environment(dev), "errors": {}}
    path = args.out / "h200-fp8-scales.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=1))

    def late(name: str) -> bool:
        if time.perf_counter() - T0 > args.deadline_s:
            report["errors"][name] = "skipped (deadline)"
            log(f"{name}: skipped (deadline)")
            return True
        return False

    log(f"environment: {report['environment']}")
    if "gemm" in parts and not late("gemm"):
        try:
            report["gemm"] = part_gemm(dev, args.smoke)
        except Exception as e:  # noqa: BLE001 - each part reports its own failure
            report["errors"]["gemm"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            log(report["errors"]["gemm"])
        save()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    fwd: Forward | None = None
    if "forward" in parts and not late("forward"):
        res: dict[str, Any] = {}
        report["forward"] = res
        try:
            fwd = Forward(dev, args.smoke)
            res["plain"] = fwd.plain()
            log(f"forward plain: {res['plain']}")
            save()
            reps = 2 if args.smoke else 3
            for i, scaling in enumerate(("row", "tensor", "row", "tensor")):
                if late(f"forward {scaling} {i}"):
                    break
                key = f"fp8_{scaling}" + ("" if i < 2 else "_again")
                res[key] = fwd.run(scaling, reps, warmup=2 if i < 2 else 1)
                log(f"forward {key}: {json.dumps(res[key])}")
                save()
            if dev.type == "cuda":
                for scaling in ("row", "tensor"):
                    if late(f"profile {scaling}"):
                        break
                    fwd.run(scaling, 1, warmup=1)
                    res[f"profile_{scaling}"] = profile_kinds(fwd.dit, fwd.inputs)
                    log(f"profile {scaling}: {json.dumps(res[f'profile_{scaling}'])}")
                    save()
        except Exception as e:  # noqa: BLE001
            report["errors"]["forward"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            log(report["errors"]["forward"])
        save()
    if "vae" in parts and not late("vae"):
        try:
            report["vae"] = part_vae(args.out, args.smoke, args.deadline_s)
        except Exception as e:  # noqa: BLE001
            report["errors"]["vae"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            log(report["errors"]["vae"])
        save()
    if "requant" in parts and fwd is not None and not late("requant"):
        try:
            from pipeline.perf import PerfConfig, apply_dit_perf

            applied = apply_dit_perf(PerfConfig(fp8=True, compile=not args.smoke), fwd.dit)
            n = requantise_tensorwise(fwd.dit)
            entry = fwd.timed_forward(applied | {"fp8_scaling": "tensor, weights re-quantised"}, 3, 2)
            entry["layers"] = n
            report.setdefault("forward", {})["fp8_tensor_requant"] = entry
            log(f"forward requant: {json.dumps(entry)}")
        except Exception as e:  # noqa: BLE001
            report["errors"]["requant"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            log(report["errors"]["requant"])
        save()
    report["elapsed_s"] = round(time.perf_counter() - T0, 1)
    save()
    log(f"done; errors: {list(report['errors'])}")
    print(json.dumps({k: report.get(k) for k in ("forward", "errors")}, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
