"""fp8 tensor-core linear layers for the DiT (e4m3, `torch._scaled_mm`).

`to_fp8(model)` quantises every linear layer of the blocks (per-output-row absmax weight scales,
`pipeline.weights.quantize_linears`) and switches them to real fp8 math: each forward quantises
its activations per row (dynamic scales) and multiplies on the fp8 tensor cores with a bf16
output. Call it after any LoRA merge (the merged weights are what gets quantised). Under
`torch.compile` the activation quantisation fuses into one pass (0.27 ms instead of 1.7 ms for a
32 760 x 5120 input on an H100); without compilation it costs more than the fp8 GEMM saves.

`scaling` ("row", the default, or "tensor": `pipeline.quant.FP8_SCALING`, the
`[performance] fp8_scaling` setting) picks row-wise activation scales with the row-wise kernel,
or one activation scale per call with the tensor-wise kernel and the weight's row scales applied
to the output (docs/benchmarks.md section 6 has the speed and error of both).

Without CUDA fp8 support the layers fall back to dequantise-then-matmul (the weight-only mode of
the released quanto files), so the same model object runs anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.quant import FP8_SCALING, Fp8Linear


def fp8_supported(device: torch.device | str) -> bool:
    """True on CUDA devices with fp8 tensor cores (compute capability 8.9 and newer)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_scaling(scaling: str) -> None:
    if scaling not in FP8_SCALING:
        raise ValueError(f"fp8_scaling must be one of {FP8_SCALING}, got {scaling!r}")


def set_scaled_mm(model: nn.Module, enabled: bool, *, scaling: str = "row") -> int:
    """Turn real fp8 math on or off for every `Fp8Linear` of `model`, with `scaling` ("row" or
    "tensor"). Returns how many layers."""
    check_scaling(scaling)
    count = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.use_scaled_mm = enabled
            module.scaling = scaling  # type: ignore[assignment]
            count += 1
    return count


def to_fp8(model: nn.Module, *, scaled_mm: bool | None = None, scaling: str = "row") -> int:
    """Quantise the blocks' linear layers to fp8 (in place) and enable `_scaled_mm` where possible.

    Layers already `Fp8Linear` (loaded from the released fp8 file) are kept and switched too.
    `scaled_mm=None` enables it when the model's device supports it. Returns the fp8 layer count.
    """
    from pipeline.weights import FP8_RUNTIME_PREFIX, quantize_linears

    check_scaling(scaling)
    quantize_linears(model, prefix=FP8_RUNTIME_PREFIX)
    device = next(model.parameters()).device
    enabled = fp8_supported(device) if scaled_mm is None else scaled_mm
    if enabled and not fp8_supported(device):
        raise ValueError(
            f"fp8 tensor-core math needs a CUDA device of compute capability >= 8.9, got {device}"
        )
    return set_scaled_mm(model, enabled, scaling=scaling)
