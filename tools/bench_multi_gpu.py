"""Multi-GPU DiT benchmark: Ulysses sequence parallelism and one job per GPU, random full-size weights.

    python tools/bench_multi_gpu.py                 # every visible GPU (>= 2), 480p, one speaker
    python tools/bench_multi_gpu.py --gpus 2 --size 720 --speakers 2 --json out.json
    python tools/bench_multi_gpu.py --cpu-smoke     # the same code on 2 CPU processes (gloo), tiny model

No weight files: each rank builds the 14B DiT on its GPU with random values (`pipeline.bench`),
then rank 0's parameters and inputs are broadcast so every rank holds the same model. Measured
(wall clock around CUDA-synchronised regions, after warm-up; median and min):

1. latency: seconds per DiT forward on one GPU (rank 0 alone, the others idle) and with Ulysses
   over all N GPUs (`pipeline.parallel.SequenceParallel`), the speed-up, the DiT time per chunk
   (forward time x forwards per chunk, for the lightx2v 4-step recipe and the reference's 40 steps
   x 3 passes), the relative error of the parallel output against the single-GPU one, and the
   communication share: time inside collectives (all-to-alls, the output gather, and for two
   speakers the key broadcast and min/max reduction; waiting for a slower rank included) over the
   forward time, from a separate pass with every collective synchronised;
2. throughput: N independent "jobs" (K forwards each, no communication) on N GPUs at once vs
   rank 0 running all N jobs one after the other, and the ratio.

The report is printed (and written as JSON with --json) by rank 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline import parallel  # noqa: E402

#: lightx2v 4 steps with text+audio CFG folded into 1 pass, and 2 passes; the reference: 40 x 3
FORWARDS_PER_CHUNK = {"lightx2v_4x1": 4, "lightx2v_4x2": 8, "reference_40x3": 120}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=0, help="processes / GPUs (default: every visible GPU)")
    p.add_argument("--size", choices=("480", "720"), default="480", help="chunk size (81 frames)")
    p.add_argument("--speakers", type=int, choices=(1, 2), default=1)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--attention", default="auto", help="attention backend (auto: cuDNN on Hopper)")
    p.add_argument("--rope", choices=("fast", "exact"), default="fast")
    p.add_argument("--compile", action="store_true", help="compile each block (both paths)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--job-forwards", type=int, default=8, help="forwards per job in the throughput test")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="check the logic on the CPU: 2 gloo processes, tiny model, tiny grid",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# one rank


def _model_and_inputs(opts: dict[str, Any], device: torch.device) -> tuple[Any, dict[str, torch.Tensor], Any]:
    from pipeline.bench import Shape, build_random_dit, dit_inputs
    from pipeline.config import DiTConfig

    dtype = (
        torch.float32 if opts["cpu_smoke"] else {"bf16": torch.bfloat16, "fp16": torch.float16}[opts["dtype"]]
    )
    if opts["cpu_smoke"]:
        from pipeline.tiny import tiny_dit_config

        cfg = tiny_dit_config(text_dim=32, clip_dim=32, clip_tokens=8, audio_blocks=2, audio_channels=16)
        shape = Shape(
            name="smoke", height=32, width=48, frame_num=13
        )  # latent (4, 4, 6): 4 frames of 6 tokens
    else:
        cfg = DiTConfig()
        height, width = {"480": (480, 832), "720": (720, 1280)}[opts["size"]]
        shape = Shape(name=opts["size"], height=height, width=width, frame_num=81)
    model = build_random_dit(cfg, device, dtype, seed=0)
    inputs = dit_inputs(cfg, shape, device, dtype, seed=1)
    if opts["speakers"] == 2:
        f, h, w = shape.latent
        g = torch.Generator(device=device).manual_seed(2)
        extra = torch.randn(1, 1, *inputs["audio"].shape[2:], generator=g, device=device).to(dtype)
        inputs["audio"] = torch.cat([inputs["audio"], extra], dim=1)
        masks = torch.zeros(3, h, w, device=device)
        masks[0, :, : w // 2], masks[1, :, w // 2 :], masks[2, : h // 4] = 1, 1, 1
        inputs["ref_target_masks"] = masks
    with torch.no_grad():  # one model everywhere: rank 0's values
        for tensor in (*model.parameters(), *model.buffers(), *inputs.values()):
            dist.broadcast(tensor, src=0)
    from pipeline.perf import PerfConfig, apply_dit_perf

    settings = apply_dit_perf(
        PerfConfig(attention=opts["attention"], rope=opts["rope"], compile=opts["compile"]), model
    )
    return (
        model,
        inputs,
        {
            "config": "tiny" if opts["cpu_smoke"] else "14B",
            "shape": shape.latent,
            "tokens": shape.tokens(cfg),
            "dtype": str(dtype),
            **settings,
        },
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, *, together: bool) -> tuple[float, Any]:
    """Seconds of `fn()` (all ranks start together when `together`), its result."""
    _sync(device)
    if together:
        dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _stats(samples: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(samples), 5), "min_s": round(min(samples), 5)}


def rank_main(rank: int, world: int, port: int, opts: dict[str, Any], out_dir: str) -> None:
    backend = "gloo" if opts["cpu_smoke"] else "nccl"
    device = parallel.init_group(
        parallel.Rendezvous(rank=rank, world_size=world, local_rank=rank, master_port=port), backend=backend
    )
    if opts["cpu_smoke"]:
        torch.set_num_threads(1)
    report: dict[str, Any] = {"world_size": world, "backend": backend}
    try:
        model, inputs, report["model"] = _model_and_inputs(opts, device)
        if device.type == "cuda":
            report["gpu"] = torch.cuda.get_device_name(device)
        forward = lambda: model(**inputs)  # noqa: E731
        warm, reps = opts["warmup"], opts["repeats"]

        with torch.no_grad():
            # 1a. one GPU: rank 0 alone
            single, ref = [], None
            if rank == 0:
                for i in range(warm + reps):
                    dt, ref = _timed(forward, device, together=False)
                    if i >= warm:
                        single.append(dt)
            dist.barrier()

            # 1b. Ulysses over the whole group
            sp = parallel.SequenceParallel()
            model.sequence_parallel = sp
            ulysses, out = [], None
            for i in range(warm + reps):
                dt, out = _timed(forward, device, together=True)
                if i >= warm:
                    ulysses.append(dt)
            sp.stats.reset()
            sp.stats.timing = True
            comm_forward, _ = _timed(forward, device, together=True)
            comm = {
                "seconds": sp.stats.seconds,
                "calls": sp.stats.calls,
                "bytes_sent": sp.stats.bytes_sent,
                "forward_s_synchronised": comm_forward,
            }
            sp.stats.timing = False
            model.sequence_parallel = None
            comms = [None] * world
            dist.all_gather_object(comms, comm)

            # 2. throughput: N jobs on N GPUs at once vs rank 0 doing all N
            k = opts["job_forwards"]
            serial_s = 0.0
            if rank == 0:
                serial_s, _ = _timed(lambda: [forward() for _ in range(k * world)], device, together=False)
            dist.barrier()
            parallel_s, _ = _timed(lambda: [forward() for _ in range(k)], device, together=True)
            dist.barrier()
            walls = [0.0] * world
            dist.all_gather_object(walls, parallel_s)

        if rank == 0:
            from pipeline.bench import rel_err

            s_med, u_med = statistics.median(single), statistics.median(ulysses)
            report["latency"] = {
                "single_gpu_forward": _stats(single),
                f"ulysses_{world}_forward": _stats(ulysses),
                "speedup": round(s_med / u_med, 3),
                "gpu_seconds_ratio": round(world * u_med / s_med, 3),
                "dit_seconds_per_chunk": {
                    name: {"single_gpu": round(n * s_med, 3), f"ulysses_{world}": round(n * u_med, 3)}
                    for name, n in FORWARDS_PER_CHUNK.items()
                },
                "rel_err_vs_single_gpu": rel_err(out, ref),
                "communication": [
                    {
                        **c,
                        "share": round(c["seconds"] / c["forward_s_synchronised"], 4),
                        "mb_sent_per_forward": round(c["bytes_sent"] / 1e6, 2),
                    }
                    for c in comms
                ],
            }
            slowest = max(walls)
            report["throughput"] = {
                "jobs": world,
                "forwards_per_job": k,
                "one_gpu_all_jobs_s": round(serial_s, 4),
                f"{world}_gpus_one_job_each_s": round(slowest, 4),
                "per_rank_s": [round(w, 4) for w in walls],
                "speedup": round(serial_s / slowest, 3),
            }
            Path(out_dir, "report.json").write_text(json.dumps(report, indent=2))
    finally:
        parallel.close_group()


# ----------------------------------------------------------------------------------------------
# launcher


def format_report(report: dict[str, Any]) -> str:
    lat, thr, model = report["latency"], report["throughput"], report["model"]
    n = report["world_size"]
    lines = [
        f"{report.get('gpu', 'CPU (gloo smoke test)')} x {n}, {model['config']} DiT, {model['dtype']}, "
        f"latent {tuple(model['shape'])} = {model['tokens']} tokens, attention {model['attention']}, "
        f"rope {model['rope']}, compiled {model['compiled']}",
        f"per forward: 1 GPU {lat['single_gpu_forward']['median_s']:.4f} s (min {lat['single_gpu_forward']['min_s']:.4f}), "
        f"Ulysses-{n} {lat[f'ulysses_{n}_forward']['median_s']:.4f} s "
        f"(min {lat[f'ulysses_{n}_forward']['min_s']:.4f}): {lat['speedup']:.2f}x, "
        f"GPU-seconds x{lat['gpu_seconds_ratio']:.2f}; rel. error vs 1 GPU {lat['rel_err_vs_single_gpu']:.2e}",
    ]
    for name, per in lat["dit_seconds_per_chunk"].items():
        lines.append(
            f"DiT per chunk ({name}): 1 GPU {per['single_gpu']:.2f} s, Ulysses-{n} {per[f'ulysses_{n}']:.2f} s"
        )
    for rank, c in enumerate(lat["communication"]):
        lines.append(
            f"rank {rank}: communication {c['seconds']:.4f} s of {c['forward_s_synchronised']:.4f} s "
            f"({100 * c['share']:.1f} %, synchronised pass), {c['calls']} collectives, "
            f"{c['mb_sent_per_forward']:.1f} MB sent per forward"
        )
    lines.append(
        f"throughput: {thr['jobs']} jobs x {thr['forwards_per_job']} forwards: 1 GPU {thr['one_gpu_all_jobs_s']:.3f} s, "
        f"{n} GPUs {thr[f'{n}_gpus_one_job_each_s']:.3f} s: {thr['speedup']:.2f}x"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        world = args.gpus or 2
        args.warmup, args.repeats, args.job_forwards = (
            min(args.warmup, 1),
            min(args.repeats, 2),
            min(args.job_forwards, 2),
        )
    else:
        if not torch.cuda.is_available():
            print(
                "bench_multi_gpu: no CUDA device (use --cpu-smoke to check the logic on the CPU)",
                file=sys.stderr,
            )
            return 2
        world = args.gpus or torch.cuda.device_count()
        if world < 2 or world > torch.cuda.device_count():
            print(
                f"bench_multi_gpu: needs 2..{torch.cuda.device_count()} GPUs, asked for {world}",
                file=sys.stderr,
            )
            return 2
        parallel.check_degree(40, world)
    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    with tempfile.TemporaryDirectory(prefix="bench-multi-gpu-") as tmp:
        parallel.spawn(rank_main, world, (opts, tmp))
        report = json.loads(Path(tmp, "report.json").read_text())
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
