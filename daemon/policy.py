"""What a failed attempt means, and whether the job tries again: pure, no I/O, unit-tested.

`classify(exc)` runs in the render worker on the exception a render raised and names the failure
(`Failure`: its error code, whether another attempt may succeed, whether the worker process must
be replaced). `RetryPolicy.decide(failure, attempts)` runs in the daemon: a transient failure
with attempts left is retried after an exponential backoff (`retry_backoff_s` doubled per counted
attempt, at most `retry_backoff_max_s`); anything else gives up with the message the job keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemon.errors import is_disk_full

if TYPE_CHECKING:
    from daemon.config import Settings


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """A failed attempt: its `code` (daemon.errors.ERROR_CODES), and what it implies."""

    code: str
    #: another attempt may succeed (out of memory, a crashed worker, a full disk)
    transient: bool
    #: the worker's CUDA context (or its process group) may be broken: the worker process exits
    poisons_worker: bool = False


class InputChanged(Exception):
    """A claimed input no longer has the hash recorded when it was claimed: never rendered."""


def classify(exc: BaseException) -> Failure:
    """The failure an exception raised by a render stands for (matched by type, and for the
    CUDA errors that torch raises as plain RuntimeErrors, by their text)."""
    name = type(exc).__name__
    text = str(exc)
    if name == "OutOfMemoryError" or "CUDA out of memory" in text:
        return Failure(code="cuda_oom", transient=True)
    if is_disk_full(exc):  # ENOSPC, EDQUOT, wrapped in shutil.Error, SQLITE_FULL, chained
        return Failure(code="disk_full", transient=True)
    if "CUDA error" in text or name in ("AcceleratorError", "CudaError"):
        # the CUDA context may be poisoned: start a fresh process
        return Failure(code="cuda_error", transient=True, poisons_worker=True)
    if name == "GroupBroken":  # pipeline.parallel_pipeline: a rank died; rebuild the whole group
        return Failure(code="worker_group_broken", transient=True, poisons_worker=True)
    if isinstance(exc, InputChanged):
        return Failure(code="input_changed", transient=False)
    if name == "TtsUnavailable":  # pipeline.tts_text: a text-to-speech piece is not installed
        return Failure(code="tts_unavailable", transient=False)
    if isinstance(exc, (ValueError, FileNotFoundError, KeyError)):
        return Failure(code="bad_input", transient=False)
    return Failure(code="render_error", transient=False)


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after `delay_s` seconds."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The job fails with `message` (the attempt's message, plus why no retry follows)."""

    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """`max_attempts` attempts in all; the n-th retry waits `backoff_s * 2**(n-1)`, capped."""

    max_attempts: int
    backoff_s: float
    backoff_max_s: float

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError(
                f"backoffs must not be negative, got backoff_s {self.backoff_s}, "
                f"backoff_max_s {self.backoff_max_s}"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """`max_attempts`, `retry_backoff_s` and `retry_backoff_max_s` of the config."""
        return cls(
            max_attempts=settings.max_attempts,
            backoff_s=settings.retry_backoff_s,
            backoff_max_s=settings.retry_backoff_max_s,
        )

    def delay_s(self, attempts: int) -> float:
        """The wait after the `attempts`-th counted attempt failed."""
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempts - 1)))

    def decide(self, failure: Failure, attempts: int, message: str = "") -> Retry | GiveUp:
        """After attempt number `attempts` (counted, 1-based) failed with `failure`."""
        if not failure.transient:
            return GiveUp(message)
        if attempts < self.max_attempts:
            return Retry(self.delay_s(attempts))
        return GiveUp(f"{message} (gave up after {attempts} attempts)")
