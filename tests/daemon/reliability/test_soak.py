"""Soak: many small jobs for a couple of minutes (RELIABILITY_SOAK_S, default 120), dropped at random
intervals in random ways, some broken on purpose. Checked every 20 s and at the end: open file
descriptors and memory of the daemon stay flat, the WAL stays bounded, the ledger and the folders
agree; at the end every good job is done exactly once and SIGTERM stops the daemon promptly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from tests.daemon.reliability import harness
from tests.helpers.daemon import Daemon

SOAK_S = float(os.environ.get("RELIABILITY_SOAK_S", "120"))
SEED = int(os.environ.get("RELIABILITY_SEED", "20261125"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.timeout(int(SOAK_S) + 300)
def test_soak_many_small_jobs(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(SEED)
    d: Daemon = daemon_factory("soak", max_running=2, max_queued=20)
    d.start()
    pid = d.main_pid()
    assert pid is not None
    good: list[str] = []
    bad: list[str] = []
    samples: list[tuple[int, float]] = []
    n = 0
    start = time.monotonic()
    next_check = start + 20
    while time.monotonic() - start < SOAK_S:
        n += 1
        name = f"soak{n:03d}"
        way = rng.choice(
            ["staged", "staged", "in-place-checksums", "loose", "bad-json", "cut-upload", "duplicate"]
        )
        src = tmp_path / name
        harness.make_bundle(src, seed=5000 + n, checksums=way != "cut-upload")
        if way == "staged":
            shutil.copytree(src, d.inbox / f".{name}.copying")
            os.rename(d.inbox / f".{name}.copying", d.inbox / name)
            good.append(name)
        elif way == "in-place-checksums":
            shutil.copytree(src, d.inbox / name)
            good.append(name)
        elif way == "loose":
            doc = json.loads((src / "job.json").read_text())
            for rel in (doc["cond_video"], *doc["cond_audio"].values()):
                shutil.copyfile(src / rel, d.inbox / f"{name}-{rel}")
            doc["cond_video"] = f"{name}-{doc['cond_video']}"
            doc["cond_audio"] = {p: f"{name}-{v}" for p, v in doc["cond_audio"].items()}
            doc["checksums"] = {f"{name}-{k}": v for k, v in doc["checksums"].items()}
            (d.inbox / f".{name}.json.part").write_text(json.dumps(doc))
            os.rename(d.inbox / f".{name}.json.part", d.inbox / f"{name}.json")
            good.append(name)
        elif way == "bad-json":
            (src / "job.json").write_text((src / "job.json").read_text()[:-7])
            shutil.copytree(src, d.inbox / name)
            bad.append(name)
            harness.count("faults injected")
        elif way == "cut-upload":  # an in-place copy killed halfway through the WAV, no checksums
            (d.inbox / name).mkdir()
            for f in sorted(src.iterdir()):
                data = f.read_bytes()
                (d.inbox / name / f.name).write_bytes(
                    data[: len(data) // 2] if f.name == "voice.WAV" else data
                )
            bad.append(name)
            harness.count("faults injected")
        elif way == "duplicate" and (
            taken := [
                g for g in good if (rows := d.jobs(g)) and rows[-1]["state"] in ("queued", "running", "done")
            ]
        ):
            # the very same job as an earlier, admitted one: reported as its duplicate, not rendered
            earlier = rng.choice(taken)
            shutil.copytree(tmp_path / earlier, d.inbox / f".{name}.copying")
            os.rename(d.inbox / f".{name}.copying", d.inbox / name)
            bad.append(name)
            harness.count("duplicates dropped")
        else:
            continue
        harness.count("soak drops")
        time.sleep(rng.uniform(0.2, 2.5))
        if time.monotonic() >= next_check:
            next_check += 20
            d.assert_alive()
            samples.append((fds(pid), rss_mb(pid)))
            harness.check_invariants(d, idle=False)
            wal = d.state / "ledger.sqlite3-wal"
            assert not wal.exists() or wal.stat().st_size < 32 * 1024 * 1024, wal.stat().st_size
    d.wait_idle(timeout_s=240)
    for name in good:
        d.wait_state(name, ["done"], timeout_s=60)
    for name in bad:
        d.wait_state(name, ["rejected"], timeout_s=60)
    counts = harness.check_invariants(d)
    for name in good:
        assert [r["state"] for r in d.jobs(name)] == ["done"], d.jobs(name)
    # the daemon does not leak: file descriptors and memory flat after the first sample
    samples.append((fds(pid), rss_mb(pid)))
    first, last = samples[0], samples[-1]
    assert last[0] <= first[0] + 8, samples
    assert last[1] <= first[1] * 1.5 + 64, samples
    t0 = time.monotonic()
    assert d.stop(timeout_s=60) == 0
    stop_s = time.monotonic() - t0
    assert stop_s < 30, stop_s
    harness.count("soak jobs", len(good) + len(bad))
    tally = harness.tally(d)
    assert tally["lost"] == tally["duplicates"] == 0, tally
    assert counts.get("done", 0) == len(good), counts
    print(
        f"soak: {len(good)} good and {len(bad)} bad jobs in {SOAK_S:g} s, fds/RSS samples {samples}, "
        f"SIGTERM stop {stop_s:.1f} s"
    )
