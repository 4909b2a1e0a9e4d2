"""tools/bench_multi_gpu.py --cpu-smoke: the multi-GPU benchmark's logic on 2 gloo processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("speakers", [1, 2])
def test_cpu_smoke_report(tmp_path: Path, speakers: int) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_multi_gpu.py"),
            "--cpu-smoke",
            "--speakers",
            str(speakers),
            "--json",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    lat = report["latency"]
    # the parallel forward is the single-process forward
    assert lat["rel_err_vs_single_gpu"] < 1e-5
    assert lat["single_gpu_forward"]["median_s"] > 0 and lat["ulysses_2_forward"]["median_s"] > 0
    per_block = 2 + (2 if speakers == 2 else 0)
    for comm in lat["communication"]:
        assert comm["calls"] == 2 * per_block + 1  # tiny model: 2 blocks, plus the output gather
        assert 0 < comm["share"] <= 1.0
    thr = report["throughput"]
    assert len(thr["per_rank_s"]) == 2 and thr["one_gpu_all_jobs_s"] > 0
    assert "Ulysses-2" in proc.stdout and "throughput: 2 jobs" in proc.stdout
