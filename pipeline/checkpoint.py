"""Chunk checkpoints: what a render needs to resume after its last finished chunk.

A checkpoint folder holds, for one render:

    state.json                the commit point (written last, atomically): fingerprint of the
                              request and model, next chunk, frames written, segment files,
                              name of the tensors file
    tensors_<k>.safetensors   after chunk k: the motion frames [3, M, H, W] float32 (the last
                              colour-corrected frames, what chunk k+1 is conditioned on) and the
                              noise generator's state (uint8)
    seg_<k>.mp4               chunk k's new frames, H.264 (the partial encoded video)
    poster.jpg, audio.wav     the poster frame and the mixed original audio

Resuming restores the generator and the motion frames, so the remaining chunks draw the same
noise and see the same conditioning as in an uninterrupted render: the output is identical.
A checkpoint whose fingerprint does not match the request is ignored and cleared.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

STATE_FILE = "state.json"
FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkState:
    fingerprint: str
    next_chunk: int  # index of the first chunk still to render (0-based, over all segments)
    frames_written: int
    segments: tuple[str, ...]  # segment file names, in order
    tensors: str  # file holding "motion" and "rng"
    poster: str | None = None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save(folder: Path, state: ChunkState, *, motion: Tensor, rng_state: Tensor) -> None:
    """Persist the state after a finished chunk (tensors first, state.json last)."""
    folder = Path(folder)
    tensors = folder / state.tensors
    tmp = tensors.with_name(f".{tensors.name}.tmp")
    save_file(
        {"motion": motion.detach().float().cpu().contiguous(), "rng": rng_state.cpu().contiguous()}, str(tmp)
    )
    tmp.replace(tensors)
    doc = {"format": FORMAT, **asdict(state), "segments": list(state.segments)}
    _atomic_write_bytes(folder / STATE_FILE, json.dumps(doc, indent=2).encode())
    for old in folder.glob("tensors_*.safetensors"):
        if old.name != state.tensors:
            old.unlink(missing_ok=True)


def load(folder: Path, fingerprint: str) -> tuple[ChunkState, Tensor, Tensor] | None:
    """The saved state, motion frames and generator state, or None when there is no usable
    checkpoint for this fingerprint (then the folder's old render files are removed)."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        state = ChunkState(
            fingerprint=doc["fingerprint"],
            next_chunk=int(doc["next_chunk"]),
            frames_written=int(doc["frames_written"]),
            segments=tuple(doc["segments"]),
            tensors=doc["tensors"],
            poster=doc.get("poster"),
        )
        ok = doc.get("format") == FORMAT and state.fingerprint == fingerprint
        ok = ok and all((folder / s).is_file() for s in state.segments) and (folder / state.tensors).is_file()
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        clear(folder)
        return None
    tensors = load_file(str(folder / state.tensors))
    return state, tensors["motion"], tensors["rng"].to(torch.uint8)


def clear(folder: Path) -> None:
    """Remove a render's checkpoint files (the folder itself stays)."""
    folder = Path(folder)
    for pattern in (STATE_FILE, "tensors_*.safetensors", "seg_*.mp4", "poster.jpg", ".*.tmp", "*.tmp.mp4"):
        for p in folder.glob(pattern):
            p.unlink(missing_ok=True)
