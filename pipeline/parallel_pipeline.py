"""One render over several GPUs for a long-lived process: `GroupPipeline` (latency mode).

The calling process is rank 0; it starts N-1 follower processes (`python -m
pipeline.parallel_pipeline`), each loading the whole pipeline on its own device, and all join one
torch.distributed group whose DiT forwards are split by `pipeline.parallel.SequenceParallel`.
`GroupPipeline` is a `pipeline.types.Renderer` (and has `InfiniteTalkPipeline.generate`), so a
render worker holds it like a one-GPU pipeline (`from_worker_config` is the daemon's factory hook).

Per job, rank 0 sends the request to the followers over a gloo control group (which may wait
idle for days), then every rank runs `generate` with the same request; rank 0 writes the outputs,
followers write to a scratch folder. Two agreements keep the ranks in step:

* stop: at every step each rank's `should_stop` becomes the OR over the group (an all-reduce of
  the flag), so all ranks raise `StopRequested` at the same step;
* resume: before a job, rank 0's checkpoint folder is copied to each follower's, so all ranks
  resume from the same chunk;
* job end: `generate` returns on rank 0 only after every follower has finished and removed its
  checkpoint copy.

A follower that dies leaves rank 0 in a collective until the group timeout; the group is then
broken (`GroupBroken`) and the holder should start a new one.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline import parallel

logger = logging.getLogger(__name__)

#: how long the control group may wait between jobs
IDLE_TIMEOUT = datetime.timedelta(days=365)


class GroupBroken(RuntimeError):
    """The process group cannot be used any more (a rank died or timed out)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSpec:
    """What every rank loads (JSON-able: it goes to the followers on their command line)."""

    weights_dir: str
    devices: tuple[str, ...]  # rank r uses devices[r]: "cuda:0", "cuda:1", ... or "cpu"
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    quant: str = "none"
    lora: tuple[str, ...] = ()
    lora_scale: float = 1.0
    attention: str = "auto"
    timeout_s: float = 600.0  # a collective waiting longer than this breaks the group

    def __post_init__(self) -> None:
        if len(self.devices) < 2:
            raise ValueError(f"a GPU group needs 2 or more devices, got {list(self.devices)}")
        kinds = {d.split(":")[0] for d in self.devices}
        if len(kinds) != 1 or kinds - {"cuda", "cpu"}:
            raise ValueError(f"group devices must all be cuda:N or all cpu, got {list(self.devices)}")
        if self.quant != "none":
            raise ValueError(f"quant = {self.quant!r} is not supported across GPUs yet (use none)")

    @property
    def backend(self) -> str:
        return "nccl" if self.devices[0].startswith("cuda") else "gloo"


def load_rank_pipeline(spec: GroupSpec, rank: int) -> Any:
    """The whole InfiniteTalk pipeline on `spec.devices[rank]`, its DiT split over the group."""
    from pipeline.loading import LoadOptions, load_pipeline

    opts = LoadOptions(
        device=spec.devices[rank],
        dtype=spec.dtype,
        quant="none",  # fp8 is not supported across GPUs yet (GroupSpec refuses it)
        lora=tuple(spec.lora) or "auto",
        lora_scale=spec.lora_scale,
        attention=spec.attention,
        gpu_memory_gib=None,  # each rank keeps its whole stack resident (no memory plan)
    )
    pipe = load_pipeline(Path(spec.weights_dir), opts)
    parallel.check_degree(pipe.dit.cfg.num_heads, len(spec.devices))
    pipe.dit.sequence_parallel = parallel.SequenceParallel()
    return pipe


@dataclass
class _Control:
    """The gloo group for orders and agreements (CPU tensors, long timeout)."""

    group: Any = None

    def any(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, group_src=0, group=self.group)
        return box[0]


def _join(spec: GroupSpec, rank: int, port: int) -> _Control:
    rdv = parallel.Rendezvous(rank=rank, world_size=len(spec.devices), local_rank=rank, master_port=port)
    parallel.init_group(rdv, backend=spec.backend, timeout_s=spec.timeout_s, device=spec.devices[rank])
    return _Control(group=dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT))


