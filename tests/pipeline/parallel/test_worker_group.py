"""The daemon's render worker holding a GroupPipeline through its factory hook (2 CPU ranks).

`WorkerConfig.factory = "pipeline.parallel_pipeline:from_worker_config"` with
`device = "cpu,cpu"`: the worker process is rank 0, it starts its follower, says ready, and runs
a job order through the normal worker protocol.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import av

from daemon.jobs import load_job
from daemon.pool import WorkerHandle
from daemon.protocol import Failed, Fatal, Finished, Ready, RunOrder
from daemon.runner import WorkerConfig
from tests.helpers.media import make_job_bundle


def _wait(worker: WorkerHandle, kind: type, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker.wait(1.0)
        for message in worker.poll():
            if isinstance(message, kind):
                return message
            assert not isinstance(message, (Fatal, Failed)), message
    raise AssertionError(f"no {kind.__name__} message within {timeout_s} s")


def test_worker_runs_a_job_on_a_two_rank_group(tmp_path: Path, tiny_weights_dir: Path) -> None:
    bundle = make_job_bundle(
        tmp_path / "solo", kind="image", duration_s=1.5, sample_steps=1, mode="clip", seed=3
    )
    request = load_job(bundle / "job.json").to_request(bundle)
    worker = WorkerHandle(
        WorkerConfig(
            weights_dir=tiny_weights_dir,
            device="cpu,cpu",
            dtype="fp32",
            max_running=1,
            factory="pipeline.parallel_pipeline:from_worker_config",
        )
    )
    worker.start()
    try:
        info = _wait(worker, Ready, 180).info
        assert info["sequence_parallel"] == 2 and info["device"] == "cpu,cpu"
        out = tmp_path / "out" / "solo.mp4"
        worker.run(
            RunOrder(
                job_id="j1",
                request=request,
                out_path=out,
                poster_path=out.with_suffix(".jpg"),
                checkpoint_dir=tmp_path / "work" / "j1",
            )
        )
        assert _wait(worker, Finished, 300).job_id == "j1"
        with av.open(str(out)) as c:
            assert sum(1 for _ in c.decode(video=0)) == 33
        assert not (tmp_path / "work" / "j1.rank1").exists()
    finally:
        worker.shutdown(timeout_s=30)
