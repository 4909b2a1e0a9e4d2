"""The real tiny model (random weights in the released layout) in Ray actors: a worker node lost
mid-render, the job resumes on the other node from the last chunk checkpoint that reached the
head, and the published video has exactly the frames of an uninterrupted local render."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.daemon import STEADY, Daemon
from tests.helpers.media import make_job_bundle, read_frames

pytestmark = pytest.mark.timeout(300)


def _job(d: Daemon) -> None:
    staging = d.inbox / ".long"
    make_job_bundle(staging, duration_s=3.0, seed=3, sample_steps=1)
    os.rename(staging, d.inbox / "long")


def test_a_node_lost_mid_render_resumes_elsewhere_with_the_frames_of_an_uninterrupted_render(
    cluster: Any, tiny_weights_dir: Path, tmp_path: Path
) -> None:
    d = Daemon(tmp_path / "ray", fake=False, weights_dir=tiny_weights_dir, preset=STEADY)
    d.config.write_text(
        d.config.read_text() + '\n[cluster]\nexecutor = "ray"\nnum_gpus = 0\n'
        f"ray_address = {json.dumps(cluster.address)}\n"
    )
    # Ray gives an actor of 1 CPU one OpenMP thread: the local worker gets the same, as CPU float
    # sums depend on the thread count
    one_thread = {"OMP_NUM_THREADS": "1"}
    local = Daemon(
        tmp_path / "local", fake=False, weights_dir=tiny_weights_dir, preset=STEADY, env=one_thread
    )
    try:
        d.start()
        d.wait_for(lambda: d.log.read_text().count(" ready on node ") >= 2, 120, "2 Ray actors ready")
        _job(d)
        d.wait_for(
            lambda: (
                (j := d.job("long"))
                and j["job_dir"]
                and (Path(j["job_dir"]) / "checkpoint" / "state.json").exists()
            ),
            180,
            "the first chunk's checkpoint on the head",
        )
        lost = re.findall(r"\(long\) started on \S+ on node (\S+) ", d.log.read_text())[-1]
        node = next(n for n in cluster.worker_nodes if n.node_id.startswith(lost.split(":")[-1]))
        cluster.remove_node(node, allow_graceful=False)
        job = d.wait_state("long", "done", timeout_s=180)
        assert job["attempts"] == 2 and job["resumed_from_chunk"] >= 1, job
        assert re.findall(r"\(long\) started on \S+ on node (\S+) ", d.log.read_text())[-1] != lost
        assert d.stop() == 0
        _job(local)
        local.start()
        local.wait_state("long", "done", timeout_s=180)
        assert np.array_equal(read_frames(d.outbox / "long.mp4"), read_frames(local.outbox / "long.mp4"))
    finally:
        d.stop()
        local.stop()
        if len(cluster.worker_nodes) < 2:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
