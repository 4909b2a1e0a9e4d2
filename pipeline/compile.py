"""Regional `torch.compile`: compile the DiT's repeated block, not the whole model.

The 40 blocks share one code object, so with `inline_inbuilt_nn_modules` (the default since
PyTorch 2.5) the block is traced once per input shape and the graph is reused by every block
(parameters are graph inputs). Shapes are static (`dynamic=False`): one compile per resolution
bucket, about 10-20 s each on an H100, then fused element-wise work (modulation, norms, fp32
RoPE, fp8 activation quantisation) around the GEMM and attention kernels.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

#: compiled graphs kept per code object: one per (bucket shape, speakers, dtype) combination
CACHE_SIZE_LIMIT = 64


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's repeated blocks: the module list its class names in `REPEATED_BLOCK`
    (`InfiniteTalkDiT.REPEATED_BLOCK`, as diffusers' `_repeated_blocks`), else `model.blocks`."""
    return getattr(model, getattr(model, "REPEATED_BLOCK", "blocks"), None)


def compile_blocks(model: nn.Module, *, mode: str | None = None) -> int:
    """Compile every repeated block of `model` in place (regional compilation). Returns the count."""
    blocks = repeated_blocks(model)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to compile")
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE_LIMIT)
    limit = getattr(torch._dynamo.config, "accumulated_cache_size_limit", 0)
    if limit:
        torch._dynamo.config.accumulated_cache_size_limit = max(limit, 4 * CACHE_SIZE_LIMIT)
    for block in blocks:
        block.compile(dynamic=False, fullgraph=False, mode=mode)
    logger.info("torch.compile: %d blocks (regional, static shapes, mode=%s)", len(blocks), mode)
    return len(blocks)


def uncompile_blocks(model: nn.Module) -> None:
    """Undo `compile_blocks`: the blocks run eagerly again (the compiled graphs stay cached)."""
    for block in repeated_blocks(model) or ():
        block._compiled_call_impl = None


def is_compiled(model: nn.Module) -> bool:
    blocks = repeated_blocks(model) or ()
    return len(blocks) > 0 and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)


def graph_breaks() -> int:
    """Graph breaks dynamo has counted in this process (0 means every block is one graph)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


__all__ = ["compile_blocks", "graph_breaks", "is_compiled", "repeated_blocks", "uncompile_blocks"]
