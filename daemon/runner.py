"""The render worker: a child process (started with `spawn`) that holds the model and runs jobs.

The daemon starts it once; it loads the pipeline once, sends `Ready`, and then runs up to
`max_running` jobs at a time, each in its own thread sharing the one resident model (a
`pipeline.types.Renderer`). Each job's `prepare` (media decode, speech, audio features) runs
outside the worker's GPU lock and its `render` inside it, so the CPU stage of one job overlaps
another job's GPU work. A CUDA fault kills at most this process; the daemon notices and starts a fresh one.

It talks to the daemon over one duplex `multiprocessing` pipe (the daemon is the only ledger
writer) in the typed messages of `daemon.protocol`, whose docstring holds the message grammar;
it sends a `Heartbeat` every `heartbeat_s` from a thread of its own, from start-up on.
What a failure means (`classify`) is `daemon.policy`'s.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.policy import InputChanged, classify
from daemon.protocol import (
    Exit,
    Failed,
    Fatal,
    Finished,
    Heartbeat,
    Progressed,
    Ready,
    RunOrder,
    StopJob,
    Stopped,
    WorkerMessage,
)
from pipeline.types import Renderer, StopRequested
from pipeline.weights_layout import write_tiny_once

if TYPE_CHECKING:
    from pipeline.loading import LoadOptions

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
#: CUDA caching-allocator setting of the render worker (and `infinitetalk bench`)
ALLOC_CONF = "expandable_segments:True"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """What the worker needs to load the model (picklable: it crosses the spawn boundary)."""

    weights_dir: Path
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "none"
    lora: tuple[str, ...] = ()
    lora_scale: float = 1.0
    attention: str = "auto"
    #: [performance] settings (pipeline.perf.PerfConfig fields but attention/fp8), used on CUDA
    perf: tuple[tuple[str, object], ...] = ()
    #: run one DiT forward after loading, before the worker reports ready
    warmup: bool = True
    max_running: int = 3
    #: "module:callable" building the pipeline from this config; empty: the real InfiniteTalk one
    factory: str = ""
    log_level: str = "info"
    parent_pid: int = 0
    #: weights_dir holds no weights: write a tiny random-weight model there first
    write_tiny: bool = False
    #: seconds between two heartbeats to the daemon
    heartbeat_s: float = 2.0


class _Channel:
    """The worker's end of the pipe; sends are locked because job threads share it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: WorkerMessage) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, EOFError, OSError):
                os._exit(0)  # the daemon is gone: nothing left to report to


def load_pipeline(config: WorkerConfig) -> Renderer[Any]:
    """Build the pipeline named by `config.factory` (default: InfiniteTalk, loaded as
    `pipeline.loading` says); it must be a `pipeline.types.Renderer`."""
    if config.write_tiny and write_tiny_once(config.weights_dir):
        logger.warning("wrote a tiny random-weight model to %s", config.weights_dir)
    if config.factory:
        module_name, _, attr = config.factory.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        pipe = target(config)
    else:
        from pipeline.loading import load_pipeline as load

        pipe = load(config.weights_dir, load_options(config))
    if not isinstance(pipe, Renderer):
        what = config.factory or "the pipeline"
        raise TypeError(f"{what} gave {type(pipe).__name__}, not a pipeline.types.Renderer")
    return pipe


def load_options(config: WorkerConfig) -> LoadOptions:
    """The worker's settings as `pipeline.loading.LoadOptions` (as `infinitetalk render` makes them)."""
    from pipeline.loading import LoadOptions

    return LoadOptions.from_strings(
        device=config.device,
        dtype=config.dtype,
        quant=config.quant,
        lora=config.lora,
        lora_scale=config.lora_scale,
        attention=config.attention,
        perf=dict(config.perf),
        max_running=config.max_running,
        warmup=config.warmup,
    )


