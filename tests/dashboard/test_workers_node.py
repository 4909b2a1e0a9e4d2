"""Each render worker with its node, device, state and current job: the real daemon (local
executor, fake pipeline) writes its heartbeat; `infinitetalk status` and the dashboard's page
(real uvicorn, headless Chromium) show the worker on this host's hostname, idle, then rendering
the job, then idle again. (The Ray executor's node names: tests/daemon/ray/test_ray_pool.py.)"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest

from tests.dashboard.cdp import Browser, text_of
from tests.dashboard.server_proc import dashboard_server, write_config
from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle
from tests.helpers.proc import free_port

pytestmark = pytest.mark.timeout(180)


def _worker_lines(d: Daemon) -> list[str]:
    out = d.cli("status")
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith("  worker ")]


def test_status_and_dashboard_show_each_worker_with_its_node_state_and_job(
    tmp_path: Path, browser: Browser
) -> None:
    host = socket.gethostname()
    d = Daemon(tmp_path / "d", config={"max_running": 1})
    port = free_port()
    config = write_config(tmp_path / "dashboard.toml", state_dir=d.state, outbox=d.outbox, port=port)
    try:
        d.start()
        d.wait_ready()
        # first `loading` (no model yet), then `idle`
        d.wait_for(lambda: any(line.endswith("idle") for line in _worker_lines(d)), 60, "an idle worker")
        assert _worker_lines(d) == [f"  worker 0  node {host}  cpu  idle"]
        beat = json.loads(d.query("SELECT data_json FROM heartbeat")[0]["data_json"])
        assert [(w["node"], w["state"]) for w in beat["workers"]] == [(host, "idle")]

        with dashboard_server(config, port, tmp_path / "dashboard.log") as (url, _proc):
            page = browser.page
            page.goto(url + "/")
            page.wait_for("document.body.dataset.ready === '1'")
            page.wait_for(f"{text_of('#workers-list')}.includes('idle')", 20)
            row = page.evaluate("[...document.querySelectorAll('#workers-list td')].map(c => c.textContent)")
            assert row == ["0", host, "cpu", "idle", ""], row

            staging = d.inbox / ".alice.tmp"
            make_job_bundle(staging, duration_s=1.0, seed=3, prompt="SLOW talking", sample_steps=6)
            os.rename(staging, d.inbox / "alice")
            job = d.wait_state("alice", "running", timeout_s=60)
            d.wait_for(
                lambda: any(line.endswith(f"rendering {job['id']} (alice)") for line in _worker_lines(d)),
                30,
                "status to show the job on the worker",
            )
            assert re.fullmatch(
                rf"  worker 0  node {re.escape(host)}  cpu  rendering {job['id']} \(alice\)",
                _worker_lines(d)[0],
            )
            # the page polls the heartbeat every 5 s; the job's name links to its page
            page.wait_for(f"{text_of('#workers-list')}.includes('rendering')", 20)
            row = page.evaluate("[...document.querySelectorAll('#workers-list td')].map(c => c.textContent)")
            assert row == ["0", host, "cpu", "rendering", "alice"], row
            href = page.evaluate("document.querySelector('#workers-list a.job-name').getAttribute('href')")
            assert job["id"] in href

            d.wait_state("alice", "done", timeout_s=90)
            sidecar = json.loads((d.outbox / "alice.json").read_text())
            assert sidecar["model"]["node"] == host
            assert sidecar["chunks"] == [{"chunk": c, "node": host} for c in (1, 2, 3)]
            page.wait_for(f"{text_of('#workers-list')}.includes('idle')", 20)
            assert d.stop() == 0
            # a stopped daemon has no workers to show
            page.wait_for("!document.querySelector('#workers .empty').hidden", 20)
        assert _worker_lines(d) == []
    finally:
        d.stop()
