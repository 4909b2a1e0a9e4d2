"""Failure details: what a failed attempt leaves to debug it without ssh.

The render worker keeps the last `TAIL_LINES` log lines of each job thread in memory
(`install_log_tail()` once in the worker, `log_tail(job_id)` when the job fails) and sends them
with the traceback. The daemon stores `detail(...)` as JSON in the job's `failure_detail` column
(bounded: `MAX_TRACEBACK_CHARS` and `TAIL_LINES` lines of at most `MAX_LINE_CHARS`), shows it on
the dashboard's job page, and writes it into the outbox error JSON (`"failure"`).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from typing import Any

TAIL_LINES = 40  #: worker log lines kept per job
MAX_LINE_CHARS = 500
MAX_TRACEBACK_CHARS = 8000  #: the end of a longer traceback is kept (the raising frame is last)
JOB_THREAD_PREFIX = "job-"  #: the worker names each job's thread job-<id> (daemon/runner.py)
_MAX_JOBS = 64  #: tails of this many recent jobs are kept


class LogTail(logging.Handler):
    """The last lines each job thread logged, keyed by job id (from the thread name)."""

    def __init__(self, lines: int = TAIL_LINES) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines
        self.tails: collections.OrderedDict[str, collections.deque[str]] = collections.OrderedDict()
        self.guard = threading.Lock()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        name = record.threadName or ""
        if not name.startswith(JOB_THREAD_PREFIX):
            return
        job_id = name[len(JOB_THREAD_PREFIX) :]
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad log record must not break the job
            return
        with self.guard:
            tail = self.tails.get(job_id)
            if tail is None:
                tail = self.tails[job_id] = collections.deque(maxlen=self.lines)
                while len(self.tails) > _MAX_JOBS:
                    self.tails.popitem(last=False)
            for line in text.splitlines() or [""]:
                tail.append(line[:MAX_LINE_CHARS])

    def take(self, job_id: str) -> list[str]:
        with self.guard:
            tail = self.tails.pop(job_id, None)
        return list(tail or ())


_installed: LogTail | None = None


def install_log_tail() -> LogTail:
    """Add the tail handler to the root logger (idempotent; after `configure_logging`)."""
    global _installed
    if _installed is None:
        _installed = LogTail()
    root = logging.getLogger()
    if _installed not in root.handlers:
        root.addHandler(_installed)
    return _installed


def log_tail(job_id: str) -> list[str]:
    """The job's last log lines in this process (and forget them); [] without `install_log_tail`."""
    return _installed.take(job_id) if _installed is not None else []


#: what of the render worker's self-description goes with a failure
WORKER_KEYS = ("device", "gpu", "quant", "attention", "weights_dir", "pid")


def detail(
    *,
    traceback: str | None,
    log_lines: list[str] | None,
    attempt: int | None = None,
    at: float | None = None,
    worker: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The bounded JSON-able failure detail; `worker`: the worker's `ready` info (device, GPU...)."""
    tb = traceback or ""
    if len(tb) > MAX_TRACEBACK_CHARS:
        tb = "…" + tb[-MAX_TRACEBACK_CHARS:]
    lines = [str(line)[:MAX_LINE_CHARS] for line in (log_lines or [])][-TAIL_LINES:]
    out: dict[str, Any] = {"traceback": tb or None, "log_tail": lines}
    if attempt is not None:
        out["attempt"] = attempt
    if at is not None:
        out["at"] = at
    if worker:
        out["worker"] = {k: worker[k] for k in WORKER_KEYS if worker.get(k) is not None}
    return out


def encode(value: dict[str, Any]) -> str:
    return json.dumps(value, default=str)


def decode(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