def verify_inputs(inputs: tuple[tuple[str, str], ...]) -> None:
    """What is rendered must be exactly what was claimed and hashed: each input is opened without
    following a link (and only if it is a regular file) and its sha256 compared with the claim's."""
    from daemon.jobs import sha256_file

    for path, expected in inputs:
        try:
            actual = sha256_file(Path(path))
        except OSError as e:
            raise InputChanged(f"claimed input {path} cannot be read as claimed: {e}") from e
        if actual != expected:
            raise InputChanged(
                f"claimed input {path} changed since it was claimed (sha256 {actual} != {expected})"
            )


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(1.0)


def _send_heartbeats(channel: _Channel, interval_s: float) -> None:
    while True:
        channel.send(Heartbeat())
        time.sleep(interval_s)


def _log_tail(job_id: str) -> list[str]:
    from daemon.failures import log_tail

    return log_tail(job_id)


def worker_main(conn: Any, config: WorkerConfig) -> None:
    """Entry point of the worker process."""
    # Before torch starts CUDA: far less fragmentation when the memory plan runs close to its
    # budget (measured: docs/benchmarks.md section 5); a value set by the operator wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    # Die with the daemon (kill -9 included): a render must never outlive its supervisor.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if config.parent_pid:
        threading.Thread(target=_watch_parent, args=(config.parent_pid,), daemon=True).start()
    # Ctrl-C reaches the whole process group; the daemon decides how its jobs stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from daemon.logs import configure_logging

    configure_logging(config.log_level, tag="worker")
    from daemon.failures import install_log_tail

    install_log_tail()  # the last lines of each job go with its failure (daemon/failures.py)
    channel = _Channel(conn)
    threading.Thread(
        target=_send_heartbeats, args=(channel, config.heartbeat_s), name="heartbeat", daemon=True
    ).start()
    started = time.monotonic()
    try:
        pipe = load_pipeline(config)
    except BaseException as e:  # noqa: BLE001 - reported to the daemon, which decides
        channel.send(Fatal(f"loading the model failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    info = describe(pipe, config)
    info["load_s"] = round(time.monotonic() - started, 3)
    channel.send(Ready(info))
    Worker(pipe, channel, config).serve(conn)


def describe(pipe: Any, config: WorkerConfig) -> dict[str, Any]:
    info: dict[str, Any] = {
        "weights_dir": str(config.weights_dir),
        "quant": config.quant,
        "lora": list(config.lora),
        "lora_scale": config.lora_scale,
        "attention": config.attention,
        "pid": os.getpid(),
        # the host it renders on (a Ray actor overrides `node` with host and node id)
        "hostname": socket.gethostname(),
        "node": socket.gethostname(),
    }
    extra = getattr(pipe, "describe", None)
    if callable(extra):
        info.update(extra())
    generation = getattr(getattr(pipe, "config", None), "generation", None)
    if generation is not None:
        info["frame_num"] = generation.frame_num
    if "device" not in info:
        info["device"] = str(getattr(pipe, "device", config.device))
    try:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and info["device"].startswith("cuda"):
            info.setdefault("gpu", torch.cuda.get_device_name())
    except Exception:  # noqa: BLE001 - describing the GPU is best effort
        pass
    info.setdefault("gpu", None)
    return info


def on_progress_stage(on_progress: Any, stage: str) -> None:
    """Report a stage with no chunk/step position yet (e.g. preparing the inputs)."""
    from pipeline.types import Progress

    on_progress(
        Progress(stage=stage, chunk=0, num_chunks=0, step=0, num_steps=0, frames_done=0, total_frames=0)
    )


class Worker:
    """Runs orders in threads sharing one pipeline; GPU stages serialised by `gpu_lock`."""

    def __init__(self, pipe: Renderer[Any], channel: _Channel, config: WorkerConfig) -> None:
        self.pipe = pipe
        self.channel = channel
        self.config = config
        self.gpu_lock = threading.Lock()
        self.stops: dict[str, tuple[threading.Event, list[str]]] = {}
        self.threads: dict[str, threading.Thread] = {}

    def serve(self, conn: Any) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                os._exit(0)
            match message:
                case RunOrder():
                    self.start(message)
                case StopJob(job_id, reason):
                    entry = self.stops.get(job_id)
                    if entry is not None:
                        entry[1].append(reason)
                        entry[0].set()
                case Exit():
                    for event, reasons in self.stops.values():
                        reasons.append("shutdown")
                        event.set()
                    for thread in list(self.threads.values()):
                        thread.join()
                    return

    def start(self, order: RunOrder) -> None:
        stop = threading.Event()
        self.stops[order.job_id] = (stop, [])
        thread = threading.Thread(
            target=self._run, args=(order, stop), name=f"job-{order.job_id}", daemon=True
        )
        self.threads[order.job_id] = thread
        thread.start()

    def _run(self, order: RunOrder, stop: threading.Event) -> None:
        last = [0.0]

        def on_progress(progress: Any) -> None:
            now = time.monotonic()
            final = progress.stage == "done" or (
                progress.step == progress.num_steps and progress.stage == "denoise"
            )
            if now - last[0] >= 0.25 or final:
                last[0] = now
                self.channel.send(Progressed(order.job_id, progress))
            if stop.is_set():
                raise StopRequested(self._reason(order.job_id))

        started = time.monotonic()
        try:
            order.out_path.parent.mkdir(parents=True, exist_ok=True)
            order.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            verify_inputs(order.inputs)
            result = self._render(order, on_progress, stop)
        except StopRequested:
            self.channel.send(Stopped(order.job_id, self._reason(order.job_id)))
        except BaseException as e:  # noqa: BLE001 - the worker's one broad handler: classify, report
            failure = classify(e)
            self.channel.send(
                Failed(
                    order.job_id,
                    failure,
                    f"{type(e).__name__}: {e}",
                    traceback.format_exc(limit=20),
                    tuple(_log_tail(order.job_id)),
                )
            )
            if failure.poisons_worker:
                time.sleep(0.2)
                os._exit(70)
        else:
            self.channel.send(Finished(order.job_id, result, round(time.monotonic() - started, 3)))
        finally:
            self.stops.pop(order.job_id, None)
            self.threads.pop(order.job_id, None)

    def _render(self, order: RunOrder, on_progress: Any, stop: threading.Event) -> Any:
        """The one call path of a `pipeline.types.Renderer`: `prepare` (media decode, speech,
        audio features) outside the GPU lock, so one job prepares while another renders, then
        `render` (the chunk loop) inside it, resuming from the job's chunk checkpoint."""
        pipe = self.pipe
        voice = getattr(pipe, "voice", None)  # a pipeline that voices a job's text (tts)
        if getattr(order.request, "tts", None) is not None and callable(voice):
            on_progress_stage(on_progress, "tts")  # voicing the text: its own stage, outside the GPU lock
            voice(order.request)
        on_progress_stage(on_progress, "prepare")
        prepared = pipe.prepare(order.request, order.checkpoint_dir)
        with self._gpu(order.job_id, stop):
            return pipe.render(
                prepared,
                order.out_path,
                poster_path=order.poster_path,
                on_progress=on_progress,
                should_stop=stop.is_set,
                resume=True,
            )

    @contextlib.contextmanager
    def _gpu(self, job_id: str, stop: threading.Event) -> Iterator[None]:
        """Hold the GPU lock; a stop asked for before or while waiting for it stops the job."""
        while not stop.is_set():
            if self.gpu_lock.acquire(timeout=0.1):
                break
        else:
            raise StopRequested(self._reason(job_id))
        try:
            yield
        finally:
            self.gpu_lock.release()

    def _reason(self, job_id: str) -> str:
        entry = self.stops.get(job_id)
        return entry[1][0] if entry and entry[1] else "stop"
