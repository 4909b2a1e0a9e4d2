"""`infinitetalk bench`: GPU benchmark with random full-size weights (no weight files needed).

    infinitetalk bench [--size 480|720|both] [--dtype bf16|fp8|both] [--passes 1,2]
                       [--compile/--no-compile] [--attention auto|sdpa|cudnn|flash] [--quick]
                       [--fp8-attention auto|on|off] [--fp8-scaling row|tensor]
                       [--json OUT] [--no-t5] [--no-baseline] [--chunk-size 480|720|both|none]
                       [--gpu-memory-gib N[,N...]] [--no-unconstrained]

Prints seconds per DiT forward (plain and fast paths, with their relative error), the VAE and
per-chunk phases, GPU-seconds per second of video for 1 and 2 DiT passes per step, weight
build/load time, peak GPU memory and the GPU, driver and torch versions (docs/benchmarks.md).
Imports only the standard library at module level.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pipeline.choices import ATTENTION, FP8_ATTENTION, FP8_SCALING

if TYPE_CHECKING:  # the CLI imports torch only when a benchmark runs
    from pipeline.bench import BenchOptions

_T = TypeVar("_T")


def _sizes(value: str) -> tuple[str, ...]:
    table = {"480": ("480",), "720": ("720",), "both": ("480", "720"), "none": ()}
    if value not in table:
        raise argparse.ArgumentTypeError(f"size must be 480, 720, both or none, got {value!r}")
    return table[value]


def _dtypes(value: str) -> tuple[str, ...]:
    table = {"bf16": ("bf16",), "fp8": ("fp8",), "both": ("bf16", "fp8")}
    if value not in table:
        raise argparse.ArgumentTypeError(f"dtype must be bf16, fp8 or both, got {value!r}")
    return table[value]


def _passes(value: str) -> tuple[int, ...]:
    return _comma_list(value, int, lambda p: p in (1, 2), "passes must be a comma list of 1 and 2")


def _budgets(value: str) -> tuple[float, ...]:
    rule = "gpu-memory-gib must be a comma list of GiB"
    return _comma_list(value, float, lambda b: b > 0, f"{rule} > 0", unparsed=rule)


def _comma_list(
    value: str, cast: Callable[[str], _T], ok: Callable[[_T], bool], rule: str, *, unparsed: str = ""
) -> tuple[_T, ...]:
    """The comma-separated items of `value`, each `cast` and `ok`; else an error naming the rule
    (`unparsed`, where given, for an item `cast` refuses)."""
    try:
        items = tuple(cast(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{unparsed or rule}, got {value!r}") from None
    if not items or not all(ok(i) for i in items):
        raise argparse.ArgumentTypeError(f"{rule}, got {value!r}")
    return items


def _switch(p: argparse.ArgumentParser, flag: str, text: str) -> None:
    """A `--X/--no-X` option that is on unless `--no-X` is given."""
    p.add_argument(flag, action=argparse.BooleanOptionalAction, default=True, help=text)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="GPU benchmark with random full-size weights",
        description="Speed and memory of the whole stack with random full-size weights built on the GPU "
        "(no weight files). See docs/benchmarks.md.",
    )
    _what_is_timed(p)
    _fast_path(p)
    _memory_budget(p)
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the full report as JSON")
    p.set_defaults(func=run)


def _what_is_timed(p: argparse.ArgumentParser) -> None:
    """Sizes, dtypes, passes, chunks and the optional parts of the report."""
    p.add_argument(
        "--size",
        type=_sizes,
        default=("480", "720"),
        metavar="480|720|both",
        help="sizes whose DiT forward and VAE are timed (default both)",
    )
    p.add_argument(
        "--chunk-size",
        type=_sizes,
        default=("480",),
        metavar="480|720|both|none",
        help="sizes whose full chunk loop is run (default 480)",
    )
    p.add_argument(
        "--dtype",
        type=_dtypes,
        default=("bf16",),
        metavar="bf16|fp8|both",
        help="DiT linear layers in bf16, fp8 (quantised from the random bf16 weights) or both "
        "(fp8 after bf16, same weights); default bf16",
    )
    p.add_argument(
        "--passes",
        type=_passes,
        default=(1, 2),
        metavar="1,2",
        help="DiT passes per step in the chunk loop (1 = audio CFG 1, 2 = audio CFG != 1)",
    )
    _switch(p, "--t5", "build the umT5-XXL encoder too (resident memory; once-per-video cost)")
    p.add_argument(
        "--chunks", type=int, default=2, help="chunks per chunk loop (default 2; the last is steady state)"
    )
    p.add_argument(
        "--load-probe-blocks",
        type=int,
        default=4,
        help="DiT blocks written to disk and loaded back to time the load path (0 = skip)",
    )
    _switch(p, "--profile", "kernel breakdown of one fast forward at the first size (default on)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="480p only, fewer repeats, one chunk loop (1 pass), no load probe",
    )


def _fast_path(p: argparse.ArgumentParser) -> None:
    """The speed settings of the fast path, and its check against the plain one."""
    _switch(p, "--compile", "torch.compile the DiT block on the fast path (default on)")
    p.add_argument(
        "--attention",
        choices=ATTENTION,
        default="auto",
        help="attention kernel of the fast path (default auto: cuDNN on Hopper)",
    )
    p.add_argument(
        "--fp8-attention",
        choices=FP8_ATTENTION,
        default="auto",
        help="with --dtype fp8, also time the self-attention in fp8 (cuDNN, needs nvidia-cudnn-frontend; "
        "auto = where available)",
    )
    p.add_argument(
        "--fp8-scaling",
        choices=FP8_SCALING,
        default="row",
        help="with --dtype fp8: row-wise activation scales (row-wise kernel) or one per call "
        "(tensor-wise kernel, weight row scales on the output); default row",
    )
    _switch(
        p,
        "--baseline",
        "also time the plain path (reference numerics, eager) and check the fast one against it",
    )


def _memory_budget(p: argparse.ArgumentParser) -> None:
    """The chunk loop under placement plans of given budgets."""
    p.add_argument(
        "--gpu-memory-gib",
        type=_budgets,
        default=(),
        metavar="N[,N...]",
        help="also run the chunk loop under the placement plan of each budget (GiB), enforced with "
        "torch.cuda.set_per_process_memory_fraction; prints the plan, seconds per chunk, GPU-s per "
        "video-s, peak memory and host-to-device bytes per forward",
    )
    _switch(
        p,
        "--unconstrained",
        "with --gpu-memory-gib: also run the chunk loop with everything resident (default on)",
    )


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    from pipeline.bench import BenchOptions

    kwargs = {
        "sizes": args.size,
        "chunk_sizes": args.chunk_size,
        "dtypes": args.dtype,
        "passes": args.passes,
        "compile": args.compile,
        "attention": args.attention,
        "fp8_attention": args.fp8_attention,
        "fp8_scaling": args.fp8_scaling,
        "baseline": args.baseline,
        "t5": args.t5,
        "num_chunks": args.chunks,
        "load_probe_blocks": args.load_probe_blocks,
        "device": args.device,
        "profile": args.profile,
        "gpu_memory_gib": args.gpu_memory_gib,
        "unconstrained": args.unconstrained,
    }
    if args.quick:
        kwargs |= {
            "sizes": ("480",),
            "chunk_sizes": ("480",),
            "passes": args.passes[:1],
            "warmup": 1,
            "repeats": 3,
            "load_probe_blocks": 0,
        }
    return BenchOptions(**kwargs)


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    from daemon.runner import ALLOC_CONF

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)  # as the render worker
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from pipeline.bench import format_report, run_bench

    try:
        opts = options_from_args(args)
    except ValueError as e:
        print(f"infinitetalk bench: {e}", file=sys.stderr)
        return 2

    def save(partial: dict) -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(partial, indent=1))

    report = run_bench(opts, log=lambda m: print(m, flush=True), checkpoint=save)
    text = format_report(report)
    print("\n" + text, flush=True)
    if args.json is not None:
        save(report)
        print(f"report written to {args.json}")
    return 1 if report.get("errors") else 0
