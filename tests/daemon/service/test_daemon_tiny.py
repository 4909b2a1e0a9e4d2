"""End to end on the real tiny model (random weights in the released layout): the daemon renders
dropped jobs into playable MP4s, and a daemon killed mid-render resumes from its last chunk."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle, make_loose_job

pytestmark = pytest.mark.timeout(300)


def _boxes(path: Path) -> list[str]:
    """Top-level MP4 box types, in file order."""
    out, data, pos = [], path.read_bytes(), 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        out.append(kind)
        if size < 8:
            break
        pos += size
    return out


def assert_playable(path: Path, audio_s: float) -> None:
    boxes = _boxes(path)
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # faststart
    with av.open(str(path)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        assert video.codec_context.name == "h264" and video.codec_context.pix_fmt == "yuv420p"
        assert audio.codec_context.name == "aac"
        assert float(video.average_rate) == 25.0
        frames = sum(1 for _ in c.decode(video=0))
    assert abs(frames / 25.0 - audio_s) <= 1 / 25 + 1e-6, (frames, audio_s)


@pytest.fixture()
def tiny_daemon(tmp_path: Path, tiny_weights_dir: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, fake=False, weights_dir=tiny_weights_dir)
    yield d
    d.stop()


def test_bundle_and_loose_job_render_to_playable_mp4(tiny_daemon: Daemon) -> None:
    d = tiny_daemon
    staging = d.inbox / ".alice"
    make_job_bundle(staging, duration_s=1.6, seed=1)
    os.rename(staging, d.inbox / "alice")
    make_loose_job(d.inbox, "bob", duration_s=1.6, seed=2)
    d.start()
    for name in ("alice", "bob"):
        job = d.wait_state(name, ("done", "failed", "rejected"), timeout_s=240)
        assert job["state"] == "done", job
        assert_playable(d.outbox / f"{name}.mp4", 1.6)
        sidecar = json.loads((d.outbox / f"{name}.json").read_text())
        assert sidecar["model"]["tiny"] is True and sidecar["frames"] == job["frames"] == 40
        assert sidecar["settings"]["sample_steps"] == 2 and isinstance(sidecar["settings"]["seed"], int)
        assert (d.outbox / f"{name}.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_kill9_mid_render_then_restart_completes_once_from_the_last_chunk(tiny_daemon: Daemon) -> None:
    d = tiny_daemon
    staging = d.inbox / ".long"
    make_job_bundle(staging, duration_s=4.0, seed=3, sample_steps=3)
    os.rename(staging, d.inbox / "long")
    d.start()
    d.wait_for(
        lambda: (
            (j := d.job("long"))
            and j["state"] == "running"
            and (j["chunk"] or 0) >= 2
            and (Path(j["job_dir"]) / "checkpoint" / "state.json").exists()
        ),
        240,
        "chunk 1 of the long job checkpointed",
    )
    d.kill9()
    checkpoint = Path(d.job("long")["job_dir"]) / "checkpoint"
    assert any(checkpoint.iterdir())
    d.start()
    job = d.wait_state("long", ("done", "failed"), timeout_s=240)
    assert job["state"] == "done", job
    # a kill of the daemon is not the job's fault: the interrupted attempt is given back
    assert job["resumed_from_chunk"] >= 1 and job["attempts"] == 1
    assert_playable(d.outbox / "long.mp4", 4.0)
    assert len(list(d.outbox.glob("long*.mp4"))) == 1
    kinds = [e["kind"] for e in d.events(job["id"])]
    assert kinds.count("done") == 1
