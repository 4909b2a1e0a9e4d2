"""`infinitetalk weights tiny|check|download DIR`: write, check or fetch a weights folder.

Exit codes: 0 on success; 1 when `check` finds something a render needs missing or wrong (optional
files absent are notes), or a download fails; 2 on bad usage or a bad config file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="write tiny weights, check a weights folder, or download the released weights",
        description="Manage a weights folder in the released layout (see docs/weights.md).",
    )
    sub = parser.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    tiny = sub.add_parser("tiny", help="write tiny random weights in the released layout (a few MB)")
    tiny.add_argument("dir", type=Path, help="folder to write (created if needed)")
    tiny.add_argument(
        "--seed", type=int, default=0, help="random seed (default 0: the parity fixtures' seed)"
    )
    tiny.add_argument(
        "--no-tts",
        action="store_true",
        help="skip the tiny Kokoro-82M for text-to-speech jobs (written when the tts extra is "
        "installed; about 110 MB)",
    )
    check = sub.add_parser("check", help="report present, missing and wrong files, keys, shapes and dtypes")
    check.add_argument("dir", type=Path, help="weights folder to check")
    check.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config TOML whose `lora` files must be present (default: $INFINITETALK_CONFIG, "
        "./infinitetalk.toml)",
    )
    download = sub.add_parser("download", help="fetch the released weights from the Hugging Face Hub")
    download.add_argument("dir", type=Path, help="weights folder to fill (resumes partial downloads)")
    download.add_argument(
        "--fp8", action="store_true", help="also fetch the official fp8 quantized DiT files"
    )
    download.add_argument("--single-only", action="store_true", help="skip the two-speaker (multi) weights")
    download.add_argument("--dry-run", action="store_true", help="print what would be fetched and exit")
    parser.set_defaults(func=run)


def _write_tiny_kokoro(out: Path, seed: int) -> None:
    import importlib.util

    if importlib.util.find_spec("kokoro") is None:
        print("no tiny Kokoro-82M (text-to-speech jobs): the tts extra is not installed", file=sys.stderr)
        return
    from pipeline.tts_tiny import write_tiny_kokoro

    write_tiny_kokoro(out, seed=seed)


def run(args: argparse.Namespace) -> int:
    action = args.weights_command
    if action == "tiny":
        from pipeline.tiny import write_tiny_weights

        out = write_tiny_weights(args.dir, seed=args.seed)
        if not args.no_tts:
            _write_tiny_kokoro(out, args.seed)
        size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
        print(f"wrote tiny weights (seed {args.seed}, {size / 1e6:.1f} MB) to {out}")
        return 0
    if action == "check":
        if not args.dir.is_dir():
            print(f"infinitetalk weights check: {args.dir} is not a folder", file=sys.stderr)
            return 1
        from daemon.config import ConfigError, load_settings
        from pipeline.weights_check import check_weights

        try:
            loras = load_settings(args.config).lora  # what a configured render merges
        except ConfigError as e:
            print(f"infinitetalk weights check: {e}", file=sys.stderr)
            return 2
        report = check_weights(args.dir, loras=loras)
        print(report.format())
        return 0 if report.ok else 1
    if action == "download":
        from pipeline.download import download_plan, download_weights

        if args.dry_run:
            for item in download_plan(fp8=args.fp8, multi=not args.single_only):
                rev = f" @ {item.revision}" if item.revision else ""
                print(f"{item.repo_id}{rev} -> {args.dir / item.local_dir}: {', '.join(item.allow_patterns)}")
            return 0

        def announce(item: object) -> None:
            print(f"fetching {item.repo_id} -> {args.dir / item.local_dir}", file=sys.stderr)  # type: ignore[attr-defined]

        try:
            download_weights(args.dir, fp8=args.fp8, multi=not args.single_only, on_item=announce)
        except Exception as e:  # network / hub errors: report and fail, the files so far are kept
            print(f"infinitetalk weights download: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"weights downloaded to {args.dir}; run `infinitetalk weights check {args.dir}`")
        return 0
    print(f"unknown weights action {action!r}", file=sys.stderr)
    return 2
