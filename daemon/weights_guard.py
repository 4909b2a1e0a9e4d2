"""Which weights a render uses: the configured folder, or (only when allowed) the tiny test model.

A `weights_dir` with no weights (empty, mistyped, an NFS mount that is not there) never turns
into noise videos marked `done`: `infinitetalk daemon` and `infinitetalk render` refuse to start
(exit 78) with the `infinitetalk weights check` report of the folder, unless `allow_tiny_model =
true` (or `--allow-tiny`) says the tiny random-weight model written under `state_dir` is wanted,
as in `scripts/demo` and the tests. A folder written by `infinitetalk weights tiny` holds weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from daemon.errors import DaemonError
from pipeline.weights_layout import FULL_MARKER, TINY_MARKER, has_weights, is_tiny

__all__ = ["FULL_MARKER", "TINY_MARKER", "WeightsMissing", "choose_weights", "has_weights", "missing_report"]


class WeightsMissing(DaemonError):
    """`weights_dir` holds no weights and the tiny model is not allowed; the message says what is
    missing (the `weights check` report) and the ways out."""

    def __init__(self, folder: Path, report: str) -> None:
        self.folder = folder
        self.report = report
        super().__init__(
            f"weights_dir {folder} holds no weights:\n{report}\n"
            f"put the released weights there (`infinitetalk weights download {folder}`), point "
            "weights_dir at them, or set allow_tiny_model = true (or pass --allow-tiny) to render "
            "noise with a tiny random-weight test model"
        )


def missing_report(folder: Path, loras: Sequence[str | Path] = ()) -> str:
    """What `infinitetalk weights check FOLDER` says about it (a line for a folder that is not there)."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        return f"weights folder {folder} {what}"
    from pipeline.weights_check import check_weights

    return check_weights(folder, loras=loras).format()


def choose_weights(
    weights_dir: Path, *, allow_tiny: bool, tiny_dir: Path, loras: Sequence[str | Path] = ()
) -> tuple[Path, bool]:
    """(the folder to load, whether it is the tiny model). `weights_dir` when it holds weights;
    else `tiny_dir` if `allow_tiny` (the caller writes the tiny model there when absent); else
    raise `WeightsMissing`."""
    if has_weights(weights_dir):
        return weights_dir, is_tiny(weights_dir)
    if not allow_tiny:
        raise WeightsMissing(weights_dir, missing_report(weights_dir, loras))
    return tiny_dir, True
