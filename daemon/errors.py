"""The daemon's errors: each carries the data its handler records (code, field or file, job)."""

from __future__ import annotations

from collections.abc import Iterable


class DaemonError(Exception):
    """Base of the daemon's own errors."""


class JobRejected(DaemonError):
    """A job that cannot be taken: bad JSON, bad field, bad or missing media, duplicate, timeout.

    `code` is one of the lower-case codes listed in docs/daemon.md; `field` names the JSON field
    or the file at fault (empty when neither applies).
    """

    def __init__(self, code: str, message: str, *, field: str = "", duplicate_of: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.duplicate_of = duplicate_of


class LedgerConflict(DaemonError):
    """A compare-and-set transition found the job in another state (or no job at all)."""

    def __init__(self, job_id: str, expected: Iterable[str], actual: str | None) -> None:
        self.job_id = job_id
        self.expected = tuple(expected)
        self.actual = actual
        super().__init__(
            f"job {job_id}: expected state {'|'.join(self.expected)}, found {actual or 'no such job'}"
        )


class StateDirFull(DaemonError):
    """A ledger write waited for space in the state dir and the daemon was told to stop meanwhile;
    the jobs left running are queued again at the next start."""


class DaemonLocked(DaemonError):
    """Another daemon already holds the state directory's lock file."""


#: error codes of failed renders (the worker classifies exceptions into these)
TRANSIENT_CODES = frozenset({"cuda_oom", "worker_crash", "disk_full"})
