"""The real daemon on a GPU with a full-size random-weight model (tests.gpu.fullsize_factory):
3 jobs dropped into the inbox at once render to MP4s under a 24 GiB budget and with no budget
(`auto`); reports time until the model is placed, each job's time and the plan (its expected peak). Needs the daemon's own
packages (PyAV, librosa, sqlite-utils, watchdog) on the GPU machine.

    PYTHONPATH=. python -m pytest --gpu tests/gpu/test_daemon_memory.py -x -q -s
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("budget", [24, "auto"])
def test_three_jobs_render_under_the_budget(tmp_path: Path, tiny_weights_dir: Path, budget) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tests.helpers.daemon import Daemon
    from tests.helpers.media import make_job_bundle

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights_dir, weights)
    daemon = Daemon(
        tmp_path / "d",
        fake=False,
        weights_dir=weights,
        config={"pipeline_factory": "tests.gpu.fullsize_factory:build", "max_running": 3, "device": "cuda"},
    )
    value = json.dumps(budget)
    daemon.config.write_text(daemon.config.read_text() + f"\n[performance]\ngpu_memory_gib = {value}\n")
    t0 = time.monotonic()
    daemon.start()
    try:
        # the worker logs its memory plan once the model is placed (READY follows the warm-up)
        daemon.wait_for(lambda: "memory plan" in daemon.log.read_text(), 900, "the model placed")
        ready_s = time.monotonic() - t0
        staging = tmp_path / "staging"
        for i in range(3):
            make_job_bundle(
                staging / f"job{i}", kind="image", duration_s=3.5, media_seed=i, seed=i, sample_steps=4
            )
        for i in range(3):
            (staging / f"job{i}").rename(daemon.inbox / f"job{i}")
        done = [daemon.wait_state(f"job{i}", "done", timeout_s=1800) for i in range(3)]
    finally:
        daemon.stop()
    sidecars = [json.loads((daemon.outbox / f"job{i}.json").read_text()) for i in range(3)]
    for i, side in enumerate(sidecars):
        assert (daemon.outbox / f"job{i}.mp4").stat().st_size > 0
        plan = side["model"]["placement"]
        assert plan is not None and side["model"]["quant"] == "fp8"
        if budget == 24:
            assert plan["budget_gib"] == 24.0 and plan["expected_peak_gib"] <= 24.0
    print(
        json.dumps(
            {
                "budget": budget,
                "ready_s": round(ready_s, 1),
                "job_s": [side["timings_s"].get("render") for side in sidecars],
                "plan": sidecars[0]["model"]["placement"]["summary"],
                "states": [d["state"] for d in done],
            }
        )
    )
