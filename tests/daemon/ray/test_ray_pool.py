"""The daemon with `[cluster] executor = "ray"` on a real 3-node Ray cluster on this machine, the
fake pipeline in its actors (tests/daemon/service/fake_pipeline.py), the real daemon process."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle

pytestmark = pytest.mark.timeout(150)


def _ray_daemon(root: Path, address: str, **settings: Any) -> Daemon:
    d = Daemon(root, config=settings)
    _cluster_table(d, executor="ray", ray_address=address, num_gpus=0)
    return d


def _cluster_table(d: Daemon, **keys: Any) -> None:
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    d.config.write_text(d.config.read_text() + "\n[cluster]\n" + "\n".join(lines) + "\n")


def _bundle(d: Daemon, name: str, media_seed: int = 0, **settings: Any) -> None:
    staging = d.inbox / f".{name}.tmp"
    make_job_bundle(staging, duration_s=1.0, seed=3, media_seed=media_seed, **settings)
    os.rename(staging, d.inbox / name)


def _wait_actors(d: Daemon, n: int) -> None:
    """Until `n` actors have loaded the pipeline (one per worker node)."""
    d.wait_for(lambda: d.log.read_text().count(" ready on node ") >= n, 90, f"{n} Ray actors to be ready")


def _nodes_of(d: Daemon) -> dict[str, str]:
    """job name -> the node its (last) attempt started on, from the daemon's log."""
    found = re.findall(r"job \S+ \((\w+)\) started on \S+ on node (\S+) ", d.log.read_text())
    return dict(found)


def test_jobs_spread_over_both_nodes_with_the_local_executors_output(cluster: Any, tmp_path: Path) -> None:
    d = _ray_daemon(tmp_path / "ray", cluster.address, max_running=2)
    local = Daemon(tmp_path / "local")
    try:
        d.start()
        local.start()
        _wait_actors(d, 2)
        for i, name in enumerate(("alice", "bob")):
            _bundle(d, name, media_seed=i, prompt="SLOW talking")
        _bundle(local, "alice", prompt="SLOW talking")
        for name in ("alice", "bob"):
            job = d.wait_state(name, "done", timeout_s=120)
            assert job["attempts"] == 1
            assert d.event_kinds(job["id"]).count("started") == 1  # rendered once
        local.wait_state("alice", "done", timeout_s=60)
        nodes = _nodes_of(d)
        assert len(set(nodes.values())) == 2, nodes  # one job on each worker node
        assert (d.outbox / "alice.mp4").read_bytes() == (local.outbox / "alice.mp4").read_bytes()
        sidecar = json.loads((d.outbox / "alice.json").read_text())
        assert sidecar["model"]["node"] == nodes["alice"]
        beat = json.loads(d.query("SELECT data_json FROM heartbeat")[0]["data_json"])
        assert sorted(w["node"] for w in beat["workers"]) == sorted(nodes.values())  # status, dashboard
        # a worker line per actor in `infinitetalk status`, naming its node; both idle once the
        # heartbeat after the two jobs is written
        wanted = {rf"^  worker \d  node {re.escape(n)}  cpu  idle$" for n in nodes.values()}
        d.wait_for(
            lambda: all(re.search(w, d.cli("status").stdout, re.M) for w in wanted), 15, "both workers idle"
        )
        assert d.stop() == 0  # SIGTERM: a clean stop (Ray's own signal handlers are not left in place)
    finally:
        d.stop()
        local.stop()


