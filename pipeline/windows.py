"""Where each chunk of a streaming render sits in the audio, and which audio frames it sees.

Frames are video frames at 25 fps; the audio features have one row per video frame (T rows).
A render is a list of chunks of `frame_num` frames (81). Chunk 0 starts at frame 0; every later
chunk starts `frame_num - motion_frame` (72) frames after the previous one and re-generates its
first `motion_frame` frames from the previous chunk's last ones, so it adds 72 new frames.
Chunks are added until one reaches the target length `L = min(max_frame_num, T)`; the last chunk
may run past the audio, whose features are then extended by reflection (the reference's rule:
`miss = end - T + 3` rows, `flip(features[-miss:])`). The video is cut to L frames.

Clip mode, or a cap at or below one chunk, renders chunk 0 only (at most `frame_num` frames).
There is no other cap: a 10-minute audio plans 10 minutes of chunks.

Speech shorter than one chunk (T <= `frame_num`, 3.28 s and less for the released model) is one
chunk cut to T frames. Chunk 0 sees the speech's own rows, clamped to [0, T - 1]: the reference
pads the features only after its first chunk, so its first chunk's windows are clamped, not
mirrored (for T > `frame_num` + 1 the two read the same rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

WINDOW_OFFSETS = (-2, -1, 0, 1, 2)  # audio frames around each video frame


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkPlan:
    """The chunks of one render. `starts[k]` is chunk k's first frame; it writes frames
    `[starts[k] + skip, starts[k] + frame_num)` where skip is 0 for chunk 0 and `motion_frame`
    after, all cut at `total_frames`."""

    starts: tuple[int, ...]
    frame_num: int
    motion_frame: int
    total_frames: int  # frames of the finished video
    audio_frames: int  # T: rows of audio features before padding

    @property
    def num_chunks(self) -> int:
        return len(self.starts)

    @property
    def end(self) -> int:
        """One past the last frame the last chunk generates (the audio is padded up to here)."""
        return self.starts[-1] + self.frame_num

    def new_frames(self, k: int) -> tuple[int, int]:
        """[first, last) output frames chunk k contributes to the video."""
        skip = 0 if k == 0 else self.motion_frame
        start = self.starts[k] + skip
        return min(start, self.total_frames), min(self.starts[k] + self.frame_num, self.total_frames)


def plan_chunks(
    audio_frames: int, *, frame_num: int, motion_frame: int, max_frame_num: int | None, mode: str
) -> ChunkPlan:
    """Plan the chunks for T = `audio_frames` rows of audio features (see the module doc)."""
    if frame_num < 5 or (frame_num - 1) % 4:
        raise ValueError(f"frame_num must be 4n+1 and at least 5, got {frame_num}")
    if not 1 <= motion_frame < frame_num or (motion_frame - 1) % 4:
        raise ValueError(f"motion_frame must be 4n+1 and below frame_num {frame_num}, got {motion_frame}")
    if audio_frames < 1:
        raise ValueError(f"the audio gives {audio_frames} frames at 25 fps; at least one is needed")
    if mode not in ("streaming", "clip"):
        raise ValueError(f"mode must be 'streaming' or 'clip', got {mode!r}")
    if max_frame_num is not None and max_frame_num < 1:
        raise ValueError(f"max_frame_num must be positive, got {max_frame_num}")
    if mode == "clip" or (max_frame_num is not None and max_frame_num <= frame_num):
        total = min(frame_num, audio_frames, max_frame_num or frame_num)  # short speech: cut to it
        return ChunkPlan(
            starts=(0,),
            frame_num=frame_num,
            motion_frame=motion_frame,
            total_frames=total,
            audio_frames=audio_frames,
        )
    target = audio_frames if max_frame_num is None else min(max_frame_num, audio_frames)
    stride = frame_num - motion_frame
    starts = [0]
    while starts[-1] + frame_num < target:
        starts.append(starts[-1] + stride)
    return ChunkPlan(
        starts=tuple(starts),
        frame_num=frame_num,
        motion_frame=motion_frame,
        total_frames=target,
        audio_frames=audio_frames,
    )


def pad_features(features: Tensor, end: int) -> Tensor:
    """Extend per-frame audio features [T, ...] by reflection when a chunk runs to `end` >= T."""
    t = features.shape[0]
    if end < t:
        return features
    miss = end - t + 3
    if miss > t:
        raise ValueError(f"cannot reflect-pad {t} audio frames by {miss}")
    return torch.cat([features, torch.flip(features[-miss:], dims=[0])], dim=0)


def window_indices(start: int, frame_num: int, num_rows: int) -> Tensor:
    """Audio rows seen by each frame of a chunk starting at `start`: long [frame_num, 5], clamped."""
    centres = torch.arange(start, start + frame_num).unsqueeze(1)  # [F, 1]
    offsets = torch.tensor(WINDOW_OFFSETS).unsqueeze(0)  # [1, 5]
    return torch.clamp(centres + offsets, min=0, max=num_rows - 1)  # [F, 5]


def padded_rows(rows: int, end: int) -> int:
    """Rows of the features after `pad_features(features, end)` (without building them)."""
    return rows if end < rows else rows + end - rows + 3


def chunk_audio(features: Tensor, start: int, frame_num: int, end: int | None = None) -> Tensor:
    """One speaker's audio windows for a chunk: [T, K, C] -> [frame_num, 5, K, C].

    With `end` (the plan's end), rows past the audio come from the reflection `pad_features`
    would append, read in place: row T + j is row T - 1 - j. No padded copy is made, so the
    features can stay memory-mapped. Chunk 0 (`start` 0) is clamped to the speech whatever
    `end` says: the reference pads only after its first chunk."""
    rows = features.shape[0]
    total = rows if end is None or start == 0 else padded_rows(rows, end)
    idx = window_indices(start, frame_num, total)  # [F, 5] into the padded rows
    idx = torch.where(idx >= rows, 2 * rows - 1 - idx, idx)  # reflected rows
    return features[idx]
