"""fp8 (e4m3) weight-only linear layers, as in the released `quant_models/*_fp8.safetensors`.

The released files were written by optimum-quanto: for every quantized `nn.Linear` named `m`
they hold `m.weight._data` (float8_e4m3fn [out, in]), `m.weight._scale` ([out, 1], one scale per
output row), `m.bias`, and the scalars `m.input_scale` / `m.output_scale` (activations are not
quantized: both are 1). The weight is `_data * _scale`.

`Fp8Linear` keeps the fp8 weight and its per-row scale in memory (half the bytes of bf16).
Its forward dequantizes to the compute dtype and runs a normal matmul (what quanto does), or,
with `use_scaled_mm=True` on a CUDA device with fp8 support, quantizes the activations and calls
`torch._scaled_mm` (faster, slightly different numbers). `scaling` picks how (`FP8_SCALING`):
"row" quantizes each activation row with its own scale and hands both scale vectors to the
row-wise kernel; "tensor" quantizes the whole activation with one scale, runs the tensor-wise
kernel (cuBLASLt, faster on Hopper) on the unscaled fp8 weight and multiplies the output columns
by the weight's per-row scales afterwards (under `torch.compile` that multiply and the bias fuse
into the next element-wise kernel), so the stored weights are the same in both modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.choices import FP8_SCALING
from pipeline.choices import Fp8ScalingName as Fp8Scaling

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
#: quanto's name of the weight type in the quantization map
QUANTO_FP8 = "qfloat8_e4m3fn"
QUANTO_FP8_NAMES = ("qfloat8_e4m3fn", "qfloat8")
#: state-dict suffixes of one quantized linear layer
QUANT_SUFFIXES = ("weight._data", "weight._scale", "input_scale", "output_scale")
__all__ = [
    "FP8",
    "FP8_MAX",
    "FP8_SCALING",
    "QUANTO_FP8",
    "QUANTO_FP8_NAMES",
    "QUANT_SUFFIXES",
    "Fp8Linear",
    "Fp8Scaling",
    "quantize_fp8",
    "replace_module",
]


def quantize_fp8(weight: Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Per-output-row absmax quantization: weight [out, in] -> (data fp8 [out, in], scale [out, 1])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
    data = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return data, scale


class Fp8Linear(nn.Module):
    """A linear layer whose weight is stored as float8 e4m3 with one scale per output row."""

    weight_fp8: Tensor  # [out, in] float8_e4m3fn
    weight_scale: Tensor  # [out, 1]
    bias: Tensor | None  # [out]

    def __init__(
        self, data: Tensor, scale: Tensor, bias: Tensor | None, *, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        if data.dtype != FP8 or data.ndim != 2:
            raise ValueError(
                f"fp8 weight must be float8_e4m3fn [out, in], got {data.dtype} {tuple(data.shape)}"
            )
        if scale.shape != (data.shape[0], 1):
            raise ValueError(f"fp8 scale must be [{data.shape[0]}, 1], got {tuple(scale.shape)}")
        self.in_features = data.shape[1]
        self.out_features = data.shape[0]
        self.compute_dtype = compute_dtype
        self.use_scaled_mm = False
        self.scaling: Fp8Scaling = "row"
        self.register_buffer("weight_fp8", data)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or self.compute_dtype
        return self.weight_fp8.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_scaled_mm and x.is_cuda and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            return self._scaled_mm(x)
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x, self.dequantize(), bias)

    def _scaled_mm(self, x: Tensor) -> Tensor:
        if self.scaling == "tensor":
            return self._scaled_mm_tensorwise(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.float32)
        x_scale = (x2.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        x_fp8 = (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = torch._scaled_mm(
            x_fp8,
            self.weight_fp8.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale.float().t().contiguous(),
            bias=bias,
            out_dtype=self.compute_dtype,
        )
        return out.reshape(*shape[:-1], self.out_features)

    def _scaled_mm_tensorwise(self, x: Tensor) -> Tensor:
        """One activation scale, the tensor-wise kernel, then the weight's row scales and bias."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.float32)
        x_scale = (x2.abs().amax() / FP8_MAX).clamp(min=1e-12)
        x_fp8 = (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out = torch._scaled_mm(
            x_fp8,
            self.weight_fp8.t(),
            scale_a=x_scale,
            scale_b=torch.ones((), dtype=torch.float32, device=x.device),
            out_dtype=self.compute_dtype,
        )
        out = out * self.weight_scale.to(self.compute_dtype).t()
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, compute={self.compute_dtype}, "
            f"scaling={self.scaling}"
        )


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the sub-module at dotted path `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
