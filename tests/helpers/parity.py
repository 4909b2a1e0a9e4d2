"""The parity fixtures (`tests/fixtures/parity/`, made by `tools/parity/` from the reference code)
and how tests compare against them.

Imports only torch, numpy and safetensors, so `scripts/test-oldest` can run the tests that use it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "parity"


def read_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of `tests/fixtures/parity/<name>.safetensors`."""
    with safe_open(str(FIXTURES / f"{name}.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """The relative L2 error of `a` against `b`, in float64; the shapes must match."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).norm() / b.norm())


def load_tool(name: str) -> ModuleType:
    """One of the fixture scripts, `tools/parity/<name>.py`, imported by path (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "parity" / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render_capturing(pipe: Any, request: Any, out: Path) -> tuple[Any, list[torch.Tensor]]:
    """`pipe.generate(request, out)` -> (its result, the latents of each chunk as handed to the
    VAE decoder: what the reference's fixtures hold). `pipe` is an `InfiniteTalkPipeline`."""
    captured: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def capture(latents: torch.Tensor) -> torch.Tensor:
        captured.append(latents.clone())
        return decode(latents)

    pipe.vae.decode = capture
    try:
        result = pipe.generate(request, out)
    finally:
        pipe.vae.decode = decode
    return result, captured
