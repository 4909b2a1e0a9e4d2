"""Weights that do not stay on the GPU: DiT block streaming and components moved in for use.

BlockSwap: the first `resident` DiT blocks stay on the device; every other block keeps its
tensors in one page-locked host buffer (its parameters are views into it, so `state_dict()` and
the official key names are unchanged) and is computed by one of `slots` device copies of the
block. Block i+1's weights are copied into the next slot on a side CUDA stream while block i
computes; events order the copy after the slot's previous user and the compute after the copy,
so nothing in the block loop waits on the host (no synchronous `.to()`). The DiT asks for its
blocks through `BlockSwap.order()` once per forward, or once per step for all guidance passes
(`InfiniteTalkDiT.forward_passes`), so the passes of a step share one copy of each block.

On the CPU the same code runs with host-to-host copies and no streams (the tests use it to show
bit-identical outputs against the resident model).

OnDemand: a component (CLIP, umT5) whose weights live in pinned host memory and are copied to
the device for one use (`with shuttle.use(): ...`); afterwards the device copies are dropped
(the weights never change, so nothing is copied back).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ALIGN = 256  # byte alignment of each tensor inside a block's flat buffer


@dataclass(frozen=True, slots=True)
class _Entry:
    module: str  # dotted path inside the block ("" for the block itself)
    name: str
    kind: str  # "param" | "buffer"
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _tensors(block: nn.Module) -> list[tuple[str, str, str, Tensor]]:
    out = []
    for mod_name, module in block.named_modules():
        for name, p in module._parameters.items():
            if p is not None:
                out.append((mod_name, name, "param", p))
        for name, b in module._buffers.items():
            if b is not None:
                out.append((mod_name, name, "buffer", b))
    return out


def _layout(block: nn.Module) -> tuple[list[_Entry], int]:
    entries, offset = [], 0
    for mod_name, name, kind, t in _tensors(block):
        nbytes = t.numel() * t.element_size()
        entries.append(_Entry(mod_name, name, kind, offset, nbytes, t.dtype, tuple(t.shape)))
        offset += -(-nbytes // ALIGN) * ALIGN
    return entries, offset


def _bind(block: nn.Module, entries: list[_Entry], flat: Tensor) -> None:
    """Point every tensor of `block` at its slice of the byte buffer `flat` (no copy)."""
    for e in entries:
        module = block.get_submodule(e.module) if e.module else block
        view = flat[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
        if e.kind == "param":
            module._parameters[e.name] = nn.Parameter(view, requires_grad=False)
        else:
            module._buffers[e.name] = view


def _fill(block: nn.Module, entries: list[_Entry], flat: Tensor) -> None:
    """Copy `block`'s current tensors into `flat` (in layout order)."""
    for e, (_, _, _, t) in zip(entries, _tensors(block), strict=True):
        flat[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape).copy_(t.detach())


def _empty_block(block: nn.Module) -> nn.Module:
    """A structural copy of `block` with its tensors on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for _, _, kind, t in _tensors(block):
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if kind == "param" else meta
    clone = copy.deepcopy(block, memo)
    clone._compiled_call_impl = None  # a compiled wrapper would call the original block
    return clone


def mirror_settings(source: nn.Module, target: nn.Module) -> None:
    """Copy the plain per-instance settings (attention kernels, scaled-mm flags, compute dtypes)
    and the compiled state of `source`'s modules onto the same modules of `target`."""
    plain = (bool, int, float, str, torch.dtype)
    for (_, src), (_, dst) in zip(source.named_modules(), target.named_modules(), strict=True):
        for key, value in vars(src).items():
            setting = isinstance(value, plain) or (callable(value) and not isinstance(value, nn.Module))
            wanted = not key.startswith("_") and key != "training" and setting
            if wanted and getattr(dst, key, None) != value:
                setattr(dst, key, value)
    compiled = getattr(source, "_compiled_call_impl", None) is not None
    if compiled and getattr(target, "_compiled_call_impl", None) is None:
        target.compile(dynamic=False, fullgraph=False)
    elif not compiled:
        target._compiled_call_impl = None


