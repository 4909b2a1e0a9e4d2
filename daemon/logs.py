"""Logging set-up for the daemon and the dashboard: journald-friendly under systemd, human otherwise.

Call `configure_logging(level)` once, in the command that starts a long-running process. Library
modules only do `logger = logging.getLogger(__name__)`.

- Under systemd, stderr is the journal (`$JOURNAL_STREAM` names its device:inode). Every line then
  starts with an sd-daemon priority prefix (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug)
  and carries no timestamp (journald adds its own), so `journalctl -u infinitetalk -p warning`
  filters by level. Continuation lines (tracebacks) get the same prefix.
- Elsewhere: `2026-11-25 19:50:01 INFO    daemon.worker [job 3f9a]: message`.

The job a line belongs to comes from a context variable, set once where a job starts:

    with job_context(job.id):
        ...                                   # every log line here says [job <id>]

`log_state_change(...)` writes the one line per job state change that the daemon logs; the
ledger calls it for every state change it commits (`daemon/ledger.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import TextIO

from daemon.states import State

#: the job id of the work being done in this context ("" outside any job)
current_job_id: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")

#: logging level -> sd-daemon priority (syslog numbering)
SD_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

#: job state -> level of the line announcing that a job entered it
STATE_LEVELS: dict[str, int] = {
    State.failed: logging.ERROR,
    State.rejected: logging.WARNING,
    State.retry_wait: logging.WARNING,
}

HUMAN_FORMAT = "%(asctime)s %(levelname)-7s {tag}%(name)s%(job_tag)s: %(message)s"
JOURNAL_FORMAT = "{tag}%(name)s%(job_tag)s: %(message)s"

#: chatty third-party loggers kept at INFO or above even when the daemon logs at DEBUG
QUIET_LOGGERS = ("watchdog", "PIL", "urllib3", "httpx", "httpcore", "numba", "matplotlib")


def _tag_prefix(tag: str) -> str:
    # escaped: the tag ends up inside a %-style format string
    return tag.replace("%", "%%") + " " if tag else ""


def sd_priority(levelno: int) -> int:
    """The syslog priority for a logging level (levels between the named ones round down)."""
    for level in sorted(SD_PRIORITY, reverse=True):
        if levelno >= level:
            return SD_PRIORITY[level]
    return 7


class JobIdFilter(logging.Filter):
    """Stamps `record.job_id` (and `record.job_tag`, " [job <id>]" or "") from `current_job_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = getattr(record, "job_id", None) or current_job_id.get()
        record.job_id = job_id
        # a line that names its job itself (log_state_change) does not repeat the tag
        tagged = bool(job_id) and not getattr(record, "names_job", False)
        record.job_tag = f" [job {job_id}]" if tagged else ""
        return True


class JournalFormatter(logging.Formatter):
    """No timestamp; each physical line starts with `<priority>` so journald keeps its level."""

    def __init__(self, tag: str = "") -> None:
        super().__init__(JOURNAL_FORMAT.format(tag=_tag_prefix(tag)))

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{sd_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.split("\n"))


def stderr_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when `$JOURNAL_STREAM` (`<dev>:<inode>`) names the file `stream` writes to."""
    raw = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = raw.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def parse_level(level: int | str) -> int:
    """`"info"`, `"WARNING"`, `20`, ... -> a logging level number."""
    if isinstance(level, int):
        return level
    number = logging.getLevelNamesMapping().get(level.strip().upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    return number


def configure_logging(
    level: int | str = "info",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    tag: str = "",
) -> logging.Handler:
    """Route all logging to `stream` (stderr) in the journal or human format; returns the handler.

    `tag` names the process in every line (`tag="worker"` for the render worker, whose stderr is
    the same journal stream). Replaces handlers a previous call installed, so calling it again is
    safe.
    """
    number = parse_level(level)
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(out)
    if stderr_is_journal(out, env):
        handler.setFormatter(JournalFormatter(tag))
    else:
        human = HUMAN_FORMAT.format(tag=_tag_prefix(tag))
        handler.setFormatter(logging.Formatter(human, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(JobIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(number, logging.INFO))
    logging.captureWarnings(True)
    return handler


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag every log line written inside the block with `job_id`."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


def log_state_change(
    logger: logging.Logger,
    job_id: str,
    name: str,
    old: str | None,
    new: str,
    detail: str = "",
) -> None:
    """One line for a job entering `new`: `job 3f9a "alice" queued -> running: attempt 1`.

    Failures log as errors and rejections/retries as warnings, so `journalctl -p warning` shows
    exactly the jobs that need attention.
    """
    arrow = f"{old} -> {new}" if old else new
    line = f'job {job_id} "{name}" {arrow}'
    if detail:
        line += f": {detail}"
    level = STATE_LEVELS.get(new, logging.INFO)
    logger.log(level, "%s", line, extra={"job_id": job_id, "names_job": True})
