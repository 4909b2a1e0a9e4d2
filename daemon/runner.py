"""The render worker: a child process (started with `spawn`) that holds the model and runs jobs.

The daemon starts it once; it loads the pipeline once, says `ready`, and then runs up to
`max_running` jobs at a time, each in its own thread sharing the one resident model. The
pipeline serialises the GPU-heavy denoising through a lock it is given (`gpu_lock`), so the CPU
stages of one job (media decode, audio features, encoding, muxing) overlap another job's GPU
work. A CUDA fault kills at most this process; the daemon notices and starts a fresh one.

Messages, over one duplex `multiprocessing` pipe (the daemon is the only ledger writer):

    daemon -> worker   ("run", RunOrder) | ("stop", job_id, reason) | ("exit",)
    worker -> daemon   ("ready", info) | ("progress", job_id, dict) | ("done", job_id, dict)
                       | ("stopped", job_id, reason) | ("failed", job_id, dict) | ("fatal", message)
                       | ("heartbeat",) every `heartbeat_s`, from its own thread, from start-up on
                         (loading included), whatever the jobs do: a worker that falls silent is
                         stopped (SIGSTOP) or hung, and the daemon kills it after `worker_stall_s`
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.errors import is_disk_full

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


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOrder:
    """One job for the worker: the request plus where to write."""

    job_id: str
    request: Any  # pipeline.types.GenerationRequest
    out_path: Path
    poster_path: Path
    checkpoint_dir: Path
    attempt: int = 1
    #: (path, sha256) of each claimed input: checked before every attempt (`verify_inputs`)
    inputs: tuple[tuple[str, str], ...] = ()


class _Channel:
    """The worker's end of the pipe; sends are locked because job threads share it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, *message: Any) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, EOFError, OSError):
                os._exit(0)  # the daemon is gone: nothing left to report to


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def load_pipeline(config: WorkerConfig) -> Any:
    """Build the pipeline named by `config.factory` (default: InfiniteTalkPipeline.from_weights)."""
    if config.write_tiny:
        write_tiny_once(config.weights_dir)
    if config.factory:
        module_name, _, attr = config.factory.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        return target(config)
    from pipeline.pipeline import InfiniteTalkPipeline

    device = resolve_device(config.device)
    kwargs: dict[str, Any] = {"device": device, "dtype": resolve_dtype(config.dtype, device)}
    params = inspect.signature(InfiniteTalkPipeline.from_weights).parameters
    perf = dict(config.perf)
    optional = {
        "quant": None if config.quant == "none" else config.quant,
        "attention": config.attention,
        "lora_scale": config.lora_scale,
        "lora": list(config.lora) or None,
        "gpu_memory_gib": perf.pop("gpu_memory_gib", "auto"),
        "max_running": config.max_running,
    }
    for key, value in optional.items():
        if key in params and value is not None:
            kwargs[key] = value
    if device.startswith("cuda") and "perf" in params:
        from pipeline.perf import PerfConfig

        perf.pop("warmup", None)
        fp8 = config.quant in ("fp8", "auto")  # auto: the pipeline turns fp8 off where it picks none
        perf["fp8_attention"] = resolve_fp8_attention(str(perf.get("fp8_attention", "auto")), fp8, device)
        kwargs["perf"] = PerfConfig(attention=config.attention, fp8=fp8, **perf)  # type: ignore[arg-type]
    pipe = InfiniteTalkPipeline.from_weights(config.weights_dir, **kwargs)
    if config.warmup and callable(getattr(pipe, "warmup", None)):
        logging.getLogger(__name__).info("warm-up forward took %.1f s", pipe.warmup())
    return pipe


