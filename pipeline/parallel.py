"""Sequence parallelism of the DiT across the processes of one torch.distributed group (Ulysses).

Shape legend (as in pipeline/models/dit.py): B batch, F latent frames, S = h·w tokens per latent
frame, L = F·S tokens, N heads, Dh head dim, P = group size; rank r holds frames
[start_r, start_r + F_r) and so L_r = F_r·S tokens.

How one forward is split (every rank runs the same `InfiniteTalkDiT.forward` with the full inputs;
`model.sequence_parallel = SequenceParallel(group)` switches the split on):

* after the patch embedding each rank keeps whole latent frames (F split as evenly as possible,
  earlier ranks get the extra frame), with the matching rows of the 3-D RoPE table;
* self-attention: q, k, v [B, L_r, N, Dh] are exchanged in one all-to-all so each rank holds the
  full sequence for N/P heads [B, L, N/P, Dh]; attention runs on that; a second all-to-all
  brings the output back to [B, L_r, N, Dh] (DeepSpeed-Ulysses; N % P == 0);
* cross-attention, the FFN, the modulation and the head are per token: local;
* audio cross-attention is per latent frame, and frames are never split: local;
* two speakers: the region map needs the post-RoPE keys of latent frame 0, which rank 0 holds;
  they are broadcast (S·N·Dh values per block), each rank computes the map for its own tokens
  with all heads, and the per-region min/max used to normalise it are reduced over the group;
* the head output [B, L_r, p·C] is all-gathered so every rank returns the full velocity (the
  sampler then runs identically everywhere; rank 0 writes the video).

Collectives are PyTorch's own (`torch.distributed`: NCCL on CUDA, gloo on CPU). The methods
called inside a block are excluded from torch.compile (`torch.compiler.disable`): a compiled
block runs as compiled graphs around them, with the same results (checked on the CPU).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.models.attention import Kernel


def frame_split(frames: int, parts: int) -> tuple[int, ...]:
    """Latent frames per rank: as even as possible, earlier ranks first (21 over 2 -> (11, 10))."""
    if parts < 1:
        raise ValueError(f"the group size must be >= 1, got {parts}")
    if frames < parts:
        raise ValueError(f"{frames} latent frames cannot be split over {parts} ranks (each needs >= 1 frame)")
    base, extra = divmod(frames, parts)
    return tuple(base + (1 if r < extra else 0) for r in range(parts))


def check_degree(num_heads: int, degree: int) -> None:
    """Ulysses needs the heads to split evenly: 40 heads -> 1, 2, 4, 5, 8, 10, 20, 40."""
    if degree < 1 or num_heads % degree:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"sequence-parallel degree {degree} does not divide the {num_heads} heads; use one of {valid}"
        )


@dataclass
class CommStats:
    """Wall time spent in collectives (seconds, synchronised on CUDA when `timing` is on)."""

    timing: bool = False
    seconds: float = 0.0
    calls: int = 0
    bytes_sent: int = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes_sent = 0.0, 0, 0


@dataclass
class SequenceParallel:
    """The Ulysses split of one DiT forward over `group` (default: the whole world).

    Set `model.sequence_parallel = SequenceParallel(...)` on every rank; all ranks then call the
    model with identical inputs and get identical outputs.
    """

    group: Any = None
    stats: CommStats = field(default_factory=CommStats)
    _plan: tuple[tuple[int, int, int], tuple[int, ...]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call init_process_group (see pipeline.parallel)"
            )
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)

    # -- the token plan ----------------------------------------------------------------------

    def frames(self, grid: tuple[int, int, int]) -> tuple[int, ...]:
        if self._plan is None or self._plan[0] != grid:
            self._plan = (grid, frame_split(grid[0], self.size))
        return self._plan[1]

    def tokens_per_rank(self, grid: tuple[int, int, int]) -> tuple[int, ...]:
        s = grid[1] * grid[2]
        return tuple(n * s for n in self.frames(grid))

    def local_frames(self, grid: tuple[int, int, int]) -> slice:
        """This rank's latent frames."""
        frames = self.frames(grid)
        start = sum(frames[: self.rank])
        return slice(start, start + frames[self.rank])

    def shard(
        self, tokens: Tensor, rope: tuple[Tensor, ...], grid: tuple[int, int, int]
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[int, int, int]]:
        """tokens [B, L, D], rope tables [L, 1, pairs] -> this rank's [B, L_r, D], [L_r, 1, pairs], grid."""
        frames = self.frames(grid)
        s = grid[1] * grid[2]
        start = sum(frames[: self.rank]) * s
        stop = start + frames[self.rank] * s
        local_grid = (frames[self.rank], grid[1], grid[2])
        return tokens[:, start:stop], tuple(t[start:stop] for t in rope), local_grid

    def gather(self, local: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, L_r, X] from every rank -> [B, L, X] (padded to the largest share for the collective)."""
        counts = self.tokens_per_rank(grid)
        most = max(counts)
        padded = local
        if local.shape[1] < most:
            padded = torch.cat(
                [local, local.new_zeros(local.shape[0], most - local.shape[1], *local.shape[2:])], 1
            )
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self._timed(
            lambda: dist.all_gather(parts, padded.contiguous(), group=self.group),
            padded.numel() * padded.element_size(),
        )
        return torch.cat([p[:, :n] for p, n in zip(parts, counts, strict=True)], dim=1)

    # -- self-attention ----------------------------------------------------------------------

    @torch.compiler.disable
    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int, int], kernel: Kernel
    ) -> Tensor:
        """q, k, v [B, L_r, N, Dh] (this rank's tokens, all heads) -> [B, L_r, N, Dh].

        `grid` is the full token grid. One all-to-all gathers the sequence for N/P heads, attention
        runs over the whole sequence, a second all-to-all returns this rank's tokens for all heads.
        """
        b, lr, n, d = q.shape
        check_degree(n, self.size)
        counts = self.tokens_per_rank(grid)
        if lr != counts[self.rank]:
            raise ValueError(
                f"rank {self.rank} holds {lr} tokens, the plan for grid {grid} gives {counts[self.rank]}"
            )
        hp = n // self.size
        # [3, B, L_r, N, Dh] -> [P, 3, B, L_r, N/P, Dh]: chunk j goes to rank j
        send = torch.stack((q, k, v)).view(3, b, lr, self.size, hp, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        unit = 3 * b * hp * d
        recv = send.new_empty(sum(counts) * unit)
        self._all_to_all(recv, send.view(-1), [c * unit for c in counts], [lr * unit] * self.size)
        chunks = [
            c.view(3, b, cnt, hp, d)
            for c, cnt in zip(recv.split([c * unit for c in counts]), counts, strict=True)
        ]
        full = torch.cat(chunks, dim=2)  # [3, B, L, N/P, Dh]
        out = kernel(full[0], full[1], full[2])  # [B, L, N/P, Dh]
        unit = b * hp * d
        back = torch.cat([o.reshape(-1) for o in out.split(list(counts), dim=1)])
        mine = out.new_empty(self.size * lr * unit)
        self._all_to_all(mine, back, [lr * unit] * self.size, [c * unit for c in counts])
        # [P, B, L_r, N/P, Dh] -> [B, L_r, N, Dh] (rank j's heads are j·N/P ... (j+1)·N/P - 1)
        return mine.view(self.size, b, lr, hp, d).permute(1, 2, 0, 3, 4).reshape(b, lr, n, d)

    @torch.compiler.disable
    def first_frame_keys(self, k: Tensor, s: int) -> Tensor:
        """Post-RoPE keys of latent frame 0 [B, S, N, Dh], sent from rank 0 (which holds them)."""
        keys = k[:, :s].contiguous() if self.rank == 0 else k.new_empty(k.shape[0], s, *k.shape[2:])
        self._timed(
            lambda: dist.broadcast(keys, group_src=0, group=self.group), keys.numel() * keys.element_size()
        )
        return keys

    @torch.compiler.disable
    def bounds(self, hi: Tensor, lo: Tensor) -> tuple[Tensor, Tensor]:
        """Per-region max / min of the speaker map over every rank's tokens (exact: max of values)."""
        both = torch.cat([hi.float(), -lo.float()], dim=-1)
        self._timed(lambda: dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group), both.numel() * 4)
        return both[..., :1].to(hi.dtype), (-both[..., 1:]).to(lo.dtype)

    # -- collectives -------------------------------------------------------------------------

    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        self._timed(
            lambda: dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group),
            inp.numel() * inp.element_size(),
        )

    def _timed(self, fn: Callable[[], object], nbytes: int) -> None:
        self.stats.calls += 1
        self.stats.bytes_sent += nbytes
        if not self.stats.timing:
            fn()
            return
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        self.stats.seconds += time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# process groups


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendezvous:
    """Where the processes of one group meet (torchrun's variables; see `from_env`)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @classmethod
    def from_env(cls) -> Rendezvous | None:
        """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), if set."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        try:
            return cls(
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
                master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(os.environ.get("MASTER_PORT", "29500")),
            )
        except ValueError as exc:
            raise ValueError(f"bad torchrun environment: {exc}") from exc


