"""The render workers as a pool: the daemon's loop asks it for a free worker, gives it orders and
reads back typed events (`daemon.protocol`); nothing in here calls into the loop.

`WorkerPool` is the interface the loop (daemon/supervisor.py) uses; `LocalPool` is today's
implementation: one spawned process per device (`daemon.runner.worker_main`), each holding one
model and talking over one duplex pipe. Processes and pipes stay inside `LocalPool`, so another
implementation (workers as actors of a distributed engine) can drop in without touching the loop.

What the pool owns:
- starting workers: the first at once, the others once the weights folder holds weights (the
  first may be writing tiny ones);
- noticing a dead worker, and a stalled one (no message, heartbeats included, for
  `worker_stall_s`: stopped or hung), which it kills: a `WorkerDied` event carries the jobs it
  held, and the worker is started again;
- giving up (`WorkerDied.fatal`): the model cannot be loaded, or a worker died
  `MAX_START_FAILURES` times in a row before it was ready;
- the isolation set: jobs that were running together on a worker that died each run alone
  until they end (`isolated`; the loop forgets a job there when it ends), so an innocent job is
  not failed by a poison one.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.config import Settings
from daemon.protocol import (
    Event,
    Exit,
    Failed,
    Fatal,
    Finished,
    Heartbeat,
    Ready,
    RunOrder,
    StopJob,
    Stopped,
    WorkerDied,
    WorkerMessage,
)
from daemon.runner import WorkerConfig, worker_main
from daemon.weights_guard import has_weights

logger = logging.getLogger(__name__)

#: a worker that dies this many times in a row before it is ready makes the pool give up
MAX_START_FAILURES = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerState:
    """One worker as the heartbeat and the dashboard show it."""

    index: int
    device: str
    pid: int | None
    alive: bool
    ready: bool
    jobs: tuple[str, ...]
    #: the worker's `Ready.info` ({} until it is ready)
    info: dict[str, Any]


class WorkerPool(Protocol):
    """What the daemon's loop needs of its render workers."""

    #: jobs that ran together on a worker that died: each runs alone until it ends
    isolated: set[str]

    def start(self) -> None:
        """Start the workers (they load the model; each sends `Ready` when done)."""

    def free_worker(self) -> int | None:
        """The ready worker with the fewest jobs (jobs spread across devices), or None."""

    def any_ready(self) -> bool:
        """Some worker has the model loaded."""

    def run(self, index: int, order: RunOrder) -> None:
        """Give worker `index` a job."""

    def stop(self, job_id: str, why: str) -> None:
        """Ask the job's worker to stop it at its next step boundary (a `Stopped(why)` follows)."""

    def wait(self, timeout_s: float, *, restart: bool = True) -> list[Event]:
        """Block up to `timeout_s` for messages; every event since the last call, in order.
        `restart=False` (the daemon is stopping): a dead worker is not started again."""

    def busy(self) -> bool:
        """A live worker still holds a job."""

    def shutdown(self, timeout_s: float) -> None:
        """Ask every worker to exit (their jobs stop), kill what is left after `timeout_s`."""

    def kill(self) -> None:
        """End every worker now."""

    def device(self, index: int) -> str:
        """The device worker `index` renders on (for the log)."""

    def info(self, index: int) -> dict[str, Any]:
        """Worker `index`'s `Ready.info`, {} before it is ready."""

    def describe(self) -> list[WorkerState]:
        """Every worker's state, in device order."""

    def reconfigure(self, settings: Settings) -> None:
        """SIGHUP: the settings that apply live (`worker_stall_s`)."""


