"""The user-facing names of the speed settings, torch-free (for daemon/config.py and the CLIs).

`ATTENTION` is the one list of attention kernels a user may name (`attention` in the config,
`infinitetalk bench --attention`, `pipeline.perf.PerfConfig.attention`); the kernels behind the
names live in `pipeline.models.attention`. `FP8_ATTENTION` is the `[performance] fp8_attention`
and `--fp8-attention` setting, resolved in one place: `pipeline.perf.resolve_fp8_attention`.
`FP8_SCALING` is the `[performance] fp8_scaling` / `--fp8-scaling` setting (`pipeline.quant`).
"""

from __future__ import annotations

from typing import Literal, get_args

AttentionName = Literal["auto", "sdpa", "cudnn", "flash"]
#: the attention settings a user picks from ("fa4" is what "auto"/"flash" become where
#: FlashAttention 4 runs; "fp8" is the `fp8_attention` setting, not a name)
ATTENTION: tuple[AttentionName, ...] = get_args(AttentionName)

Fp8AttentionSetting = Literal["auto", "on", "off"]
FP8_ATTENTION: tuple[Fp8AttentionSetting, ...] = get_args(Fp8AttentionSetting)

Fp8ScalingName = Literal["row", "tensor"]
FP8_SCALING: tuple[Fp8ScalingName, ...] = get_args(Fp8ScalingName)

__all__ = [
    "ATTENTION",
    "FP8_ATTENTION",
    "FP8_SCALING",
    "AttentionName",
    "Fp8AttentionSetting",
    "Fp8ScalingName",
]
