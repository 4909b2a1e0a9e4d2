"""The daemon's handle on the render worker process (see `daemon.runner` for the other side).

The worker is started with the `spawn` method (CUDA cannot be re-initialised in a forked child)
and talks over one duplex pipe. `poll()` never blocks; `alive()` tells a crash apart from a quiet
worker, `last_seen` (monotonic) is when it last said anything (it sends a heartbeat every
`heartbeat_s` whatever it is doing, so a stopped or hung worker falls silent), and `kill()` ends
it for good (SIGKILL also ends a process stopped with SIGSTOP).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from typing import Any

from daemon.runner import RunOrder, WorkerConfig, worker_main

logger = logging.getLogger(__name__)


class WorkerHandle:
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

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        config = WorkerConfig(**{**_fields(self.config), "parent_pid": os.getpid()})
        self.process = ctx.Process(
            target=worker_main, args=(child, config), name="infinitetalk-worker", daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.ready = False
        self.info = {}
        self.jobs = set()
        self.started_at = self.last_seen = time.monotonic()
        logger.info("render worker started (pid %d), loading %s", self.process.pid, self.config.weights_dir)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def poll(self) -> list[tuple[Any, ...]]:
        """Every message waiting on the pipe (never blocks); [] when the worker is gone."""
        out: list[tuple[Any, ...]] = []
        if self.conn is None:
            return out
        try:
            while self.conn.poll(0):
                message = self.conn.recv()
                self.last_seen = time.monotonic()
                if message[0] == "heartbeat":
                    continue
                if message[0] == "ready":
                    self.ready = True
                    self.info = message[1]
                elif message[0] in ("done", "stopped", "failed"):
                    self.jobs.discard(message[1])
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
        self.conn.send(("run", order))

    def stop_job(self, job_id: str, reason: str) -> None:
        if job_id in self.jobs and self.conn is not None:
            try:
                self.conn.send(("stop", job_id, reason))
            except (BrokenPipeError, OSError):
                pass

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit (its jobs stop at a step boundary); kill it after `timeout_s`."""
        if self.process is None:
            return
        try:
            self.conn.send(("exit",))
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


def _fields(config: WorkerConfig) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(config, f.name) for f in fields(config)}
