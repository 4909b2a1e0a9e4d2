"""GroupPipeline (latency mode for a long-lived holder such as the daemon's worker) on 2 CPU ranks.

Rank 0 is this test process; the follower is a real `python -m pipeline.parallel_pipeline`
process. One group serves several jobs: a two-speaker render equal to the one-process render, a
stop agreed by both ranks at the same step, and a render after the stop (still in step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.jobs import load_job
from pipeline.parallel_pipeline import GroupPipeline, GroupSpec
from pipeline.types import StopRequested
from tests.helpers.media import read_frames


@pytest.fixture(scope="module")
def request_two(duo_bundle: Path):
    return load_job(duo_bundle / "job.json").to_request(duo_bundle)


def test_group_renders_like_one_process_and_agrees_on_stops(
    tmp_path: Path,
    tiny_weights_dir: Path,
    request_two,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    from pipeline.pipeline import InfiniteTalkPipeline

    # one CPU thread everywhere (the follower inherits it): the same summation order on every rank
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    single = InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cpu", dtype=torch.float32)
    single.generate(request_two, tmp_path / "single.mp4")
    del single

    group = GroupPipeline.start(
        GroupSpec(weights_dir=str(tiny_weights_dir), devices=("cpu", "cpu"), dtype="fp32", timeout_s=120)
    )
    try:
        assert group.describe()["sequence_parallel"] == 2
        # 1. the same video as one process (and the follower's checkpoint copy is cleaned up)
        ckpt = tmp_path / "work"
        result = group.generate(request_two, tmp_path / "group.mp4", checkpoint_dir=ckpt)
        assert result.num_frames == 33
        a, b = read_frames(tmp_path / "single.mp4"), read_frames(tmp_path / "group.mp4")
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1

        # 2. a stop seen only by rank 0 (its progress callback raises) stops both ranks together
        def on_progress(p) -> None:
            if p.stage == "denoise" and p.step >= 1:
                raise StopRequested("stop from the test")

        with pytest.raises(StopRequested):
            group.generate(request_two, tmp_path / "stopped.mp4", on_progress=on_progress)
        assert not (tmp_path / "stopped.mp4").exists()

        # 3. the ranks are still in step: the next job renders, again equal to one process
        group.generate(request_two, tmp_path / "again.mp4", should_stop=lambda: False)
        assert np.abs(read_frames(tmp_path / "again.mp4").astype(int) - a.astype(int)).max() <= 1
        assert not (tmp_path / "work.rank1").exists()
    finally:
        group.close()
    assert [p.returncode for p in group.followers] == [] and group.control is None


def test_group_spec_checks() -> None:
    with pytest.raises(ValueError, match="2 or more devices"):
        GroupSpec(weights_dir="w", devices=("cuda:0",))
    with pytest.raises(ValueError, match="must all be cuda:N or all cpu"):
        GroupSpec(weights_dir="w", devices=("cuda:0", "cpu"))
    with pytest.raises(ValueError, match="quant = 'fp8'"):
        GroupSpec(weights_dir="w", devices=("cuda:0", "cuda:1"), quant="fp8")
    assert GroupSpec(weights_dir="w", devices=("cuda:0", "cuda:1")).backend == "nccl"
