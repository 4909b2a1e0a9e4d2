"""The DiT on a CUDA device (run with --gpu): reference parity, bf16 and fp8 paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_model_config
from pipeline.quant import Fp8Linear
from pipeline.weights import load_dit
from tests.pipeline.models.test_dit import BF16_BOUND
from tests.pipeline.models.test_dit_parity import INPUTS, RTOL, read_fixture, rel_err
from tests.pipeline.models.test_weights import FP8_BOUND

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def run(model, data) -> torch.Tensor:
    with torch.inference_mode():
        return model(**{k: data[k].cuda() for k in INPUTS}).cpu()


@pytest.mark.parametrize(("name", "variant"), [("dit_single", "single"), ("dit_multi", "multi")])
@pytest.mark.parametrize("rope", ["exact", "fast"])
def test_cuda_float32_matches_reference(tiny_weights_dir: Path, name: str, variant: str, rope: str) -> None:
    cfg = load_model_config(tiny_weights_dir).dit
    data, _ = read_fixture(name)
    model = load_dit(tiny_weights_dir, cfg, variant=variant, device="cuda", dtype=torch.float32, rope=rope)
    assert rel_err(run(model, data), data["out"]) <= RTOL


@pytest.mark.parametrize(("name", "variant"), [("dit_single", "single"), ("dit_multi", "multi")])
def test_cuda_bf16_close_to_reference(tiny_weights_dir: Path, name: str, variant: str) -> None:
    cfg = load_model_config(tiny_weights_dir).dit
    data, _ = read_fixture(name)
    model = load_dit(tiny_weights_dir, cfg, variant=variant, device="cuda", dtype=torch.bfloat16, rope="fast")
    assert rel_err(run(model, data), data["out"]) < BF16_BOUND


@pytest.mark.parametrize("scaled_mm", [False, True])
def test_cuda_fp8_file_close_to_reference(tiny_weights_dir: Path, scaled_mm: bool) -> None:
    cfg = load_model_config(tiny_weights_dir).dit
    data, _ = read_fixture("dit_single")
    model = load_dit(tiny_weights_dir, cfg, device="cuda", dtype=torch.bfloat16, quant="fp8", rope="fast")
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.weight_fp8.is_cuda for m in layers)
    for m in layers:
        m.use_scaled_mm = scaled_mm
    assert rel_err(run(model, data), data["out"]) < FP8_BOUND


def test_compiled_blocks_match_eager(tiny_weights_dir: Path) -> None:
    cfg = load_model_config(tiny_weights_dir).dit
    data, _ = read_fixture("dit_multi")
    model = load_dit(tiny_weights_dir, cfg, variant="multi", device="cuda", dtype=torch.float32, rope="fast")
    eager = run(model, data)
    model.compile_blocks()
    assert rel_err(run(model, data), eager) < 1e-4
