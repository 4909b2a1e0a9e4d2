"""InfiniteTalk generation: models, sampler and the render pipeline.

`import pipeline` and `import pipeline.types` stay light (no torch); the heavy names below are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.types import GenerationRequest, Progress, RenderResult, StopRequested

_LAZY = {
    "InfiniteTalkPipeline": "pipeline.pipeline",
    "Prepared": "pipeline.pipeline",
    "load_model_config": "pipeline.config",
    "ModelConfig": "pipeline.config",
    "MediaError": "pipeline.media",
}

__all__ = ["GenerationRequest", "Progress", "RenderResult", "StopRequested", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
