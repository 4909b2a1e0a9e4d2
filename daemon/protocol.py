"""The typed messages between the daemon and its render workers, and the events a pool returns.

Every message is a frozen dataclass, pickled over the worker's pipe (daemon/pool.py `LocalPool`)
and matched by type on the daemon's side; nothing is a tuple of strings or a dict read by key.

    daemon -> worker   RunOrder | StopJob(job_id, reason) | Exit()
    worker -> daemon   Ready(info) | Progressed(job_id, Progress) | Finished(job_id, RenderResult, render_s)
                       | Stopped(job_id, reason) | Failed(job_id, Failure, message, traceback, log_tail)
                       | Fatal(message)    the model could not be loaded (the worker then exits)
                       | Heartbeat()       every `heartbeat_s`, from its own thread, from start-up on
                                           (loading included), whatever the jobs do: a worker that
                                           falls silent is stopped (SIGSTOP) or hung, and the pool
                                           kills it after `worker_stall_s`
    pool -> loop       the worker's Ready / Progressed / Finished / Stopped / Failed, and
                       WorkerDied(worker, job_ids, was_ready, fatal) when a worker died or was
                       killed for a stall (the pool restarts it unless `fatal` says it gives up)

`Heartbeat` and `Fatal` never leave the pool: the first only feeds the stall clock, the second
ends up in the `WorkerDied.fatal` of that worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.policy import Failure
from pipeline.types import GenerationRequest, Progress, RenderResult


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOrder:
    """One job for the worker: the request plus where to write."""

    job_id: str
    request: GenerationRequest
    out_path: Path
    poster_path: Path
    checkpoint_dir: Path
    attempt: int = 1
    #: (path, sha256) of each claimed input: checked before every attempt (`verify_inputs`)
    inputs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class StopJob:
    """Stop a job at its next step boundary; `reason` comes back in its `Stopped`."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Exit:
    """Stop every job (reason "shutdown") and exit once their threads are done."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The worker is alive (sent from its own thread, whatever the jobs do)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The model is loaded; `info` describes the worker (device, gpu, quant, load_s, pid, ...),
    copied into each sidecar's `model`."""

    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Fatal:
    """Loading the model failed; the worker exits after sending this."""

    message: str


@dataclass(frozen=True, slots=True)
class Progressed:
    job_id: str
    progress: Progress


@dataclass(frozen=True, slots=True)
class Finished:
    job_id: str
    result: RenderResult
    #: the wall time of the whole attempt in the worker (inputs check, prepare, render)
    render_s: float


@dataclass(frozen=True, slots=True)
class Stopped:
    """The job stopped on request ("cancel", "shutdown", ...); nothing was published."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    job_id: str
    failure: Failure
    #: "ExceptionType: text"
    message: str
    traceback: str | None = None
    #: the worker's last log lines of this job (daemon/failures.py)
    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerDied:
    """Worker `worker` died (or was killed after a stall) with `job_ids` still on it."""

    worker: int
    job_ids: tuple[str, ...]
    #: it had loaded the model (a death before that counts towards giving up)
    was_ready: bool
    #: set when the pool gives up on this worker (the model cannot be loaded, or it died too
    #: often before it was ready): the daemon stops with this reason; None: it was restarted
    fatal: str | None = None
    #: why the jobs on it ended: a crash, or the stall that made the pool kill it
    code: str = "worker_crash"
    why: str = "the render worker process died during this job"


#: what a worker sends
WorkerMessage = Ready | Fatal | Heartbeat | Progressed | Finished | Stopped | Failed
#: what `WorkerPool.wait` returns
Event = Ready | Progressed | Finished | Stopped | Failed | WorkerDied
