"""The render workers as Ray actors (`[cluster] executor = "ray"`, docs/scaling.md): a second
`daemon.pool.WorkerPool`, so the daemon's loop, ledger and retry policy stay as they are.

- One long-lived `RenderActor` per GPU of the cluster (`num_gpus` each; 0: CPU actors of 1 CPU
  each), as many as the cluster's resources hold, more when nodes join. Each loads the pipeline
  once (`load`, which is the worker's READY) and keeps it resident.
- A job goes to an actor as bytes through the object store: the files of its input folder and
  of its chunk checkpoint folder on the head. The actor renders in a folder of its own and
  streams back (a Ray streaming generator) progress, after each finished chunk the files of the
  checkpoint that changed, and at the end the encoded video and poster. The daemon writes each
  checkpoint into the job's state folder as it arrives, so the head always holds the latest
  resumable state; nothing needs a shared filesystem.
- Ray retries nothing (`max_restarts=0`, `max_task_retries=0`): a lost node or dead actor is a
  `WorkerDied` of the jobs it held (a transient failure: they resume from their last received
  chunk on another actor), and the pool replaces the actor itself (the new one waits for room,
  e.g. for the node to come back).
- Each dispatch has a token (attempt number and a serial); a message of an older dispatch (a
  stale actor) is dropped, never written or published.
- Cancel and stop reach the actor through `stop`, a flag its render checks at every step
  boundary; the daemon's SIGTERM stops the jobs so, then kills the actors (they are not reused).

This module is the only one of the daemon that imports `ray`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import ray
from ray.exceptions import RayError, RayTaskError

from daemon import chunk_nodes
from daemon.cluster import EX_CONFIG, EX_UNAVAILABLE, ClusterError
from daemon.config import Settings
from daemon.policy import classify
from daemon.pool import MAX_START_FAILURES, WorkerState
from daemon.protocol import Event, Failed, Finished, Progressed, Ready, RunOrder, Stopped, WorkerDied
from daemon.runner import WorkerConfig, verify_inputs
from pipeline.types import Progress, RenderResult, StopRequested

logger = logging.getLogger(__name__)

#: how often the pool looks for room for more actors (a node that joined)
CAPACITY_CHECK_S = 5.0
#: checkpoint files still being written (never sent)
_PARTIAL = (".tmp", ".tmp.mp4")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The files of the job's checkpoint folder that changed (`files`), and every file it holds
    now (`keep`: the others are removed on the head once the new files are in place)."""

    token: str
    files: dict[str, bytes]
    keep: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Output:
    """The finished render: its result (paths on the actor), the encoded video and poster."""

    token: str
    result: RenderResult
    video: bytes
    poster: bytes | None
    render_s: float


@dataclass(frozen=True, slots=True)
class Job:
    """One dispatch: the order (paths on the head) and its token."""

    order: RunOrder
    token: str


#: an input file as it travels: its bytes and its mtime (ns)
InputFile = tuple[bytes, int]


def job_folder(job_id: str) -> Path:
    """Where an actor puts a job's inputs: the same path on every node and for every attempt, and
    the inputs keep their mtimes, so the pipeline's checkpoint fingerprint (request, input paths,
    sizes, mtimes) is the same wherever the job resumes."""
    return Path(tempfile.gettempdir()) / "infinitetalk-ray" / job_id


def localize(
    order: RunOrder, work: Path, inputs: dict[str, InputFile], checkpoint: dict[str, bytes]
) -> RunOrder:
    """The order with its inputs under `job_folder`, its checkpoint and output under `work` (this
    dispatch's folder), the files written there."""
    head_inputs = order.checkpoint_dir.parent / "input"
    local_inputs = job_folder(order.job_id) / "input"
    for name, (data, mtime_ns) in inputs.items():
        path = local_inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.ray-tmp")
        tmp.write_bytes(data)
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        tmp.replace(path)
    _write_tree(work / "checkpoint", checkpoint)
    (work / "out").mkdir(parents=True, exist_ok=True)

    def move(p: Path | None) -> Path | None:
        if p is None:
            return None
        try:
            return local_inputs / Path(p).relative_to(head_inputs)
        except ValueError:
            return p

    request = dataclasses.replace(
        order.request,
        cond_media=move(order.request.cond_media) or order.request.cond_media,
        audio=tuple(move(a) for a in order.request.audio),
    )
    return dataclasses.replace(
        order,
        request=request,
        out_path=work / "out" / order.out_path.name,
        poster_path=work / "out" / order.poster_path.name,
        checkpoint_dir=work / "checkpoint",
        inputs=(),
    )


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    """Every finished file under `root` by its relative name ({} if there is no such folder)."""
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_PARTIAL)
    }