class WorkerHandle:
    """The daemon's handle on one render worker process (see `daemon.runner` for the other side).

    The worker is started with the `spawn` method (CUDA cannot be re-initialised in a forked
    child). `poll()` never blocks; `alive()` tells a crash apart from a quiet worker, `last_seen`
    (monotonic) is when it last said anything, and `kill()` ends it for good (SIGKILL also ends a
    process stopped with SIGSTOP)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.process: Any = None
        self.conn: Any = None
        self.ready = False
        self.info: dict[str, Any] = {}
        self.started_at = 0.0
        #: monotonic time of the last message (heartbeats included), or of the start
        self.last_seen = 0.0
        self.jobs: set[str] = set()
        #: the `Fatal` message it sent, if any
        self.fatal: str | None = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        config = dataclasses.replace(self.config, parent_pid=os.getpid())
        self.process = ctx.Process(
            target=worker_main, args=(child, config), name="infinitetalk-worker", daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.ready = False
        self.info = {}
        self.jobs = set()
        self.fatal = None
        self.started_at = self.last_seen = time.monotonic()
        logger.info("render worker started (pid %d), loading %s", self.process.pid, self.config.weights_dir)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def poll(self) -> list[WorkerMessage]:
        """Every message waiting on the pipe but heartbeats (never blocks); [] when it is gone."""
        out: list[WorkerMessage] = []
        if self.conn is None:
            return out
        try:
            while self.conn.poll(0):
                message = self.conn.recv()
                self.last_seen = time.monotonic()
                match message:
                    case Heartbeat():
                        continue
                    case Ready(info):
                        self.ready = True
                        self.info = info
                    case Fatal(text):
                        self.fatal = text
                    case Finished() | Stopped() | Failed():
                        self.jobs.discard(message.job_id)
                out.append(message)
        except (EOFError, OSError):
            pass
        return out

    def wait(self, timeout_s: float) -> bool:
        """Block until a message arrives or `timeout_s` passes; True if one is waiting."""
        if self.conn is None:
            return False
        try:
            return bool(self.conn.poll(timeout_s))
        except (EOFError, OSError):
            return False

    def run(self, order: RunOrder) -> None:
        self.jobs.add(order.job_id)
        self.conn.send(order)

    def stop_job(self, job_id: str, reason: str) -> None:
        if job_id in self.jobs and self.conn is not None:
            try:
                self.conn.send(StopJob(job_id, reason))
            except (BrokenPipeError, OSError):
                pass

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit (its jobs stop at a step boundary); kill it after `timeout_s`."""
        if self.process is None:
            return
        try:
            self.conn.send(Exit())
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        if self.conn is not None:
            self.conn.close()
        self.process = None
        self.conn = None
        self.ready = False
        self.jobs = set()