def _follower_dir(checkpoint_dir: Path, rank: int) -> Path:
    return checkpoint_dir.with_name(f"{checkpoint_dir.name}.rank{rank}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupJob:
    """A prepared job of the group: the request and its work (checkpoint) folder."""

    request: Any
    work_dir: Path


@dataclass
class GroupPipeline:
    """Rank 0 of a GPU group; `generate` renders one request with every rank (one job at a time)."""

    spec: GroupSpec
    pipe: Any = None
    followers: list[subprocess.Popen] = field(default_factory=list)
    control: _Control | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    broken: bool = False

    @classmethod
    def start(cls, spec: GroupSpec) -> GroupPipeline:
        """Start the followers, join the group as rank 0, load the pipeline on `spec.devices[0]`."""
        port = parallel.free_port()
        group = cls(spec=spec)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
        }
        for rank in range(1, len(spec.devices)):
            cmd = [
                sys.executable,
                "-m",
                "pipeline.parallel_pipeline",
                "--rank",
                str(rank),
                "--port",
                str(port),
                "--spec",
                json.dumps(asdict(spec)),
            ]
            group.followers.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
        try:
            group.control = _join(spec, 0, port)
            group.pipe = load_rank_pipeline(spec, 0)
            group.control.broadcast("loaded")  # every rank has its model
        except BaseException:
            group.close()
            raise
        return group

    # the InfiniteTalkPipeline surface a worker uses (a pipeline.types.Renderer)

    @property
    def config(self) -> Any:
        return self.pipe.config

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def describe(self) -> dict[str, Any]:
        info = dict(self.pipe.describe())
        info.update(device=",".join(self.spec.devices), sequence_parallel=len(self.spec.devices))
        return info

    def voice(self, request: Any) -> float:
        """A text-to-speech job's speech, voiced once here before the ranks prepare (they find it)."""
        return float(self.pipe.voice(request))

    def prepare(self, request: Any, work_dir: Path) -> GroupJob:
        """Nothing is computed here: every rank prepares inside `render`, once rank 0 has sent
        them the job (they must all render the same request)."""
        return GroupJob(request=request, work_dir=Path(work_dir))

    def render(
        self,
        prepared: GroupJob,
        out_path: Path,
        *,
        poster_path: Path | None = None,
        on_progress: Callable[[Any], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        resume: bool = True,
    ) -> Any:
        """`generate` with every rank; with `resume`, from the checkpoint in the job's work folder."""
        return self.generate(
            prepared.request,
            out_path,
            poster_path=poster_path,
            on_progress=on_progress,
            should_stop=should_stop,
            checkpoint_dir=prepared.work_dir if resume else None,
        )

    def generate(
        self,
        request: Any,
        out_path: Path,
        *,
        poster_path: Path | None = None,
        on_progress: Callable[[Any], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        checkpoint_dir: Path | None = None,
    ) -> Any:
        from pipeline.types import StopRequested

        if self.broken or self.control is None:
            raise GroupBroken("the GPU group is broken; start a new one")
        with self.lock:
            stop_seen = [False]

            def report(progress: Any) -> None:  # a stop raised here is deferred to the agreed check
                if on_progress is None:
                    return
                try:
                    on_progress(progress)
                except StopRequested:
                    stop_seen[0] = True

            control = self.control

            def agreed_stop() -> bool:
                local = stop_seen[0] or (should_stop is not None and bool(should_stop()))
                return control.any(local)

            if checkpoint_dir is not None:
                checkpoint_dir = Path(checkpoint_dir)
                for rank in range(1, len(self.spec.devices)):
                    target = _follower_dir(checkpoint_dir, rank)
                    shutil.rmtree(target, ignore_errors=True)
                    if checkpoint_dir.is_dir():
                        shutil.copytree(checkpoint_dir, target)
            try:
                self.control.broadcast(("generate", request, str(checkpoint_dir) if checkpoint_dir else None))
                return self.pipe.generate(
                    request,
                    out_path,
                    poster_path=poster_path,
                    on_progress=report,
                    should_stop=agreed_stop,
                    checkpoint_dir=checkpoint_dir,
                )
            except (RuntimeError, dist.DistBackendError) as e:
                if (
                    isinstance(e, dist.DistBackendError)
                    or "gloo" in str(e).lower()
                    or "nccl" in str(e).lower()
                ):
                    self.broken = True
                    raise GroupBroken(f"GPU group lost during the render: {e}") from e
                raise
            finally:
                if not self.broken:
                    self.control.any(False)  # the followers have finished and cleaned up too

    def close(self) -> None:
        """Tell the followers to exit and leave the group."""
        if self.control is not None and not self.broken:
            try:
                self.control.broadcast(("exit",))
            except Exception:  # noqa: BLE001 - the followers may already be gone
                pass
        for proc in self.followers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.followers = []
        parallel.close_group()
        self.control = None


def from_worker_config(config: Any) -> GroupPipeline:
    """The daemon's factory hook (`WorkerConfig.factory`): `config.device` lists the group's devices
    separated by commas ("cuda:0,cuda:1")."""
    spec = GroupSpec(
        weights_dir=str(config.weights_dir),
        devices=tuple(d.strip() for d in config.device.split(",")),
        dtype=config.dtype,
        quant="none" if config.quant == "auto" else config.quant,  # auto: none across GPUs
        lora=tuple(config.lora),
        lora_scale=config.lora_scale,
        attention=config.attention,
    )
    if getattr(config, "write_tiny", False):
        from pipeline.weights_layout import write_tiny_once

        write_tiny_once(Path(config.weights_dir))
    return GroupPipeline.start(spec)


# ----------------------------------------------------------------------------------------------
# the follower process


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def follow(spec: GroupSpec, rank: int, port: int) -> int:
    """Rank `rank` >= 1: load, then run every order rank 0 broadcasts until it says exit."""
    from pipeline.types import StopRequested

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0's holder decides when to stop
    control = _join(spec, rank, port)
    pipe = load_rank_pipeline(spec, rank)
    control.broadcast(None)
    scratch = Path(tempfile.mkdtemp(prefix=f"infinitetalk-rank{rank}-"))
    try:
        while True:
            order = control.broadcast(None)
            if order[0] == "exit":
                return 0
            _, request, checkpoint_dir = order
            ckpt = _follower_dir(Path(checkpoint_dir), rank) if checkpoint_dir else None
            try:
                pipe.generate(
                    request, scratch / "out.mp4", should_stop=lambda: control.any(False), checkpoint_dir=ckpt
                )
            except StopRequested:
                pass
            except (ValueError, FileNotFoundError) as e:  # the same bad input fails on rank 0 too
                logger.info("rank %d: render refused: %s", rank, e)
            finally:
                if ckpt is not None:
                    shutil.rmtree(ckpt, ignore_errors=True)
                control.any(False)  # job end: rank 0 returns only after this
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        parallel.close_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one follower rank of a GroupPipeline (started by rank 0)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spec", required=True, help="GroupSpec as JSON")
    args = p.parse_args(argv)
    data = json.loads(args.spec)
    spec = GroupSpec(**{**data, "devices": tuple(data["devices"]), "lora": tuple(data["lora"])})
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s rank{args.rank} %(levelname)s %(name)s: %(message)s",
    )
    return follow(spec, args.rank, args.port)


if __name__ == "__main__":
    sys.exit(main())
