"""The daemon's errors: each carries the data its handler records (code, field or file, job)."""

from __future__ import annotations

import errno
import re
import sqlite3
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


class IllegalTransition(DaemonError):
    """A transition that is no edge of the state table (`daemon/states.py` `EDGES`): a bug in the
    caller, raised before anything is written."""

    def __init__(self, job_id: str, old: str, new: str, allowed: Iterable[str]) -> None:
        self.job_id = job_id
        self.old = old
        self.new = new
        self.allowed = tuple(allowed)
        super().__init__(
            f"job {job_id}: {old} -> {new} is not a legal transition"
            f" ({old} may go to {', '.join(self.allowed) or 'no other state'})"
        )


class StateDirFull(DaemonError):
    """A ledger write waited for space in the state dir and the daemon was told to stop meanwhile;
    the jobs left running are queued again at the next start."""


class DaemonLocked(DaemonError):
    """Another daemon already holds the state directory's lock (an flock on the directory)."""


class FolderUnusable(DaemonError):
    """A folder the daemon must write (state dir, outbox) cannot be created or written at start."""

    def __init__(self, what: str, path: object, reason: str) -> None:
        self.what = what
        self.path = path
        self.reason = reason
        super().__init__(f"{what} {path} is not writable ({reason})")


class LedgerLost(DaemonError):
    """The ledger file was deleted or replaced under the daemon, or is missing while the state
    dir still holds claimed jobs: writing on would orphan them, so the daemon stops."""


#: errnos that mean "no room": the disk, or the user's or group's quota, is full
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: how those errors read once stringified (shutil.Error keeps only str(error) per file)
_ERRNOS = "|".join(str(n) for n in sorted(DISK_FULL_ERRNOS))
_DISK_FULL_TEXT = re.compile(
    rf"\[Errno ({_ERRNOS})\]|No space left on device|Disk quota exceeded|database or disk is full|SQLITE_FULL"
)
_SQLITE_FULL = 13


def is_disk_full(e: BaseException | None) -> bool:
    """True for every way a full disk or quota shows up: an OSError with errno ENOSPC or EDQUOT,
    `shutil.Error` (copytree/move) whose per-file errors are those, SQLite's SQLITE_FULL, and any
    exception caused by one of these (`raise ... from`, or raised while handling one)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if _DISK_FULL_TEXT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


#: every `code` a rejected or failed job can carry (error.json, the ledger's `error_code`,
#: webhooks), each documented in docs/daemon.md "Error codes" or docs/job-format.md "Errors";
#: tests/project/test_docs_match_code.py checks both ways, and that the code uses no other
ERROR_CODES = frozenset(
    {
        # the job JSON (daemon/jobs.py)
        "bad_json",
        "unknown_key",
        "missing_field",
        "bad_type",
        "bad_value",
        "bad_extension",
        "path_escape",
        "symlink",
        "missing_file",
        "not_a_file",
        "empty_file",
        "too_large",
        "too_deep",
        # intake (daemon/intake.py)
        "bad_media",
        "bad_sample_rate",
        "audio_too_short",
        "audio_too_long",
        "incomplete",
        "checksum_mismatch",
        "duplicate",
        "removed",
        # renders (daemon/policy.py classify, daemon/pool.py, daemon/endings.py)
        "input_changed",
        "cuda_oom",
        "cuda_error",
        "worker_crash",
        "worker_stall",
        "worker_group_broken",
        "disk_full",
        "publish_error",
        "attempts_exhausted",
        "bad_input",
        "render_error",
        "tts_unavailable",
        # commands (daemon/control.py)
        "cancelled",
    }
)
