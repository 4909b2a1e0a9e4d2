"""`infinitetalk render --gpus 2` on the CPU (gloo): the same video as one process, written once.

Two speakers, so the sequence-parallel region map and the speaker-position bounds are exercised
inside a real render (encoders, sampler, VAE, muxing), not only a single DiT forward.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers.media import make_job_bundle, read_frames

ROOT = Path(__file__).resolve().parents[3]


def _render(job: Path, out: Path, weights: Path, gpus: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("INFINITETALK_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "render",
            str(job),
            "-o",
            str(out),
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--gpus",
            str(gpus),
            "-q",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_two_rank_render_equals_one_rank(tmp_path: Path, tiny_weights_dir: Path, duo_bundle: Path) -> None:
    job = duo_bundle / "job.json"
    one = _render(job, tmp_path / "one.mp4", tiny_weights_dir, 1, tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _render(job, tmp_path / "two" / "two.mp4", tiny_weights_dir, 2, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("two.mp4:") == 1  # only rank 0 reports (and writes)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["two.jpg", "two.mp4"]
    a, b = read_frames(tmp_path / "one.mp4"), read_frames(tmp_path / "two" / "two.mp4")
    assert a.shape == b.shape and a.shape[0] == 33
    # float32 on the CPU: the parallel forward equals the single one, so the encoded frames match
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_bad_degree_is_refused(tmp_path: Path, tiny_weights_dir: Path) -> None:
    bundle = make_job_bundle(tmp_path / "solo", kind="image", duration_s=1.0, sample_steps=1, mode="clip")
    proc = _render(bundle / "job.json", tmp_path / "x.mp4", tiny_weights_dir, 3, tmp_path)
    assert proc.returncode == 2
    assert "degree 3 does not divide the 2 heads" in proc.stderr
    assert not (tmp_path / "x.mp4").exists()
    assert "loading the model" not in proc.stderr  # refused before any rank started