class _NoStream:
    """Stand-in for CUDA streams and events on the CPU (copies are synchronous there)."""

    def wait_event(self, event: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def record_event(self, event: Any = None) -> None:
        pass


class BlockSwap:
    """Stream DiT blocks `resident..n-1` from pinned host memory through `slots` device buffers."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        *,
        resident: int,
        device: torch.device | str,
        slots: int = 2,
        pin: bool | None = None,
        pool: dict[Any, Any] | None = None,
    ) -> None:
        """`pool`: host buffers (by block index) and device slots to reuse, filled again by
        `detach`, so a benchmark that re-plans neither page-locks the same memory again nor
        compiles new slot modules."""
        device = torch.device(device)
        n = len(blocks)
        if not 0 <= resident < n:
            raise ValueError(f"resident blocks must be in 0..{n - 1} to stream any, got {resident}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.blocks = blocks
        self.device = device
        self.resident = resident
        self.swapped = tuple(range(resident, n))
        self.cuda = device.type == "cuda"
        pin = self.cuda if pin is None else pin
        self.entries, self.block_bytes = _layout(blocks[resident])
        self._check_layouts()
        self.pool = pool
        self.host = self._host_buffers(pin)
        for i in range(resident):
            blocks[i].to(device)
        self.slots, self.slot_flat = self._device_slots(slots)
        self.holds: list[int | None] = [None] * len(self.slots)
        self._events()
        self.bytes_copied = 0  # host-to-device bytes so far (the bench reports them per forward)
        self.copies = 0
        logger.info(
            "block swap: %d of %d DiT blocks streamed from %s host memory through %d slots of %.2f GB",
            len(self.swapped),
            n,
            "pinned" if pin else "pageable",
            len(self.slots),
            self.block_bytes / 1e9,
        )

    def _check_layouts(self) -> None:
        """Every streamed block must fit the first one's layout (they share the slots)."""
        for i in self.swapped:
            entries, size = _layout(self.blocks[i])
            if size != self.block_bytes or [(e.dtype, e.shape) for e in entries] != [
                (e.dtype, e.shape) for e in self.entries
            ]:
                raise ValueError(
                    f"block {i} differs in layout from block {self.resident}: cannot share slots"
                )

    def _host_buffers(self, pin: bool) -> dict[int, Tensor]:
        """One (pinned) host buffer per streamed block; the block's tensors become views of it."""
        host: dict[int, Tensor] = {}
        for i in self.swapped:
            flat = self.pool.pop(i) if self.pool is not None and i in self.pool else None
            if flat is None or flat.numel() != self.block_bytes:
                flat = torch.empty(self.block_bytes, dtype=torch.uint8, pin_memory=pin)
            _fill(self.blocks[i], self.entries, flat)
            _bind(self.blocks[i], self.entries, flat)
            host[i] = flat
        return host

    def _device_slots(self, slots: int) -> tuple[list[nn.Module], list[Tensor]]:
        """The device slot modules and their flat buffers (reused from the pool when they fit)."""
        modules: list[nn.Module] = []
        flats: list[Tensor] = []
        reuse = self.pool.pop("slots", ([], [])) if self.pool is not None else ([], [])
        for k in range(min(slots, len(self.swapped))):
            if k < len(reuse[1]) and reuse[1][k].numel() == self.block_bytes:
                slot, flat = reuse[0][k], reuse[1][k]
            else:
                flat = torch.empty(self.block_bytes, dtype=torch.uint8, device=self.device)
                slot = _empty_block(self.blocks[self.resident])
                _bind(slot, self.entries, flat)
            modules.append(slot)
            flats.append(flat)
        return modules, flats

    def _events(self) -> None:
        """The copy stream and, per slot, the events `ready` (copy done) and `free` (user done)."""
        if self.cuda:
            self.copy_stream: Any = torch.cuda.Stream(self.device)
            self.ready: list[Any] = [torch.cuda.Event() for _ in self.slots]
            self.free: list[Any] = [torch.cuda.Event() for _ in self.slots]
        else:
            self.copy_stream = _NoStream()
            self.ready = [_NoStream() for _ in self.slots]
            self.free = [_NoStream() for _ in self.slots]

    @property
    def device_bytes(self) -> int:
        return len(self.slots) * self.block_bytes

    @property
    def host_bytes(self) -> int:
        return len(self.swapped) * self.block_bytes

    def _load(self, block: int, slot: int) -> None:
        """Queue the copy of `block` into `slot` (after the slot's last user is done)."""
        if self.holds[slot] == block:
            return
        self.holds[slot] = block
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])
                self.slot_flat[slot].copy_(self.host[block], non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        else:
            self.slot_flat[slot].copy_(self.host[block])
        self.bytes_copied += self.block_bytes
        self.copies += 1

    def order(self) -> Iterator[nn.Module]:
        """The modules computing blocks 0..n-1, in order. Ask for the next one only after the
        current block's work has been queued: that is when its slot is released and refilled."""
        compute = torch.cuda.current_stream(self.device) if self.cuda else _NoStream()
        k = len(self.slots)
        for j in range(min(k, len(self.swapped))):
            self._load(self.swapped[j], j % k)
        for slot in self.slots:
            mirror_settings(self.blocks[self.resident], slot)
        for i in range(self.resident):
            yield self.blocks[i]
        for j, block in enumerate(self.swapped):
            s = j % k
            if self.holds[s] != block:  # a slot can only be refilled once its user is queued
                raise RuntimeError(f"internal: slot {s} holds block {self.holds[s]}, not {block}")
            compute.wait_event(self.ready[s])
            yield self.slots[s]
            self.free[s].record(compute)
            if j + k < len(self.swapped):
                self._load(self.swapped[j + k], s)

    def detach(self) -> None:
        """Move every block back onto the device (undo the swap; needs the memory)."""
        for i in self.swapped:
            self.blocks[i].to(self.device)
        if self.pool is not None:
            self.pool.update(self.host)
            self.pool["slots"] = (list(self.slots), list(self.slot_flat))
        self.host.clear()
        self.slots.clear()
        self.slot_flat.clear()


class OnDemand:
    """A module kept in (pinned) host memory and copied onto `device` only inside `use()`."""

    def __init__(self, module: nn.Module, device: torch.device | str, *, pin: bool | None = None) -> None:
        self.module = module
        self.device = torch.device(device)
        pin = self.device.type == "cuda" if pin is None else pin
        self.host: list[tuple[nn.Module, str, str, Tensor]] = []
        for mod_name, name, kind, t in _tensors(module):
            owner = module.get_submodule(mod_name) if mod_name else module
            cpu = t.detach().to("cpu")
            if pin:
                cpu = cpu.pin_memory()
            self._set(owner, name, kind, cpu)
            self.host.append((owner, name, kind, cpu))
        self.bytes = sum(t.numel() * t.element_size() for *_, t in self.host)
        self.bytes_copied = 0

    @staticmethod
    def _set(owner: nn.Module, name: str, kind: str, t: Tensor) -> None:
        if kind == "param":
            owner._parameters[name] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[name] = t

    @contextlib.contextmanager
    def use(self) -> Iterator[nn.Module]:
        """The module with its weights on the device, for the duration of the block."""
        for owner, name, kind, cpu in self.host:
            self._set(owner, name, kind, cpu.to(self.device, non_blocking=True))
        self.bytes_copied += self.bytes
        try:
            yield self.module
        finally:
            for owner, name, kind, cpu in self.host:
                self._set(owner, name, kind, cpu)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for *_, t in _tensors(module))


__all__ = ["BlockSwap", "OnDemand", "mirror_settings", "module_bytes"]