def resolve_fp8_attention(setting: str, fp8: bool, device: str) -> bool:
    """The `[performance] fp8_attention` setting for this worker: "auto" is on with fp8 weights
    where cuDNN fp8 attention can run (logged either way), "on" is on (the load fails with the
    reason when it cannot run), "off" is off."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"fp8_attention must be auto, on or off, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    if not fp8:
        return False
    from pipeline.models.attention_fp8 import unavailable_reason

    reason = unavailable_reason(device, test_run=True)
    logging.getLogger(__name__).info("fp8 attention: %s", "on" if reason is None else f"off ({reason})")
    return reason is None


def write_tiny_once(folder: Path) -> None:
    """Write tiny random weights into `folder` (via a temporary sibling, then rename)."""
    if (folder / "tiny.json").is_file():
        return
    import shutil

    from pipeline.tiny import write_tiny_weights

    tmp = folder.with_name(f".{folder.name}.writing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tiny_weights(tmp, seed=0)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    logger.warning("wrote a tiny random-weight model to %s", folder)


def classify(exc: BaseException) -> tuple[str, bool, bool]:
    """(error code, transient?, worker must exit?) for an exception raised by a render."""
    name = type(exc).__name__
    text = str(exc)
    if name == "OutOfMemoryError" or "CUDA out of memory" in text:
        return "cuda_oom", True, False
    if is_disk_full(exc):  # ENOSPC, EDQUOT, wrapped in shutil.Error, SQLITE_FULL, chained
        return "disk_full", True, False
    if "CUDA error" in text or name in ("AcceleratorError", "CudaError"):
        return "cuda_error", True, True  # the CUDA context may be poisoned: start a fresh process
    if name == "GroupBroken":  # pipeline.parallel_pipeline: a rank died; rebuild the whole group
        return "worker_group_broken", True, True
    if isinstance(exc, InputChanged):
        return "input_changed", False, False
    if isinstance(exc, (ValueError, FileNotFoundError, KeyError)):
        return "bad_input", False, False
    return "render_error", False, False


class InputChanged(Exception):
    """A claimed input no longer has the hash recorded when it was claimed: never rendered."""


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
        channel.send("heartbeat")
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
        channel.send("fatal", f"loading the model failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return
    info = describe(pipe, config)
    info["load_s"] = round(time.monotonic() - started, 3)
    channel.send("ready", info)
    Worker(pipe, channel, config).serve(conn)


def describe(pipe: Any, config: WorkerConfig) -> dict[str, Any]:
    info: dict[str, Any] = {
        "weights_dir": str(config.weights_dir),
        "quant": config.quant,
        "lora": list(config.lora),
        "lora_scale": config.lora_scale,
        "attention": config.attention,
        "pid": os.getpid(),
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

    def __init__(self, pipe: Any, channel: _Channel, config: WorkerConfig) -> None:
        self.pipe = pipe
        self.channel = channel
        self.config = config
        self.gpu_lock = threading.Lock()
        self.stops: dict[str, tuple[threading.Event, list[str]]] = {}
        self.threads: dict[str, threading.Thread] = {}
        params = inspect.signature(pipe.generate).parameters
        self.accepts = set(params)

    def serve(self, conn: Any) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                os._exit(0)
            kind = message[0]
            if kind == "run":
                self.start(message[1])
            elif kind == "stop":
                entry = self.stops.get(message[1])
                if entry is not None:
                    entry[1].append(message[2])
                    entry[0].set()
            elif kind == "exit":
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
        from pipeline.types import StopRequested

        last = [0.0]

        def on_progress(progress: Any) -> None:
            now = time.monotonic()
            final = progress.stage == "done" or (
                progress.step == progress.num_steps and progress.stage == "denoise"
            )
            if now - last[0] >= 0.25 or final:
                last[0] = now
                self.channel.send(
                    "progress", order.job_id, {**asdict(progress), "progress": progress.fraction}
                )
            if stop.is_set():
                raise StopRequested(self._reason(order.job_id))

        started = time.monotonic()
        try:
            order.out_path.parent.mkdir(parents=True, exist_ok=True)
            order.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            verify_inputs(order.inputs)
            result = self._render(order, on_progress, stop)
        except StopRequested:
            self.channel.send("stopped", order.job_id, self._reason(order.job_id))
        except BaseException as e:  # noqa: BLE001 - the worker's one broad handler: classify, report
            code, transient, fatal = classify(e)
            self.channel.send(
                "failed",
                order.job_id,
                {
                    "code": code,
                    "transient": transient,
                    "message": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=20),
                    "log_tail": _log_tail(order.job_id),
                },
            )
            if fatal:
                time.sleep(0.2)
                os._exit(70)
        else:
            info = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
            info["render_s"] = round(time.monotonic() - started, 3)
            self.channel.send("done", order.job_id, info)
        finally:
            self.stops.pop(order.job_id, None)
            self.threads.pop(order.job_id, None)

    def _render(self, order: RunOrder, on_progress: Any, stop: threading.Event) -> Any:
        """CPU preparation outside the GPU lock, the model's chunk loop inside it.

        With a pipeline that splits `prepare` (media decode, speech, audio features) from
        `render` (the chunk loop), one job prepares while another holds the GPU. A pipeline
        taking `gpu_lock` itself gets it; any other runs `generate` as is.
        """
        pipe = self.pipe
        if "gpu_lock" in self.accepts:
            return pipe.generate(
                order.request,
                order.out_path,
                on_progress=on_progress,
                should_stop=stop.is_set,
                checkpoint_dir=order.checkpoint_dir,
                poster_path=order.poster_path,
                gpu_lock=self.gpu_lock,
            )
        if callable(getattr(pipe, "prepare", None)) and callable(getattr(pipe, "render", None)):
            on_progress_stage(on_progress, "prepare")
            prepared = pipe.prepare(order.request, order.checkpoint_dir)
            if stop.is_set():
                from pipeline.types import StopRequested

                raise StopRequested(self._reason(order.job_id))
            with self.gpu_lock:
                return pipe.render(
                    prepared,
                    order.out_path,
                    poster_path=order.poster_path,
                    on_progress=on_progress,
                    should_stop=stop.is_set,
                    resume=True,
                )
        kwargs = {
            k: v
            for k, v in {
                "poster_path": order.poster_path,
                "should_stop": stop.is_set,
                "checkpoint_dir": order.checkpoint_dir,
            }.items()
            if k in self.accepts
        }
        return pipe.generate(order.request, order.out_path, on_progress=on_progress, **kwargs)

    def _reason(self, job_id: str) -> str:
        entry = self.stops.get(job_id)
        return entry[1][0] if entry and entry[1] else "stop"
