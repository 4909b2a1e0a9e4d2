"""Operating at scale against a real ledger: paging (a stable cursor), filters and search in
/api/jobs, a job page whose size does not grow with its events, the sidecar route, the
heartbeat and the counters in /metrics (parsed with prometheus_client.parser), and
`infinitetalk status` as a real process (limits, filters, a closed pipe, a missing ledger)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from daemon import heartbeat
from daemon.ledger import Ledger
from tests.helpers.ledger import SPEC, finish_job, long_job, queue_job, run_job
from tests.helpers.proc import ROOT, infinitetalk


def _many(ledger: Ledger, n: int, prefix: str = "job") -> list[str]:
    """`n` jobs (queued, then moved straight to done/failed in bulk SQL: fast)."""
    ids = []
    with ledger.tx():
        for i in range(n):
            spec = SPEC | {"prompt": f"take {i} of a {'sunny beach' if i % 10 == 0 else 'studio'} scene"}
            row = ledger.insert_job(
                name=f"{prefix}-{i:03d}",
                source=f"inbox/{prefix}-{i:03d}",
                state="queued",
                spec_json=json.dumps(spec),
            )
            ids.append(row.id)
    return ids


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_paging_is_complete_and_stable_while_jobs_arrive(client: TestClient, ledger: Ledger) -> None:
    ids = _many(ledger, 120)
    seen: list[str] = []
    url = "/api/jobs?limit=50"
    pages = 0
    while url:
        body = client.get(url).json()
        seen += [j["id"] for j in body["jobs"]]
        url = body["page"]["next"]
        pages += 1
        if pages == 1:  # new uploads between pages neither repeat nor hide any job
            _many(ledger, 5, prefix="late")
    assert pages == 3
    assert seen == list(reversed(ids)), "newest first, every job once"
    first = client.get("/api/jobs?limit=50").json()
    assert [j["name"] for j in first["jobs"][:5]] == [f"late-{i:03d}" for i in (4, 3, 2, 1, 0)]
    assert first["page"]["next_before"] == first["jobs"][-1]["seq"]


def test_filter_and_search_by_name_id_prefix_and_prompt(
    client: TestClient, ledger: Ledger, outbox: Path
) -> None:
    ids = _many(ledger, 30)
    run_job(ledger, ids[0])
    finish_job(ledger, outbox, ids[0], "job-000")
    body = client.get("/api/jobs?state=done").json()
    assert [j["id"] for j in body["jobs"]] == [ids[0]] and body["page"]["next"] is None
    assert [j["name"] for j in client.get("/api/jobs?q=JOB-02").json()["jobs"]] == [
        f"job-{i:03d}" for i in range(29, 19, -1)
    ]
    assert [j["id"] for j in client.get(f"/api/jobs?q={ids[7][:12]}").json()["jobs"]] == [ids[7]]
    beach = client.get("/api/jobs?q=sunny%20beach").json()["jobs"]
    assert sorted(j["name"] for j in beach) == ["job-000", "job-010", "job-020"]
    # LIKE wildcards are literal characters in a search
    assert client.get("/api/jobs?q=%25").json()["jobs"] == []
    assert client.get("/api/jobs?q=job_0").json()["jobs"] == []
    assert client.get("/api/jobs?q=beach&state=done").json()["jobs"][0]["id"] == ids[0]
    assert client.get("/api/jobs?before=x").status_code == 400
    assert client.get("/api/jobs?q=" + "a" * 201).status_code == 400


def test_a_job_with_thousands_of_events_has_a_bounded_page(client: TestClient, ledger: Ledger) -> None:
    job = long_job(ledger, "long-video")
    response = client.get(f"/api/jobs/{job.id}")
    body = response.json()
    summary = body["summary"]
    assert summary["events_total"] == 3004 and summary["progress_events"] == 3001
    assert [e["kind"] for e in summary["timeline"]] == ["created", "queued", "started"]
    assert 100 <= len(summary["series"]) <= 121
    assert summary["series"][-1][1] == pytest.approx(2999 / 3000)
    assert len(body["events"]) == 100 and body["events_next"]
    assert len(response.content) < 40_000, len(response.content)
    # the raw events, page by page, every one once
    seen, url = [], body["events_next"].replace("after=", "limit=1000&after=")
    seen = [e["id"] for e in body["events"]]
    while url:
        page = client.get(url).json()
        seen += [e["id"] for e in page["events"]]
        url = page["next"]
    assert len(seen) == len(set(seen)) == 3004 and seen == sorted(seen)


def test_attempts_and_failure_detail_on_the_job_api_only(client: TestClient, ledger: Ledger) -> None:
    job = queue_job(ledger, "flaky")
    run_job(ledger, job.id)
    ledger.transition(
        job.id, "running", "retry_wait", error_code="cuda_oom", error_message="CUDA out of memory"
    )
    ledger.transition(job.id, "retry_wait", "queued", queued_at=ledger.clock())
    ledger.claim_next(max_running=3)
    detail = {
        "traceback": "Traceback (most recent call last):\n  ...\nRuntimeError: boom",
        "log_tail": ["chunk 1"],
    }
    ledger.set_columns(job.id, failure_detail=json.dumps(detail | {"attempt": 2}))
    ledger.transition(job.id, "running", "failed", finished_at=ledger.clock(), error_code="render_error")
    body = client.get(f"/api/jobs/{job.id}").json()
    assert body["job"]["failure"]["traceback"].endswith("RuntimeError: boom")
    attempts = body["summary"]["attempts"]
    assert [(a["attempt"], a["outcome"], a["error_code"]) for a in attempts] == [
        (1, "retry", "cuda_oom"),
        (2, "failed", "render_error"),
    ]
    assert all(a["started_at"] and a["ended_at"] for a in attempts)
    listed = client.get("/api/jobs?state=failed").json()["jobs"][0]
    assert "failure" not in listed and "failure_detail" not in listed


def test_sidecar_is_served_with_the_real_resolution_and_tiny_flag(
    client: TestClient, ledger: Ledger, outbox: Path
) -> None:
    job = queue_job(ledger, "tiny-one")
    run_job(ledger, job.id)
    assert client.get(f"/jobs/{job.id}/json").status_code == 404  # running: nothing yet
    finish_job(ledger, outbox, job.id, "tiny-one")
    sidecar = {
        "job_id": job.id,
        "width": 64,
        "height": 64,
        "fps": 25,
        "model": {"tiny": True, "device": "cpu"},
        "timings_s": {"prepare": 0.5, "render": 12.5},
    }
    (outbox / "tiny-one.json").write_text(json.dumps(sidecar))
    served = client.get(f"/jobs/{job.id}/json")
    assert served.status_code == 200 and served.json() == sidecar
    tile = client.get("/api/jobs").json()["jobs"][0]
    assert tile["output"]["width"] == 64 and tile["output"]["tiny"] is True
    assert tile["urls"]["json"] == f"/jobs/{job.id}/json"
    assert client.get(f"/api/jobs/{job.id}").json()["summary"]["timings_s"] == sidecar["timings_s"]


def test_heartbeat_liveness_and_metrics(client: TestClient, ledger: Ledger, outbox: Path) -> None:
    assert client.get("/api/daemon").json()["heartbeat"]["state"] == "unknown"
    workers = [
        {
            "index": 0,
            "device": "cuda:0",
            "model_loaded": True,
            "jobs": [],
            "gpu_memory_used": 2e9,
            "gpu_memory_total": 8e10,
            "gpu_util": 50,
        }
    ]
    heartbeat.write(
        ledger.conn, state="ready", pid=4242, started_at=time.time(), data={"tiny": True, "workers": workers}
    )
    beat = client.get("/api/daemon").json()["heartbeat"]
    assert beat["up"] is True and beat["pid"] == 4242 and beat["tiny"] is True
    for i in range(3):
        job = queue_job(ledger, f"done-{i}")
        run_job(ledger, job.id)
        finish_job(ledger, outbox, job.id, f"done-{i}", duration_s=2.0)
    bad = ledger.insert_job(name="bad", source="inbox/bad", state="rejected", error_code="bad_json")
    m = _samples(client.get("/metrics").text)
    assert m[("infinitetalk_daemon_up", ())] == 1 and m[("infinitetalk_workers_ready", ())] == 1
    assert m[("infinitetalk_model_loaded", (("device", "cuda:0"),))] == 1
    assert m[("infinitetalk_gpu_memory_used_bytes", (("device", "cuda:0"),))] == 2e9
    assert m[("infinitetalk_gpu_utilization_ratio", (("device", "cuda:0"),))] == 0.5
    assert m[("infinitetalk_tiny_model", ())] == 1
    assert m[("infinitetalk_jobs_finished_total", (("error_code", ""), ("outcome", "done")))] == 3
    assert m[("infinitetalk_jobs_finished_total", (("error_code", "bad_json"), ("outcome", "rejected")))] == 1
    assert m[("infinitetalk_video_rendered_seconds_total", ())] == 6.0
    # retention drops the rows; the counters never go down
    assert ledger.purge_finished_before(time.time() + 10) == 4 and bad.id
    m = _samples(client.get("/metrics").text)
    assert m[("infinitetalk_jobs", (("state", "done"),))] == 0
    assert m[("infinitetalk_jobs_finished_total", (("error_code", ""), ("outcome", "done")))] == 3
    assert m[("infinitetalk_video_rendered_seconds_total", ())] == 6.0
    # a beat older than the stale limit: down, since its time
    old = time.time() - heartbeat.STALE_AFTER_S - 5
    heartbeat.write(ledger.conn, state="ready", pid=4242, started_at=old, data={"workers": workers}, now=old)
    beat = client.get("/api/daemon").json()["heartbeat"]
    assert beat["up"] is False and beat["down_since"] == pytest.approx(old)
    m = _samples(client.get("/metrics").text)
    assert m[("infinitetalk_daemon_up", ())] == 0 and m[("infinitetalk_workers_ready", ())] == 0


# ---------------------------------------------------------------------- infinitetalk status


def _status(tmp_path: Path, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "it.toml"
    config.write_text(f'state_dir = "{state_dir}"\n')
    return infinitetalk("status", "--config", str(config), *args)


def test_status_limits_filters_and_summary_first(tmp_path: Path, ledger: Ledger, state_dir: Path) -> None:
    _many(ledger, 80)
    out = _status(tmp_path, state_dir)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0].startswith("daemon: no heartbeat") and "80 jobs: 80 queued" in lines[0]
    assert lines[1] == "newest 50 of 80 job(s) (--limit 50)"
    assert len(lines) == 52 and "job-079" in lines[2] and "job-030" in lines[-1]
    assert "ago (" in lines[2]  # human-readable times
    named = _status(tmp_path, state_dir, "--name", "JOB-07", "--limit", "3").stdout.splitlines()
    assert [line.split()[2] for line in named[2:]] == ["job-079", "job-078", "job-077"]
    assert _status(tmp_path, state_dir, "--state", "done").stdout.splitlines()[1].startswith("newest 0 of 0")
    assert _status(tmp_path, state_dir, "--state", "bogus").returncode == 2
    data = json.loads(_status(tmp_path, state_dir, "--json", "--limit", "5").stdout)
    assert len(data["jobs"]) == 5 and data["matching"] == 80 and data["counts"]["queued"] == 80
    assert _status(tmp_path, state_dir, "--check").returncode == 3  # no heartbeat: not up


def test_status_into_a_closed_pipe_and_without_a_ledger(
    tmp_path: Path, ledger: Ledger, state_dir: Path
) -> None:
    _many(ledger, 1000)  # more than a pipe holds (64 KiB), so the writer does meet the closed end
    config = tmp_path / "it.toml"
    config.write_text(f'state_dir = "{state_dir}"\n')
    piped = subprocess.run(
        f"{sys.executable} -m daemon status --config {config} --limit 1000 | head -3",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert len(piped.stdout.splitlines()) == 3
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr
    missing = _status(tmp_path, tmp_path / "nowhere")
    assert missing.returncode == 1 and missing.stdout == ""
    assert "no ledger at" in missing.stderr and str(tmp_path / "nowhere") in missing.stderr
