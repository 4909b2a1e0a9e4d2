"""`infinitetalk render JOB.json [-o OUT.mp4]`: render one job without the daemon, with a progress bar.

The job is checked exactly as the daemon checks it, before the model loads: parsed and
validated (`daemon.jobs`, with the defaults of the config file when there is one: `--config`,
`$INFINITETALK_CONFIG`, `./infinitetalk.toml`; else the built-in ones, the lightx2v 4-step
recipe), then every media file decoded in its role by the intake's probe (`daemon.intake.probe_job`:
`bad_media`, `audio_too_short` below `min_audio_s`, `audio_too_long`, ...). A bad job exits 2 with
the daemon's error code, in about a second. Weights: `--weights`, else the config's `weights_dir`,
else `./weights`; a folder without weights exits 78 with the `weights check` report
(daemon/weights_guard.py), unless `--allow-tiny` or `allow_tiny_model = true`: then a tiny
random-weight model is written to `<state_dir>/tiny-weights` (`var/tiny-weights` without a
config) and used, and the command says so on stderr. The model loads as the daemon's render worker
loads it (`pipeline.loading.LoadOptions`): the config's device, dtype, quant, lora, lora_scale,
attention and `[performance]` table (the memory budget included) apply; `--device` and `--dtype`
come first.

Only the standard library is imported at module level; torch loads when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.loading import LoadOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render",
        help="render one job without the daemon, with a progress bar",
        description="Render one job JSON (bundle job.json or loose NAME.json) to an MP4.",
    )
    parser.add_argument("job", type=Path, help="the job JSON; its media lie beside it")
    parser.add_argument("-o", "--output", type=Path, help="output MP4 (default: <job name>.mp4 here)")
    parser.add_argument("--weights", type=Path, help="weights folder (default: the config's weights_dir)")
    parser.add_argument(
        "--config", type=Path, help="config TOML (default: $INFINITETALK_CONFIG, ./infinitetalk.toml)"
    )
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype", default=None, choices=("auto", "bf16", "fp16", "fp32"), help="compute dtype"
    )
    parser.add_argument("--resume-dir", type=Path, help="keep chunk checkpoints here; rerunning resumes")
    parser.add_argument("--no-poster", action="store_true", help="do not write <output>.jpg")
    parser.add_argument(
        "--allow-tiny",
        action="store_true",
        help="without weights, render with a tiny random-weight test model (noise; as allow_tiny_model)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="split each DiT forward over N GPUs of this host "
        "(Ulysses sequence parallelism, docs/scaling.md; N divides 40: 2, 4, 5, 8)",
    )
    parser.set_defaults(func=run)


def _job_name(job: Path) -> str:
    return job.parent.name if job.name == "job.json" else job.stem


def _settings(config: Path | None) -> Any:
    """The daemon's Settings when a config file is found, else None."""
    try:
        from daemon.config import find_config, load_settings
    except ImportError:  # pragma: no cover - the daemon package ships with the CLI
        return None
    path = find_config(config)
    if path is None:
        return None
    if not path.is_file():
        raise SystemExit(f"infinitetalk render: config file not found: {path}")
    return load_settings(path)


def _weights(args: argparse.Namespace, settings: Any) -> tuple[Path, bool]:
    """(weights folder, is_tiny_fallback); writes the tiny model when it falls back (allowed only
    by --allow-tiny or allow_tiny_model); raises WeightsMissing otherwise."""
    from daemon.weights_guard import choose_weights, has_weights

    folder = args.weights or (settings.weights_dir if settings is not None else Path("weights"))
    tiny = settings.tiny_weights_dir if settings is not None else Path("var") / "tiny-weights"
    allow = args.allow_tiny or (settings is not None and settings.allow_tiny_model)
    chosen, _ = choose_weights(
        folder, allow_tiny=allow, tiny_dir=tiny, loras=settings.lora if settings is not None else ()
    )
    if chosen == folder:
        return folder, False
    print(
        f"infinitetalk render: no weights in {folder}; using the tiny random-weight model in {tiny} "
        "(the video will be noise; put the released weights there for real renders)",
        file=sys.stderr,
    )
    if not has_weights(tiny):
        from pipeline.weights_layout import write_tiny_once

        print(f"infinitetalk render: writing tiny weights to {tiny} ...", file=sys.stderr)
        write_tiny_once(tiny)
    return tiny, True


