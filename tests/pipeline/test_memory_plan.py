"""The memory plan inside the real pipeline, on the CPU with a stand-in budget: every component
placed off the "GPU" (blocks streamed, umT5 and CLIP moved in and out, wav2vec2 on the CPU)
renders frame for frame what the resident pipeline renders; the plan is in `describe()` (the
sidecar's `model`); a budget nothing fits is refused at load with the numbers; a render waits
for a memory slot."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.jobs import load_job
from pipeline import InfiniteTalkPipeline
from pipeline.placement import Placement, PlacementError
from tests.helpers.media import make_job_bundle, read_frames


def _everything_off(num_blocks: int) -> Placement:
    return Placement(
        budget_bytes=1 << 30,
        t5="inout",
        clip="inout",
        wav2vec="cpu",
        num_blocks=num_blocks,
        resident_blocks=0,
        swap_slots=1,
        vae_tiles=(1, 1),
        expected_peak_bytes=0,
        stage_peaks=(),
        pinned_host_bytes=0,
        host_bytes=0,
        source="forced by the test",
    )


@pytest.fixture(scope="module")
def resident(tiny_weights_dir: Path) -> InfiniteTalkPipeline:
    return InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cpu", dtype=torch.float32)


def test_placed_pipeline_renders_the_same_frames(resident, tiny_weights_dir: Path, tmp_path: Path) -> None:
    n = resident.config.dit.num_layers
    placed = InfiniteTalkPipeline.from_weights(
        tiny_weights_dir, device="cpu", dtype=torch.float32, placement=_everything_off(n)
    )
    swap = placed.dit.block_swap
    assert swap is not None and swap.swapped == tuple(range(n))
    assert placed.describe()["placement"]["swapped_blocks"] == n
    bundle = make_job_bundle(tmp_path / "job", kind="image", duration_s=1.64, seed=5, sample_steps=2)
    req = load_job(bundle / "job.json").to_request(bundle)
    a = resident.generate(req, tmp_path / "a.mp4")
    b = placed.generate(req, tmp_path / "b.mp4")
    np.testing.assert_array_equal(read_frames(b.video_path), read_frames(a.video_path))
    # two chunks x 2 steps, both guidance passes of a step sharing one copy of each block
    assert swap.copies == 2 * 2 * n
    assert placed.text_encoder.shuttle.bytes_copied > 0 and placed.image_encoder.shuttle.bytes_copied > 0
    assert resident.fingerprint is not None  # the plan does not change what a render is


def test_budget_gives_a_plan_and_a_too_small_one_is_refused(tiny_weights_dir: Path) -> None:
    pipe = InfiniteTalkPipeline.from_weights(
        tiny_weights_dir, device="cpu", dtype=torch.float32, gpu_memory_gib=1
    )
    plan = pipe.describe()["placement"]
    assert plan["budget_gib"] == 1.0 and plan["swapped_blocks"] == 0 and plan["t5"] == "gpu"
    assert pipe.describe()["quant"] is None and pipe.describe()["quant_requested"] == "auto"
    with pytest.raises(PlacementError, match=r"budget 0\.0 GiB .* needs 0\.\d+ GiB") as info:
        InfiniteTalkPipeline.from_weights(
            tiny_weights_dir, device="cpu", dtype=torch.float32, gpu_memory_gib=1e-9
        )
    assert info.value.min_gpu_bytes is not None and info.value.min_gpu_bytes > 1e-9 * 2**30


def test_a_render_waits_for_a_memory_slot(resident, tmp_path: Path) -> None:
    bundle = make_job_bundle(
        tmp_path / "job", kind="image", duration_s=1.5, seed=2, sample_steps=1, mode="clip"
    )
    req = load_job(bundle / "job.json").to_request(bundle)
    prepared = resident.prepare(req, tmp_path / "work")
    started = threading.Event()
    result: list[object] = []

    def render() -> None:
        result.append(resident.render(prepared, tmp_path / "out.mp4", on_progress=lambda p: started.set()))

    resident.memory_slots.acquire()  # another render holds the only slot
    thread = threading.Thread(target=render)
    thread.start()
    try:
        time.sleep(0.5)
        assert not started.is_set() and not result
    finally:
        resident.memory_slots.release()
    thread.join(120)
    assert started.is_set() and result and (tmp_path / "out.mp4").is_file()