def read_inputs(root: Path) -> dict[str, InputFile]:
    """The job's input files by relative name, with their mtimes."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_PARTIAL)
    }


def write_checkpoint(folder: Path, cp: Checkpoint) -> None:
    """Apply a streamed checkpoint to the head's folder: each file atomically, `state.json` (the
    commit point of pipeline/checkpoint.py) last, then the files it no longer holds removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(cp.files, key=lambda n: n == "state.json"):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.ray-tmp")
        tmp.write_bytes(cp.files[name])
        tmp.replace(path)
    keep = set(cp.keep)
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith(".") and str(path.relative_to(folder)) not in keep:
            path.unlink(missing_ok=True)


class RenderActor:
    """One resident pipeline on one Ray worker (threaded: `render`, `stop` and `watch` overlap)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker: Any = None
        self.stops: dict[str, tuple[threading.Event, list[str]]] = {}
        self.exiting = threading.Event()

    def load(self) -> dict[str, Any]:
        """Load and warm the pipeline; its `Ready.info`, with the node it runs on."""
        from daemon.failures import install_log_tail
        from daemon.logs import configure_logging
        from daemon.runner import Worker, describe, load_pipeline

        configure_logging(self.config.log_level, tag="ray-worker")
        install_log_tail()
        started = time.monotonic()
        pipe = load_pipeline(self.config)
        # the render call path of the local worker (`Worker._render`: prepare, GPU lock, resume);
        # its pipe channel is never used here: messages go back through the stream
        self.worker = Worker(pipe, cast(Any, None), self.config)
        info = describe(pipe, self.config)
        info["load_s"] = round(time.monotonic() - started, 3)
        node_id = ray.get_runtime_context().get_node_id()
        info.update(
            hostname=socket.gethostname(), node_id=node_id, node=f"{socket.gethostname()}:{node_id[:8]}"
        )
        return info

    def watch(self) -> None:
        """Returns only when the actor exits: the pool's way of noticing a lost actor or node."""
        self.exiting.wait()

    def stop(self, job_id: str, reason: str) -> None:
        entry = self.stops.get(job_id)
        if entry is not None:
            entry[1].append(reason)
            entry[0].set()

    def render(self, job: Job, inputs: dict[str, InputFile], checkpoint: dict[str, bytes]) -> Iterator[Any]:
        """Stream the job: `Progressed`, `Checkpoint` after each finished chunk, then `Output` or
        `Stopped` or `Failed`."""
        job_id = job.order.job_id
        job_folder(job_id).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"attempt-{job.token}-", dir=job_folder(job_id)))
        ended = False
        stop = threading.Event()
        self.stops[job_id] = (stop, [])
        try:
            order = localize(job.order, work, inputs, checkpoint)
            out: queue.Queue[Any] = queue.Queue()
            thread = threading.Thread(target=self._run, args=(order, stop, out, job.token), daemon=True)
            thread.start()
            seen = _snapshot(order.checkpoint_dir)
            while True:
                try:
                    item = out.get(timeout=0.5)
                except queue.Empty:
                    item = None
                now = _snapshot(order.checkpoint_dir)
                if now != seen:
                    changed = [n for n, v in now.items() if seen.get(n) != v]
                    files = {n: (order.checkpoint_dir / n).read_bytes() for n in changed}
                    seen = now
                    yield Checkpoint(job.token, files, tuple(now))
                if item is None:
                    continue
                yield item
                if isinstance(item, Failed) and item.failure.poisons_worker:
                    time.sleep(0.2)
                    os._exit(70)  # a CUDA fault: this process is not trusted any more
                if not isinstance(item, Progressed):
                    ended = isinstance(item, (Output, Failed))
                    return
        finally:
            self.stops.pop(job_id, None)
            shutil.rmtree(work, ignore_errors=True)
            if ended:
                _remove_unless_in_use(job_folder(job_id))

    def _run(self, order: RunOrder, stop: threading.Event, out: queue.Queue[Any], token: str) -> None:
        last = [0.0]
        reasons = self.stops[order.job_id][1]

        def on_progress(progress: Progress) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.25 or progress.stage == "done" or progress.step == progress.num_steps:
                last[0] = now
                out.put(Progressed(order.job_id, progress))
            if stop.is_set():
                raise StopRequested(reasons[0] if reasons else "stop")

        started = time.monotonic()
        try:
            result = self.worker._render(order, on_progress, stop)
            poster = order.poster_path.read_bytes() if order.poster_path.is_file() else None
            render_s = round(time.monotonic() - started, 3)
            out.put(Output(token, result, order.out_path.read_bytes(), poster, render_s))
        except StopRequested:
            out.put(Stopped(order.job_id, reasons[0] if reasons else "stop"))
        except BaseException as e:  # noqa: BLE001 - reported to the daemon, which decides
            from daemon.failures import log_tail

            message = f"{type(e).__name__}: {e}"
            tb = traceback.format_exc(limit=20)
            out.put(Failed(order.job_id, classify(e), message, tb, tuple(log_tail(order.job_id))))