class _Bar:
    """tqdm bar over chunk x step, described as 'chunk i/n'."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None

    def __call__(self, p: Any) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.num_chunks * p.num_steps, unit="step", dynamic_ncols=True)
        done = (p.chunk - 1) * p.num_steps + p.step
        if p.stage in ("encode", "done"):
            done = p.num_chunks * p.num_steps
        self.bar.set_description(f"{p.stage} chunk {p.chunk}/{p.num_chunks}", refresh=False)
        self.bar.update(max(0, done - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rank(args: argparse.Namespace) -> None:
    """One process of `--gpus N` (its rank is in the environment; see pipeline.parallel)."""
    code = run(args)
    if code:
        raise SystemExit(code)


def _check_media(job: Path, spec: Any, settings: Any) -> int:
    """The daemon intake's media probe of the job (0: fine; 2: rejected, the error printed)."""
    from daemon.config import Settings
    from daemon.errors import JobRejected
    from daemon.intake import probe_job
    from daemon.jobs import checksum_mismatches

    s = settings if settings is not None else Settings()
    try:
        bad = checksum_mismatches(spec, job.parent)
        if bad:
            raise JobRejected(
                "checksum_mismatch", f"{', '.join(bad)}: sha256 differs from checksums", field=bad[0]
            )
        probe_job(job.parent, spec, s.min_audio_s, s.max_audio_s)
    except JobRejected as e:
        print(f"infinitetalk render: {job} is not a valid job:", file=sys.stderr)
        print(f"  [{e.code}] {e.field or '(file)'}: {e.message}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> int:
    from daemon.weights_guard import WeightsMissing

    settings = _settings(args.config)
    job: Path = args.job
    spec = _checked_job(job, settings)
    if spec is None:
        return 2
    out = args.output or Path(f"{_job_name(job)}.mp4")
    try:
        weights, _ = _weights(args, settings)
    except WeightsMissing as e:
        print(f"infinitetalk render: {e}", file=sys.stderr)
        return 78  # EX_CONFIG, as `infinitetalk daemon`
    if args.gpus > 1 and "RANK" not in os.environ:  # start N ranks, each runs this command
        return _launch_ranks(args, weights, settings)

    from pipeline.loading import load_pipeline
    from pipeline.parallel import join_from_env

    opts = load_options(args, settings)
    group = join_from_env(opts.device)  # --gpus N: this process is one rank; rank 0 writes the outputs
    if group is not None:  # each rank keeps its whole stack resident, in bf16 unless told fp8
        quant = "none" if opts.quant == "auto" else opts.quant
        opts = dataclasses.replace(opts, device=str(group.device), quant=quant, gpu_memory_gib=None)
        if not group.is_main:
            out = Path(tempfile.mkdtemp(prefix="infinitetalk-rank-")) / out.name  # removed at the end
            args.no_poster, args.quiet, args.resume_dir = True, True, None
    print(f"loading the model from {weights} on {opts.device} ({opts.dtype}) ...", file=sys.stderr)
    t0 = time.perf_counter()
    pipe = load_pipeline(weights, opts)
    if group is not None:
        if pipe.quant is not None:
            print("infinitetalk render: --gpus > 1 does not support quant = fp8 yet", file=sys.stderr)
            return 2
        group.attach(pipe.dit)
    drawn = " (drawn)" if spec.seed_drawn else ""
    print(f"loaded in {time.perf_counter() - t0:.1f} s; seed {spec.seed}{drawn}", file=sys.stderr)
    main = group is None or group.is_main
    code = _render(args, pipe, spec.to_request(job.parent), out, announce=main)
    if not main:
        shutil.rmtree(out.parent, ignore_errors=True)
    return code


def load_options(args: argparse.Namespace, settings: Any) -> LoadOptions:
    """How this command loads the model: as the render worker does (`pipeline.loading`), from
    the config's device, dtype, quant, lora, lora_scale, attention and [performance] (the memory
    budget included), `--device` and `--dtype` first; without a config file the built-in ones."""
    from pipeline.loading import LoadOptions, dtype_name, resolve_device, resolve_dtype

    if settings is None:
        opts = LoadOptions()
    else:
        opts = LoadOptions.from_strings(
            device=settings.device,
            dtype=settings.dtype,
            quant=settings.quant,
            lora=settings.lora,
            lora_scale=settings.lora_scale,
            attention=settings.attention,
            perf=dataclasses.asdict(settings.performance),
        )
    device = resolve_device(args.device or opts.device)
    dtype = dtype_name(resolve_dtype(args.dtype or opts.dtype, device))
    return dataclasses.replace(opts, device=device, dtype=dtype)


def _checked_job(job: Path, settings: Any) -> Any:
    """The job's JobSpec, checked as the daemon checks it (None: invalid, the errors printed)."""
    from daemon.jobs import InvalidJob, JobDefaults, load_job

    defaults = settings.job_defaults() if settings is not None else JobDefaults()
    try:
        spec = load_job(job, defaults=defaults)
    except InvalidJob as e:
        print(f"infinitetalk render: {job} is not a valid job:", file=sys.stderr)
        for err in e.errors:
            print(f"  [{err.code}] {err.field or '(file)'}: {err.message}", file=sys.stderr)
        return None
    if _check_media(job, spec, settings):  # before the model loads: a bad file is told at once
        return None
    return spec


def _launch_ranks(args: argparse.Namespace, weights: Path, settings: Any) -> int:
    """`--gpus N`: start N ranks of this command (pipeline.parallel), wait for them."""
    from pipeline.parallel import check_launch, spawn_ranks

    try:
        check_launch(weights, args.gpus, args.device or (settings.device if settings is not None else "auto"))
    except ValueError as e:
        print(f"infinitetalk render: --gpus {args.gpus}: {e}", file=sys.stderr)
        return 2
    args.weights = weights
    try:
        spawn_ranks(_rank, args.gpus, (args,))
    except Exception as e:  # a rank failed; its own error is on stderr
        print(f"infinitetalk render: --gpus {args.gpus}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


def _render(args: argparse.Namespace, pipe: Any, request: Any, out: Path, *, announce: bool) -> int:
    """Render with a progress bar; Ctrl-C stops at the next step (130). `announce`: print what
    was written (rank 0 of a GPU group, or the only process)."""
    from pipeline.types import StopRequested

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    bar = _Bar(args.quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    poster = None if args.no_poster else out.with_suffix(".jpg")
    try:
        result = pipe.generate(
            request,
            out,
            poster_path=poster,
            on_progress=bar,
            should_stop=stop.is_set,
            checkpoint_dir=args.resume_dir,
        )
    except StopRequested:
        bar.close()
        hint = f"; rerun with --resume-dir {args.resume_dir} to continue" if args.resume_dir else ""
        print(f"infinitetalk render: stopped{hint}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        bar.close()
        print(f"infinitetalk render: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    bar.close()
    if announce:
        print(
            f"{result.video_path}: {result.num_frames} frames, {result.duration_s:.2f} s, "
            f"{result.width}x{result.height}, seed {result.seed}, "
            f"rendered in {result.timings_s.get('render_s', 0):.1f} s"
        )
    return 0
