"""A late chunk from an older attempt (a stale actor) is dropped, never written or published:
the real `RayPool` in this process on the real 3-node cluster, the fake pipeline in two CPU
actors. Attempt 1 of a job renders on one actor; the job is dispatched again as attempt 2 on the
other while attempt 1 keeps rendering, and attempt 1, the faster, streams its chunks and its
video first: every one of its messages is dropped (and logged), the head's checkpoint folder and
node record hold only attempt 2's work, and the one `Finished` is attempt 2's."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon import chunk_nodes
from daemon.config import ClusterSettings, Settings
from daemon.protocol import Event, Failed, Finished, Progressed, Ready, RunOrder, Stopped, WorkerDied
from daemon.runner import WorkerConfig
from pipeline.types import GenerationRequest

pytestmark = pytest.mark.timeout(120)

STEP_S = 0.3  #: the fake pipeline's step time for a SLOW prompt; 3 chunks per job


def _order(job_dir: Path, attempt: int, steps: int) -> RunOrder:
    inputs = job_dir / "input"
    request = GenerationRequest(
        prompt="SLOW talking",
        cond_media=inputs / "ref.png",
        audio=(inputs / "speech.wav",),
        sample_steps=steps,
    )
    return RunOrder(
        job_id="j-stale",
        request=request,
        out_path=job_dir / "out" / "j-stale.mp4",
        poster_path=job_dir / "out" / "j-stale.jpg",
        checkpoint_dir=job_dir / "checkpoint",
        attempt=attempt,
    )


def test_a_late_chunk_of_an_older_attempt_is_dropped_and_never_published(
    cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from daemon.ray_pool import RayPool

    job_dir = tmp_path / "jobs" / "j-stale"
    (job_dir / "input").mkdir(parents=True)
    (job_dir / "input" / "ref.png").write_bytes(b"not read by the fake pipeline")
    (job_dir / "input" / "speech.wav").write_bytes(b"not read either")
    settings = dataclasses.replace(
        Settings(),
        max_running=2,
        cluster=ClusterSettings(executor="ray", ray_address=cluster.address, num_gpus=0),
    )
    config = WorkerConfig(weights_dir=tmp_path / "weights", factory="tests.daemon.service.fake_pipeline:make")
    pool = RayPool(settings, config, threading.Event())
    caplog.set_level(logging.WARNING, logger="daemon.ray_pool")
    events: list[Event] = []

    def until(what: str, done: Any, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {events}"
            events.extend(pool.wait(0.1, restart=False))
            bad = [e for e in events if isinstance(e, (Failed, Stopped, WorkerDied))]
            assert not bad, bad

    try:
        pool.start()
        until("both actors ready", lambda: sum(isinstance(e, Ready) for e in events) == 2, 90)
        ready = [e.info for e in events if isinstance(e, Ready)]
        assert len({i["node"] for i in ready}) == 2  # one actor on each worker node
        first, second = pool.slots[0].info, pool.slots[1].info

        pool.run(0, _order(job_dir, attempt=1, steps=2))  # 3 chunks x 2 steps: ~1.8 s
        until("attempt 1 rendering", lambda: any(isinstance(e, Progressed) for e in events))
        dispatched = time.monotonic()
        pool.run(1, _order(job_dir, attempt=2, steps=4))  # ~3.6 s, on the other node
        # from here on attempt 1 is stale; what the head held before (at most its first chunk, if
        # that was quicker than this test's poll) is attempt 2's starting point
        log = job_dir / "checkpoint" / "log.txt"  # the fake pipeline's chunk log, in the checkpoint
        mine = f"pid {first['pid']}"
        before = log.read_text().count(mine) if log.exists() else 0

        def dropped(kind: str) -> bool:
            return any(
                f"dropped a late {kind} of an older dispatch (token 1." in r.message for r in caplog.records
            )

        # attempt 1 finishes first: its chunk checkpoints and its video come in and are dropped
        until("attempt 1's video to arrive and be dropped", lambda: dropped("Output"))
        assert dropped("Checkpoint")  # a late chunk, not only the end
        assert not any(isinstance(e, Finished) for e in events)  # nothing of attempt 1 published
        assert not _order(job_dir, 1, 2).out_path.exists()  # nor its video written on the head
        written = log.read_text() if log.exists() else ""
        assert written.count(mine) <= before, written  # none of attempt 1's late chunks written
        assert all(v["attempt"] == 2 for c, v in chunk_nodes.read(job_dir).items() if c > 1)

        until("attempt 2's video", lambda: any(isinstance(e, Finished) for e in events))
        finished = [e for e in events if isinstance(e, Finished)]
        assert len(finished) == 1 and finished[0].render_s >= 3 * 4 * STEP_S * 0.9, finished
        assert time.monotonic() - dispatched >= 3 * 4 * STEP_S
        assert finished[0].result.video_path.read_bytes()[4:8] == b"ftyp"
        assert f"pid {second['pid']}" in log.read_text()
        assert log.read_text().count(mine) <= before
        nodes = chunk_nodes.read(job_dir)
        assert {c: nodes[c] for c in (2, 3)} == {c: {"node": second["node"], "attempt": 2} for c in (2, 3)}
        assert nodes[1]["attempt"] == (1 if before else 2), nodes
        assert not pool.busy()  # neither slot still holds the job
    finally:
        pool.kill()