def free_port() -> int:
    """A TCP port free on this host now (for a single-host rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_group(
    rdv: Rendezvous,
    *,
    backend: str | None = None,
    timeout_s: float = 600.0,
    device: torch.device | str | None = None,
) -> torch.device:
    """Join the default process group; returns this rank's device.

    backend None: NCCL when CUDA is available, else gloo. device None: cuda:local_rank with NCCL,
    the CPU with gloo.
    """
    import datetime

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"process group backend must be 'nccl' or 'gloo', got {backend!r}")
    if device is not None:
        device = torch.device(device)
    elif backend == "nccl":
        if rdv.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {rdv.local_rank} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        device = torch.device("cuda", rdv.local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{rdv.master_addr}:{rdv.master_port}",
        rank=rdv.rank,
        world_size=rdv.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    return device


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], nprocs: int, args: tuple[Any, ...] = ()) -> None:
    """Run `fn(rank, world_size, port, *args)` in `nprocs` fresh processes (torch.multiprocessing).

    `fn` must be importable (module level). Raises if any process fails.
    """
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    mp.spawn(fn, args=(nprocs, free_port(), *args), nprocs=nprocs, join=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class RankGroup:
    """This process's place in a sequence-parallel render (see `join_from_env`)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the outputs; the other ranks compute and discard."""
        return self.rank == 0

    def attach(self, dit: Any) -> None:
        """Switch the DiT's forward to the Ulysses split over the default group."""
        check_degree(dit.cfg.num_heads, self.world_size)
        dit.sequence_parallel = SequenceParallel()


