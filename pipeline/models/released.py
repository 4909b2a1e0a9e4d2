"""Released `.pth` encoder checkpoints (CLIP, umT5) into transformers models built on meta, and
the expected shapes every loader (the DiT's too) checks a file against.

The two encoders share the whole path from file to model: read the `.pth` (memory-mapped when its
format allows), rename its keys (each module's own `map_state_dict`) and refuse a mapping that
leaves a tensor unused, a parameter unfilled or a shape wrong, naming them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def load_pth(file: Path) -> dict[str, Tensor]:
    """A `.pth` state dict on the CPU; memory-mapped unless the file is in the legacy format."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of `model` (built on meta) with its shape: what a file must fill."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_mapping(
    source: str,
    what: str,
    mapped: dict[str, Tensor],
    expected: dict[str, tuple[int, ...]],
    *,
    unmapped: list[str],
    filled: set[str],
) -> None:
    """Raise naming the file's keys no parameter takes (`unmapped`), the parameters `filled`
    leaves out, and the mapped tensors whose shape is not the model's. `what`: "CLIP weights
    do not match ClipConfig" and the like."""
    missing = sorted(set(expected) - filled)
    wrong = sorted(k for k in mapped if k in expected and tuple(mapped[k].shape) != expected[k])
    if unmapped or missing or wrong:
        raise RuntimeError(
            f"{source}: {what}: unmapped {sorted(unmapped)[:8]} ({len(unmapped)}), "
            f"missing {missing[:8]} ({len(missing)}), wrong shape "
            f"{[(k, tuple(mapped[k].shape), expected[k]) for k in wrong[:8]]} ({len(wrong)})"
        )