def test_a_node_lost_mid_render_resumes_on_the_other_from_its_last_chunk(
    cluster: Any, tmp_path: Path
) -> None:
    """The node of a running job is removed after its first chunk's checkpoint reached the head:
    the job goes back to the queue and resumes on the other node from that chunk."""
    d = _ray_daemon(tmp_path / "ray", cluster.address, max_running=1, defaults={"sample_steps": 4})
    try:
        d.start()
        _wait_actors(d, 2)
        _bundle(d, "carol", prompt="SLOW talking")
        job = d.wait_state("carol", "running", timeout_s=60)
        marker = d.state / "jobs" / job["id"] / "checkpoint" / "chunk.json"
        d.wait_for(marker.exists, 60, "the first chunk's checkpoint on the head")
        lost = _nodes_of(d)["carol"]
        node = next(n for n in cluster.worker_nodes if n.node_id.startswith(lost.split(":")[-1]))
        cluster.remove_node(node, allow_graceful=False)
        done = d.wait_state("carol", "done", timeout_s=90)
        assert done["attempts"] == 2
        assert _nodes_of(d)["carol"] != lost
        sidecar = json.loads((d.outbox / "carol.json").read_text())
        assert sidecar["resumed_from_chunk"] >= 1
        assert sidecar["frames"] == 15  # the fake pipeline's 3 chunks of 5 frames, once
        # the node of each chunk: those before the loss the lost node's, the others the resumer's
        resumed, second = sidecar["resumed_from_chunk"], _nodes_of(d)["carol"]
        assert sidecar["model"]["node"] == second
        assert sidecar["chunks"] == [
            {"chunk": c, "node": lost, "attempt": 1}
            if c <= resumed
            else {"chunk": c, "node": second, "attempt": 2}
            for c in (1, 2, 3)
        ], sidecar["chunks"]
        assert resumed < 3  # the resumer rendered at least one chunk
        kinds = d.event_kinds(done["id"])
        assert kinds.count("started") == 2 and kinds.count("done") == 1, kinds
    finally:
        d.stop()
        cluster.add_node(num_cpus=1)  # the module's cluster has two worker nodes again
        cluster.wait_for_nodes()


def test_the_daemon_killed_while_actors_render_then_restarted_ends_every_job_once(
    cluster: Any, tmp_path: Path
) -> None:
    d = _ray_daemon(tmp_path / "ray", cluster.address, max_running=2, defaults={"sample_steps": 4})
    try:
        d.start()
        _wait_actors(d, 2)
        names = ("dave", "erin")
        for i, name in enumerate(names):
            _bundle(d, name, media_seed=i, prompt="SLOW talking")
        for name in names:
            d.wait_state(name, "running", timeout_s=60)
        d.kill9()  # its actors die with their owner, the driver
        d.start()
        for name in names:
            job = d.wait_state(name, "done", timeout_s=120)
            assert d.event_kinds(job["id"]).count("done") == 1
        assert sorted(p.name for p in d.outbox.glob("*.mp4")) == ["dave.mp4", "erin.mp4"]
    finally:
        d.stop()


def test_a_job_that_kills_every_actor_fails_after_max_attempts_and_the_daemon_stays_up(
    cluster: Any, tmp_path: Path
) -> None:
    d = _ray_daemon(tmp_path / "ray", cluster.address, max_attempts=2)
    try:
        d.start()
        _wait_actors(d, 2)
        _bundle(d, "mallory", prompt="CRASH now")
        job = d.wait_state("mallory", "failed", timeout_s=90)
        assert job["error_code"] == "worker_crash" and job["attempts"] == 2
        assert "Ray actor on node" in job["error_message"]
        _bundle(d, "frank", media_seed=1)  # the replaced actors render the next job
        d.wait_state("frank", "done", timeout_s=90)
        d.assert_alive()
    finally:
        d.stop()


def test_a_pipeline_that_cannot_load_stops_the_daemon_with_a_clear_reason(
    cluster: Any, tmp_path: Path
) -> None:
    d = _ray_daemon(tmp_path / "ray", cluster.address)
    d.fake = False
    d.start("--pipeline-factory", "tests.daemon.ray.broken_pipeline:make")
    assert d.wait_exit(90) == 1
    log = d.log.read_text()
    assert "giving up: the model cannot be loaded on Ray actor" in log
    assert "RuntimeError: the weights on this node are unreadable" in log


def test_cancel_reaches_the_actor_at_a_step_boundary(cluster: Any, tmp_path: Path) -> None:
    d = _ray_daemon(tmp_path / "ray", cluster.address, defaults={"sample_steps": 6})
    try:
        d.start()
        _wait_actors(d, 2)
        _bundle(d, "gina", prompt="SLOW talking")
        d.wait_for(
            lambda: (j := d.job("gina")) and j["state"] == "running" and j["step"], 60, "gina rendering"
        )
        out = d.cli("cancel", "gina")
        assert out.returncode == 0, out.stderr
        job = d.wait_state("gina", "cancelled", timeout_s=30)
        assert not (d.outbox / "gina.mp4").exists()
        assert d.event_kinds(job["id"]).count("started") == 1
        _bundle(d, "hank", media_seed=1)  # the actor is free again
        d.wait_state("hank", "done", timeout_s=60)
    finally:
        d.stop()
