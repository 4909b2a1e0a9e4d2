"""`infinitetalk render`: a real subprocess, tiny weights, a progress bar, clear job errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av

from tests.helpers.media import make_job_bundle

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("INFINITETALK_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "daemon", "render", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_render_without_weights_uses_the_tiny_model(tmp_path: Path) -> None:
    bundle = make_job_bundle(
        tmp_path / "hello", kind="image", duration_s=1.5, sample_steps=1, mode="clip", seed=9
    )
    proc = _cli(str(bundle / "job.json"), "--allow-tiny", cwd=tmp_path)  # else exit 78 (test_tiny_guard)
    assert proc.returncode == 0, proc.stderr
    assert "tiny random-weight model" in proc.stderr and "var/tiny-weights" in proc.stderr
    assert "chunk 1/1" in proc.stderr  # the tqdm bar
    out = tmp_path / "hello.mp4"
    with av.open(str(out)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
        assert sum(1 for _ in c.decode(video=0)) == 33
    assert (tmp_path / "hello.jpg").is_file()
    assert "seed 9" in proc.stdout


def test_render_reports_every_job_error(tmp_path: Path) -> None:
    bundle = make_job_bundle(tmp_path / "bad", kind="image", duration_s=1.5)
    doc = json.loads((bundle / "job.json").read_text())
    doc.update(sample_steps=0, colour="red", cond_video="../escape.png")
    (bundle / "job.json").write_text(json.dumps(doc))
    proc = _cli(str(bundle / "job.json"), "-o", str(tmp_path / "x.mp4"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    for code in ("[unknown_key] colour", "[bad_value] sample_steps", "[path_escape] cond_video"):
        assert code in proc.stderr
    assert not (tmp_path / "x.mp4").exists()