def join_from_env(device: str) -> RankGroup | None:
    """Join the torchrun-style group described by the environment (RANK, WORLD_SIZE, ...), if any.

    `device` is the requested one ("cuda", "cuda:N" or "cpu"): CUDA ranks use NCCL and
    cuda:LOCAL_RANK, CPU ranks gloo. Returns None when the environment names no group of 2+.
    """
    rdv = Rendezvous.from_env()
    if rdv is None or rdv.world_size < 2:
        return None
    backend = "nccl" if device.startswith("cuda") else "gloo"
    return RankGroup(rank=rdv.rank, world_size=rdv.world_size, device=init_group(rdv, backend=backend))


def spawn_ranks(fn: Callable[..., None], nprocs: int, args: tuple[Any, ...] = ()) -> None:
    """`fn(*args)` in `nprocs` processes with torchrun's environment set (RANK, LOCAL_RANK, ...).

    For commands that join with `join_from_env`; raises if any rank fails.
    """
    spawn(_with_rank_env, nprocs, (fn, args))


def _with_rank_env(
    rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        fn(*args)
    finally:
        close_group()


def check_launch(weights_dir: Any, degree: int, device: str) -> None:
    """Refuse a sequence-parallel launch that cannot work, before any process starts.

    The degree must divide the model's heads (read from the weights folder) and, on CUDA, not
    exceed the visible GPUs.
    """
    from pipeline.config import load_model_config

    check_degree(load_model_config(weights_dir).dit.num_heads, degree)
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        visible = torch.cuda.device_count()
        if degree > visible:
            raise ValueError(f"{degree} GPUs asked for, {visible} visible")
