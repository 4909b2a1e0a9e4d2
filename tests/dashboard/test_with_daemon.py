"""The dashboard beside the real daemon: the bundled example job rendered by `infinitetalk daemon
--once` with the tiny random-weight model on the CPU, followed live over /events from the moment
the ledger does not exist yet to the published video, which is then served with HTTP Range."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import av
import httpx
import pytest

from tests.dashboard.server_proc import dashboard_server
from tests.dashboard.sse_client import Frame, frames
from tests.helpers.proc import ROOT, free_port, infinitetalk

pytestmark = pytest.mark.timeout(600)


def test_follow_the_example_job_rendered_by_the_daemon(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "infinitetalk.toml"
    config.write_text(
        f'inbox = "inbox"\noutbox = "outbox"\nstate_dir = "var"\nweights_dir = "weights"\n'
        f"allow_tiny_model = true\nsettle_s = 1.0\n\n[dashboard]\nport = {port}\n"
    )
    with dashboard_server(config, port, tmp_path / "dashboard.log") as (url, _):
        seen: list[Frame] = []
        finished = threading.Event()

        def listen() -> None:
            with httpx.Client(timeout=None) as c, c.stream("GET", url + "/events") as response:
                for frame in frames(response.iter_lines()):
                    seen.append(frame)
                    if frame.event in ("done", "failed", "rejected"):
                        finished.set()
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        subprocess.run(
            [
                sys.executable,
                "examples/make_example.py",
                str(tmp_path / "inbox" / "example"),
                "--duration",
                "2",
            ],
            cwd=ROOT,
            check=True,
            timeout=120,
        )
        daemon = infinitetalk("daemon", "--config", str(config), "--once", timeout_s=480)
        assert daemon.returncode == 0, daemon.stderr[-3000:]
        assert finished.wait(timeout=30), [f.event for f in seen]

        kinds = [f.event for f in seen if f.id is not None]
        assert seen[1].event == "ledger" and seen[1].json()["available"] is False  # before the daemon ran
        assert "snapshot" in kinds  # the ledger appeared
        # `created` may already be inside the snapshot when the daemon made the ledger and the job
        # within one poll; everything after it arrives as events, in order
        order = [k for k in kinds if k in ("created", "queued", "started", "done")]
        assert order in (["created", "queued", "started", "done"], ["queued", "started", "done"]), kinds
        assert kinds.count("progress") >= 2
        ids = [int(f.id) for f in seen if f.id is not None and f.event != "snapshot"]
        assert ids == sorted(ids) and len(ids) == len(set(ids))
        progress = [f.json()["event"]["data"] for f in seen if f.event == "progress"]
        assert any(p["num_chunks"] >= 1 and p["num_steps"] >= 1 for p in progress)
        done = seen[-1].json()
        job = done["job"]
        assert job["state"] == "done" and job["name"] == "example" and job["duration_s"] > 0

        video = httpx.get(url + job["urls"]["video"])
        assert video.status_code == 200
        assert video.content == (tmp_path / "outbox" / job["outputs"]["video"]).read_bytes()
        part = httpx.get(url + job["urls"]["video"], headers={"range": "bytes=0-1023"})
        assert part.status_code == 206 and part.content == video.content[:1024]
        copy = tmp_path / "served.mp4"
        copy.write_bytes(video.content)
        with av.open(str(copy)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
            assert container.streams.audio[0].codec_context.name == "aac"
        assert httpx.get(url + job["urls"]["poster"]).headers["content-type"] == "image/jpeg"

        # the daemon has exited: the dashboard still answers from the ledger
        after = httpx.get(url + "/api/jobs").json()
        assert after["counts"]["done"] == 1 and after["daemon"]["data"]["message"] == "stopped"