@dataclass
class _Slot:
    """One actor of the pool; `generation` grows each time the actor is replaced."""

    index: int
    actor: Any
    generation: int = 0
    ready: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    #: job id -> its dispatch token
    jobs: dict[str, str] = field(default_factory=dict)


class RayPool:
    """`WorkerPool` over Ray actors; the daemon stays the Ray driver and the only ledger writer."""

    def __init__(self, settings: Settings, config: WorkerConfig, wake: threading.Event) -> None:
        self.settings = settings
        self.cluster = settings.cluster
        self.config = config
        self.wake = wake
        self.isolated: set[str] = set()
        self.slots: list[_Slot] = []
        self.events: queue.Queue[Event] = queue.Queue()
        self.lock = threading.Lock()
        self.serial = 0
        self.start_failures = 0
        self.restart = True
        self.checked = 0.0
        self.actor_class: Any = None
        #: job id -> the token of its newest dispatch: messages of any other are stale
        self.current: dict[str, str] = {}
        #: how many stale messages were dropped (tests, logs)
        self.dropped = 0

    # ------------------------------------------------------------------ start-up

    def start(self) -> None:
        self._connect()
        cpus = 0 if self.cluster.num_gpus > 0 else 1
        self.actor_class = ray.remote(RenderActor).options(
            num_gpus=self.cluster.num_gpus,
            num_cpus=cpus,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=self.settings.max_running + 4,
        )
        self._grow()

    def _connect(self) -> None:
        address = self.cluster.ray_address
        _check_reachable(address)
        # ray.init installs its own SIGTERM/SIGINT handlers (a stack dump, then death): the
        # daemon's (stop at a step boundary, daemon/supervisor.py) are put back after it
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            ray.init(
                address=address,
                namespace=self.cluster.ray_namespace,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(
                f"cannot join the Ray cluster at ray_address = {address!r}: {e}", EX_UNAVAILABLE
            ) from e
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        logger.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())

    def _capacity(self) -> int:
        resources = ray.cluster_resources()
        if self.cluster.num_gpus > 0:
            return int(resources.get("GPU", 0) // self.cluster.num_gpus)
        return int(resources.get("CPU", 0))

    def _grow(self) -> None:
        """One actor per unit of the cluster's capacity (at least one, which waits for room)."""
        with self.lock:
            want = max(1, self._capacity())
            while len(self.slots) < want:
                slot = _Slot(len(self.slots), None)
                self.slots.append(slot)
                self._launch(slot)

    def _launch(self, slot: _Slot) -> None:
        """Start slot's actor (lock held) and the thread that waits for it to load."""
        slot.actor = self.actor_class.remote(self.config)
        slot.ready, slot.info, slot.jobs = False, {}, {}
        args = (slot, slot.generation)
        threading.Thread(
            target=self._follow_actor, args=args, name=f"ray-actor-{slot.index}", daemon=True
        ).start()

    def _follow_actor(self, slot: _Slot, generation: int) -> None:
        try:
            info = ray.get(slot.actor.load.remote())
        except RayTaskError as e:  # the load raised: the model cannot be loaded
            cause = e.cause if e.cause is not None else e
            why = f"the model cannot be loaded on Ray actor {slot.index}: {type(cause).__name__}: {cause}"
            self._lost(slot, generation, e, fatal=why)
            return
        except RayError as e:
            self._lost(slot, generation, e)
            return
        with self.lock:
            if slot.generation != generation:
                return
            slot.ready, slot.info = True, info
            self.start_failures = 0
        logger.info(
            "Ray actor %d ready on node %s (load %.1f s)", slot.index, info.get("node"), info["load_s"]
        )
        self._put(Ready(info))
        try:
            ray.get(slot.actor.watch.remote())
        except RayError as e:
            self._lost(slot, generation, e)

    def _lost(self, slot: _Slot, generation: int, error: BaseException, *, fatal: str | None = None) -> None:
        """The actor of `slot` died or its node was lost: a `WorkerDied` of its jobs, a new actor."""
        with self.lock:
            if slot.generation != generation:
                return  # already handled
            slot.generation += 1
            jobs, was_ready, node = tuple(sorted(slot.jobs)), slot.ready, slot.info.get("node", "?")
            slot.jobs, slot.ready = {}, False
            _kill(slot.actor)
            if len(jobs) > 1:
                self.isolated |= set(jobs)
            self.start_failures = 0 if was_ready else self.start_failures + 1
            if fatal is None and self.start_failures >= MAX_START_FAILURES:
                fatal = f"the Ray actor died {self.start_failures} times before it was ready"
            why = f"the Ray actor on node {node} was lost during this job ({type(error).__name__})"
            logger.warning("Ray actor %d on node %s lost: %s", slot.index, node, str(error).splitlines()[0:1])
            if fatal is None and self.restart:
                self._launch(slot)
        self._put(WorkerDied(slot.index, jobs, was_ready, fatal=fatal, why=why))

    def _put(self, event: Event) -> None:
        self.events.put(event)

    # ------------------------------------------------------------------ jobs

    def free_worker(self) -> int | None:
        with self.lock:
            ready = [(len(s.jobs), s.index) for s in self.slots if s.ready]
        return min(ready)[1] if ready else None

    def any_ready(self) -> bool:
        return self.free_worker() is not None

    def run(self, index: int, order: RunOrder) -> None:
        slot = self.slots[index]
        try:
            verify_inputs(order.inputs)
            inputs = read_inputs(order.checkpoint_dir.parent / "input")
            checkpoint = read_tree(order.checkpoint_dir)
        except Exception as e:  # noqa: BLE001 - the job fails as it would in a local worker
            self._put(Failed(order.job_id, classify(e), f"{type(e).__name__}: {e}"))
            return
        with self.lock:
            self.serial += 1
            token = f"{order.attempt}.{self.serial}"
            for other in self.slots:  # an older dispatch still held elsewhere is stale from now on
                if other is not slot:
                    other.jobs.pop(order.job_id, None)
            slot.jobs[order.job_id] = token
            self.current[order.job_id] = token
            generation = slot.generation
            node = str(slot.info.get("node", "?"))
            stream = slot.actor.render.options(num_returns="streaming").remote(
                Job(order, token), ray.put(inputs), ray.put(checkpoint)
            )
        args = (slot, generation, order, token, stream, node)
        threading.Thread(
            target=self._follow_job, args=args, name=f"ray-job-{order.job_id}", daemon=True
        ).start()

    def _follow_job(
        self, slot: _Slot, generation: int, order: RunOrder, token: str, stream: Any, node: str
    ) -> None:
        """Read one job's stream: write its checkpoints and output, pass its events on. A message
        of a dispatch that is no longer the job's current one (a stale actor) is dropped."""
        chunk = 0
        try:
            for ref in stream:
                message = ray.get(ref)
                if not self._current(slot, order.job_id, token):
                    self.dropped += 1
                    logger.warning(
                        "job %s: dropped a late %s of an older dispatch (token %s, node %s; current: %s)",
                        order.job_id,
                        type(message).__name__,
                        token,
                        node,
                        self.current.get(order.job_id, "none"),
                    )
                    continue
                match message:
                    case Progressed(progress=progress) if progress.chunk >= 1 and progress.chunk != chunk:
                        chunk = progress.chunk  # a chunk started here: this node renders it
                        try:
                            chunk_nodes.record(order.checkpoint_dir.parent, chunk, node, order.attempt)
                        except OSError as e:  # best effort, like progress: the render goes on
                            logger.warning(
                                "job %s: cannot record the node of chunk %d: %s", order.job_id, chunk, e
                            )
                        self._put(message)
                    case Checkpoint():
                        write_checkpoint(order.checkpoint_dir, message)
                    case Output(result=result, video=video, poster=poster, render_s=render_s):
                        order.out_path.parent.mkdir(parents=True, exist_ok=True)
                        order.out_path.write_bytes(video)
                        if poster is not None:
                            order.poster_path.write_bytes(poster)
                        result = dataclasses.replace(
                            result,
                            video_path=order.out_path,
                            poster_path=order.poster_path if poster else None,
                        )
                        self._end(slot, order.job_id, Finished(order.job_id, result, render_s))
                    case Stopped() | Failed():
                        self._end(slot, order.job_id, message)
                    case _:
                        self._put(message)
        except RayError as e:
            self._lost(slot, generation, e)

    def _current(self, slot: _Slot, job_id: str, token: str) -> bool:
        """`token` is the job's newest dispatch and its slot still holds it (not lost meanwhile)."""
        with self.lock:
            return slot.jobs.get(job_id) == token and self.current.get(job_id) == token

    def _end(self, slot: _Slot, job_id: str, event: Event) -> None:
        with self.lock:
            slot.jobs.pop(job_id, None)
            self.current.pop(job_id, None)
        self._put(event)

    def stop(self, job_id: str, why: str) -> None:
        with self.lock:
            actors = [s.actor for s in self.slots if job_id in s.jobs]
        for actor in actors:
            actor.stop.remote(job_id, why)

    def busy(self) -> bool:
        with self.lock:
            return any(s.jobs for s in self.slots)

    def wait(self, timeout_s: float, *, restart: bool = True) -> list[Event]:
        self.restart = restart
        if restart and time.monotonic() - self.checked >= CAPACITY_CHECK_S:
            self.checked = time.monotonic()
            self._grow()
        events: list[Event] = []
        try:
            events.append(self.events.get(timeout=timeout_s))
            while True:
                events.append(self.events.get_nowait())
        except queue.Empty:
            pass
        return events

    # ------------------------------------------------------------------ describing, ending

    def device(self, index: int) -> str:
        info = self.slots[index].info if 0 <= index < len(self.slots) else {}
        return f"{info.get('device', 'ray')} on node {info.get('node', '?')} (Ray actor {index})"

    def info(self, index: int) -> dict[str, Any]:
        with self.lock:
            return dict(self.slots[index].info) if 0 <= index < len(self.slots) else {}

    def describe(self) -> list[WorkerState]:
        with self.lock:
            return [
                WorkerState(
                    index=s.index,
                    device=self.device(s.index),
                    pid=s.info.get("pid"),
                    alive=s.ready,
                    ready=s.ready,
                    jobs=tuple(sorted(s.jobs)),
                    # an actor that has not loaded yet has no node to name
                    info={"node": "(not placed yet)", **s.info},
                )
                for s in self.slots
            ]

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings

    def shutdown(self, timeout_s: float) -> None:
        with self.lock:
            jobs = [(s.actor, j) for s in self.slots for j in s.jobs]
        for actor, job_id in jobs:
            actor.stop.remote(job_id, "shutdown")
        deadline = time.monotonic() + timeout_s
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill()

    def kill(self) -> None:
        self.restart = False
        with self.lock:
            for slot in self.slots:
                slot.generation += 1
                _kill(slot.actor)
        if ray.is_initialized():
            ray.shutdown()


def _remove_unless_in_use(folder: Path) -> None:
    """Remove a job's folder of this host (its inputs) once no dispatch renders in it: an
    actor of a stale attempt that ends must not take the inputs from under the job's current
    attempt on another actor of the same host."""
    if not any(folder.glob("attempt-*")):
        shutil.rmtree(folder, ignore_errors=True)


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except (RayError, ValueError):
        pass


def _check_reachable(address: str) -> None:
    """A host:port address must accept a TCP connection within 5 s, so a
    wrong address is a clear error at once, not a long wait inside `ray.init`."""
    if address in ("", "auto", "local"):
        return
    if address.startswith("ray://"):
        raise ClusterError(
            f"ray_address = {address!r}: Ray Client (ray://) addresses are not supported; run the "
            "daemon on the head node with ray_address = auto or the GCS host:port",
            EX_CONFIG,
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5.0).close()
    except (OSError, ValueError) as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at ray_address = {address!r}: {e}", EX_UNAVAILABLE
        ) from e
