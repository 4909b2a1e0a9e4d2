"""Merge a ComfyUI-style LoRA (e.g. lightx2v's 4-step distillation LoRA) into the DiT weights.

Key forms (all under the `diffusion_model.` prefix), as the reference's `WanLoraWrapper` reads them:
    <param path>.lora_down.weight [r, in] + <param path>.lora_up.weight [out, r]
        -> <param path>.weight += scale · (lora_up @ lora_down)
    <param path>.diff    -> <param path>.weight += scale · diff
    <param path>.diff_b  -> <param path>.bias   += scale · diff_b
    <param path>.alpha   -> ignored, as the reference ignores it (no alpha/rank factor; the
                            lightx2v file was extracted for scale 1 with that convention)

Every other key is ignored, as the reference ignores it: keys without the prefix, PEFT-style
`lora_A`/`lora_B`, `diff_m` (modulation diffs some extractions carry), a `lora_up` without its
`lora_down`. Unlike the reference they are not ignored silently: `MergeReport.skipped` lists them
and a warning names how many and which. A target that is not a parameter of the model, a shape
mismatch, or a `lora_down` without its `lora_up` raises `LoraError` listing every such key (the
reference raises there too). LoRA tensors are first rounded to the parameter dtype (as the
reference does), the delta is computed in float32 and added in the parameter dtype. Merge before
any fp8 quantization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

PREFIX = "diffusion_model."

logger = logging.getLogger(__name__)


class LoraError(Exception):
    """The LoRA file does not fit the model; the message lists every bad key."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeReport:
    applied: int  # parameters changed
    skipped: tuple[str, ...]  # keys ignored, as the reference ignores them (alpha, diff_m, PEFT, ...)
    targets: tuple[str, ...]  # the parameter names changed


def read_lora(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def plan_lora(keys: list[str]) -> tuple[dict[str, tuple[str, ...]], list[str], list[str]]:
    """Group LoRA keys by target parameter: ({target: source keys}, ignored keys, bad keys)."""
    targets: dict[str, tuple[str, ...]] = {}
    ignored: list[str] = []
    bad: list[str] = []
    keyset = set(keys)
    for key in keys:
        if not key.startswith(PREFIX):
            ignored.append(key)
            continue
        name = key[len(PREFIX) :]
        if name.endswith(".lora_down.weight"):
            up = key.replace(".lora_down.weight", ".lora_up.weight")
            if up not in keyset:
                bad.append(f"{key} (no matching lora_up)")
            else:
                targets[name.removesuffix(".lora_down.weight") + ".weight"] = (key, up)
        elif name.endswith(".lora_up.weight"):
            if key.replace(".lora_up.weight", ".lora_down.weight") not in keyset:
                ignored.append(key)
        elif name.endswith(".diff_b"):
            targets[name.removesuffix(".diff_b") + ".bias"] = (key,)
        elif name.endswith(".diff"):
            targets[name.removesuffix(".diff") + ".weight"] = (key,)
        else:  # .alpha, .diff_m, lora_A/lora_B, anything else: the reference ignores them too
            ignored.append(key)
    return targets, ignored, bad


@torch.no_grad()
def merge_lora(model: nn.Module, lora: Path | dict[str, Tensor], *, scale: float = 1.0) -> MergeReport:
    """Add the LoRA deltas to `model`'s parameters in place; every key must be used."""
    tensors = read_lora(Path(lora)) if not isinstance(lora, dict) else lora
    targets, ignored, bad = plan_lora(list(tensors))
    params = dict(model.named_parameters())
    deltas: dict[str, Tensor] = {}
    for target, sources in targets.items():
        param = params.get(target)
        if param is None:
            bad.append(f"{', '.join(sources)} (the model has no parameter {target})")
            continue
        parts = [tensors[s].to(param.dtype).to(device=param.device, dtype=torch.float32) for s in sources]
        delta = parts[1] @ parts[0] if len(parts) == 2 else parts[0]
        if delta.shape != param.shape:
            bad.append(f"{', '.join(sources)} (delta {list(delta.shape)} != {target} {list(param.shape)})")
            continue
        deltas[target] = delta
    if bad:
        raise LoraError(f"LoRA does not fit the model: {'; '.join(bad)}")
    if not deltas:
        raise LoraError("LoRA has no lora_down/lora_up, diff or diff_b keys under 'diffusion_model.'")
    for target, delta in deltas.items():
        param = params[target]
        param.add_((delta * scale).to(param.dtype))
    unusual = [k for k in ignored if not k.endswith(".alpha")]
    if unusual:
        shown = ", ".join(sorted(unusual)[:5]) + (", ..." if len(unusual) > 5 else "")
        logger.warning("LoRA: %d key(s) ignored, as the reference ignores them: %s", len(unusual), shown)
    return MergeReport(applied=len(deltas), skipped=tuple(sorted(ignored)), targets=tuple(sorted(deltas)))