class LocalPool:
    """One `WorkerHandle` process per device, all on this host."""

    def __init__(
        self, settings: Settings, devices: list[str], config: WorkerConfig, wake: threading.Event
    ) -> None:
        #: every worker's config but the device (`config.write_tiny`: the first writes tiny weights)
        self.config = config
        self.devices = devices
        self.stall_s = settings.worker_stall_s
        #: set by signals: an idle pool (no worker pipe to wait on) wakes up for it
        self.wake = wake
        self.workers: list[WorkerHandle | None] = [None] * len(devices)
        self.isolated: set[str] = set()
        self.start_failures = 0

    def start(self) -> None:
        self._start(0)  # the others start once weights exist (the first may write tiny ones)
        self._start_more()

    def reconfigure(self, settings: Settings) -> None:
        self.stall_s = settings.worker_stall_s

    def _start(self, index: int) -> None:
        weights = self.config.weights_dir
        config = dataclasses.replace(
            self.config,
            device=self.devices[index],
            write_tiny=self.config.write_tiny and not has_weights(weights),
        )
        worker = WorkerHandle(config)
        worker.start()
        self.workers[index] = worker

    def _start_more(self) -> None:
        if not has_weights(self.config.weights_dir):
            return
        for index, worker in enumerate(self.workers):
            if worker is None:
                self._start(index)

    def _live(self) -> list[tuple[int, WorkerHandle]]:
        return [(i, w) for i, w in enumerate(self.workers) if w is not None]

    def free_worker(self) -> int | None:
        ready = [(len(w.jobs), i) for i, w in self._live() if w.ready and w.alive()]
        return min(ready)[1] if ready else None

    def any_ready(self) -> bool:
        return self.free_worker() is not None

    def run(self, index: int, order: RunOrder) -> None:
        worker = self.workers[index]
        if worker is None:
            raise ValueError(f"no worker {index} to run job {order.job_id} (devices {self.devices})")
        worker.run(order)

    def stop(self, job_id: str, why: str) -> None:
        for _, worker in self._live():
            if job_id in worker.jobs:
                worker.stop_job(job_id, why)

    def busy(self) -> bool:
        return any(w.jobs and w.alive() for _, w in self._live())

    def device(self, index: int) -> str:
        return self.devices[index]

    def info(self, index: int) -> dict[str, Any]:
        worker = self.workers[index] if 0 <= index < len(self.workers) else None
        return dict(worker.info) if worker is not None else {}

    def describe(self) -> list[WorkerState]:
        out = []
        for index, device in enumerate(self.devices):
            worker = self.workers[index]
            alive = worker is not None and worker.alive()
            out.append(
                WorkerState(
                    index=index,
                    device=device,
                    pid=worker.pid if worker is not None and alive else None,
                    alive=alive,
                    ready=bool(alive and worker is not None and worker.ready),
                    jobs=tuple(sorted(worker.jobs)) if worker is not None else (),
                    info=dict(worker.info) if worker is not None else {},
                )
            )
        return out

    def wait(self, timeout_s: float, *, restart: bool = True) -> list[Event]:
        self._block(timeout_s)
        events: list[Event] = []
        for index, worker in self._live():
            events += _events(worker.poll())
            stall = self._stall(index, worker) if worker.alive() else None
            if worker.alive() and stall is None:
                continue
            events += _events(worker.poll())  # whatever it said before dying
            events.append(self._died(index, worker, stall, restart=restart))
        if restart:
            self._start_more()
        return events

    def _block(self, timeout_s: float) -> None:
        from multiprocessing.connection import wait

        conns = [w.conn for _, w in self._live() if w.conn is not None]
        if not conns:
            self.wake.wait(timeout_s)
            return
        try:
            wait(conns, timeout_s)
        except OSError:
            time.sleep(timeout_s)

    def _stall(self, index: int, worker: WorkerHandle) -> str | None:
        """Why a live worker counts as stalled (no message, heartbeats included, for
        `worker_stall_s`), or None. Its waiting messages were read just before: a main loop that
        was busy itself does not make a worker look stalled."""
        silent_s = time.monotonic() - worker.last_seen
        if worker.conn is None or silent_s < self.stall_s:
            return None
        logger.error(
            "render worker on %s (pid %s) sent no heartbeat for %.0f s (worker_stall_s = %g): it is "
            "stopped or hung; killing it",
            self.devices[index],
            worker.pid,
            silent_s,
            self.stall_s,
        )
        return f"the render worker stopped responding for {silent_s:.0f} s (stopped or hung) and was killed"

    def _died(self, index: int, worker: WorkerHandle, stall: str | None, *, restart: bool) -> WorkerDied:
        """Kill what is left of a dead or stalled worker; start a new one unless giving up."""
        fatal, was_ready = worker.fatal, worker.ready
        jobs = tuple(sorted(worker.jobs))
        worker.kill()
        if fatal:
            logger.error("render worker on %s could not start: %s", self.devices[index], fatal)
        if len(jobs) > 1:
            self.isolated |= set(jobs)
        died = WorkerDied(index, jobs, was_ready)
        if stall:
            died = dataclasses.replace(died, code="worker_stall", why=stall)
        self.start_failures = 0 if was_ready else self.start_failures + 1
        if fatal and not was_ready:
            why = f"the model cannot be loaded on {self.devices[index]}"
            return dataclasses.replace(died, fatal=why)
        if self.start_failures >= MAX_START_FAILURES:
            why = f"the render worker died {self.start_failures} times before it was ready"
            return dataclasses.replace(died, fatal=why)
        if restart:
            logger.warning("render worker on %s died; starting a new one", self.devices[index])
            self._start(index)
        return died

    def shutdown(self, timeout_s: float) -> None:
        for _, worker in self._live():
            worker.shutdown(timeout_s=timeout_s)

    def kill(self) -> None:
        for _, worker in self._live():
            worker.kill()


def _events(messages: list[WorkerMessage]) -> list[Event]:
    """The messages the loop sees (a `Fatal` stays in the pool, as the `WorkerDied.fatal` cause)."""
    return [m for m in messages if not isinstance(m, (Fatal, Heartbeat))]
