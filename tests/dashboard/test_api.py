"""/api/jobs, /api/jobs/{id}, /healthz and /metrics against a real ledger."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from daemon.ledger import Ledger
from tests.helpers.ledger import SPEC, finish_job, queue_job, reject_job, run_job


def test_jobs_lists_states_counts_and_decoded_settings(
    client: TestClient, ledger: Ledger, outbox: Path
) -> None:
    first = queue_job(ledger, "alice")
    second = queue_job(ledger, "bob", priority=5)
    ledger.insert_job(name="carol", source="inbox/carol", state="waiting", waiting_reason="incomplete upload")
    rejected = reject_job(ledger, "dave", "BAD_JSON", "line 3: trailing comma")
    run_job(ledger, second.id)  # priority 5 goes first

    body = client.get("/api/jobs").json()
    assert body["ledger"] == {"available": True}
    assert body["counts"] == {
        "waiting": 1,
        "queued": 1,
        "running": 1,
        "retry_wait": 0,
        "done": 0,
        "failed": 0,
        "rejected": 1,
        "cancelled": 0,
    }
    jobs = {j["name"]: j for j in body["jobs"]}
    assert set(jobs) == {"alice", "bob", "carol", "dave"}
    assert jobs["alice"]["state"] == "queued" and jobs["alice"]["settings"] == SPEC
    assert jobs["bob"]["state"] == "running"
    assert (jobs["bob"]["chunk"], jobs["bob"]["num_chunks"], jobs["bob"]["step"]) == (1, 2, 2)
    assert jobs["bob"]["elapsed_s"] >= 0 and jobs["bob"]["eta_s"] is not None
    assert jobs["carol"]["waiting_reason"] == "incomplete upload"
    assert jobs["dave"]["error_code"] == "BAD_JSON" and jobs["dave"]["error_field"] == "dave.json"
    assert body["last_event_id"] == ledger.conn.execute("SELECT MAX(id) FROM events").fetchone()[0]
    assert first.id in {j["id"] for j in body["jobs"]} and rejected.id == jobs["dave"]["id"]


def test_outputs_are_urls_and_names_never_server_paths(
    client: TestClient, ledger: Ledger, outbox: Path
) -> None:
    job = queue_job(ledger, "alice")
    run_job(ledger, job.id)
    finish_job(ledger, outbox, job.id, "alice")
    for url in ("/api/jobs", f"/api/jobs/{job.id}"):
        assert str(outbox) not in client.get(url).text, url
    view = client.get(f"/api/jobs/{job.id}").json()["job"]
    assert view["outputs"] == {"video": "alice.mp4", "poster": "alice.jpg", "json": "alice.json"}
    assert view["urls"]["video"] == f"/jobs/{job.id}/video"
    assert view["urls"]["download"] == f"/jobs/{job.id}/video?download=1"
    assert view["urls"]["poster"] == f"/jobs/{job.id}/poster"
    assert view["render_s"] == 12.5 and view["duration_s"] == 3.0 and view["frames"] == 75


def test_job_detail_has_the_whole_history_in_order(client: TestClient, ledger: Ledger, outbox: Path) -> None:
    job = queue_job(ledger, "alice")
    run_job(ledger, job.id)
    ledger.update_progress(job.id, progress=0.75, chunk=2, num_chunks=2, step=2, num_steps=4, stage="denoise")
    finish_job(ledger, outbox, job.id, "alice")
    queue_job(ledger, "other")  # events of other jobs are not in this history
    body = client.get(f"/api/jobs/{job.id}").json()
    kinds = [e["kind"] for e in body["events"]]
    assert kinds == ["created", "queued", "started", "progress", "progress", "done"]
    ids = [e["id"] for e in body["events"]]
    assert ids == sorted(ids)
    assert body["events"][4]["data"] == {
        "progress": 0.75,
        "chunk": 2,
        "num_chunks": 2,
        "step": 2,
        "num_steps": 4,
        "stage": "denoise",
    }


def test_filters_limits_and_errors(client: TestClient, ledger: Ledger) -> None:
    for i in range(5):
        queue_job(ledger, f"job{i}")
    ledger.insert_job(name="w", source="inbox/w", state="waiting", waiting_reason="queue full")
    body = client.get("/api/jobs?state=waiting").json()
    assert [j["name"] for j in body["jobs"]] == ["w"]
    body = client.get("/api/jobs?state=queued&limit=2").json()
    assert [j["name"] for j in body["jobs"]] == ["job4", "job3"]  # newest first
    bad = client.get("/api/jobs?state=bogus")
    assert bad.status_code == 400 and "bogus" in bad.json()["error"]
    assert client.get("/api/jobs?limit=0").status_code == 400
    missing = client.get("/api/jobs/nosuchjob")
    assert missing.status_code == 404 and "nosuchjob" in missing.json()["error"]
    assert client.get("/api/jobs/bad.id").status_code == 404


def test_missing_ledger_is_a_clear_503_and_health_stays_up(client: TestClient, cfg) -> None:  # type: ignore[no-untyped-def]
    assert not cfg.ledger_path.exists()
    response = client.get("/api/jobs")
    assert response.status_code == 503
    body = response.json()
    assert body["ledger"]["available"] is False and "no such file" in body["ledger"]["reason"]
    assert body["jobs"] == []
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["ledger"]["available"] is False
    assert "infinitetalk_ledger_up 0" in client.get("/metrics").text
    assert client.get("/").status_code == 200  # the page itself still loads


def test_ledger_appearing_later_is_picked_up(client: TestClient, cfg) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/api/jobs").status_code == 503
    led = Ledger(cfg.ledger_path)
    try:
        queue_job(led, "late")
        body = client.get("/api/jobs").json()
        assert [j["name"] for j in body["jobs"]] == ["late"]
    finally:
        led.close()


def test_metrics_in_prometheus_text(client: TestClient, ledger: Ledger, outbox: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    done = queue_job(ledger, "a")
    run_job(ledger, done.id)
    finish_job(ledger, outbox, done.id, "a")
    running = queue_job(ledger, 'quote"d')
    run_job(ledger, running.id)
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("infinitetalk_ledger_up", ())] == 1
    assert samples[("infinitetalk_jobs", (("state", "done"),))] == 1
    assert samples[("infinitetalk_jobs", (("state", "running"),))] == 1
    assert families["infinitetalk_render_seconds"].type == "histogram"
    assert samples[("infinitetalk_render_seconds_bucket", (("le", "10.0"),))] == 0
    assert samples[("infinitetalk_render_seconds_bucket", (("le", "30.0"),))] == 1
    assert samples[("infinitetalk_render_seconds_sum", ())] == 12.5
    assert samples[("infinitetalk_render_seconds_count", ())] == 1
    assert samples[("infinitetalk_queue_wait_seconds_count", ())] == 2
    assert samples[("infinitetalk_job_progress", (("id", running.id), ("name", 'quote"d')))] == 0.25
    last = ledger.conn.execute("SELECT MAX(id) FROM events").fetchone()[0]
    assert samples[("infinitetalk_last_event_id", ())] == last


def test_snapshot_has_the_daemons_last_word(client: TestClient, ledger: Ledger) -> None:
    assert client.get("/api/jobs").json()["daemon"] is None
    ledger.daemon_event("started", pid=99)
    queue_job(ledger, "a")
    ledger.daemon_event("stopped", pid=99)
    daemon = client.get("/api/jobs").json()["daemon"]
    assert daemon["kind"] == "daemon" and daemon["job_id"] is None
    assert daemon["data"] == {"message": "stopped", "pid": 99}
    assert client.get("/api/jobs?state=queued").json()["daemon"]["data"]["message"] == "stopped"


def test_healthz_reports_the_ledger(client: TestClient, ledger: Ledger) -> None:
    queue_job(ledger, "a")
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["ledger"]["available"] is True
    assert body["ledger"]["last_event_id"] == 2


def test_reads_after_the_daemon_closed_the_ledger(
    client: TestClient, ledger: Ledger, state_dir: Path
) -> None:
    queue_job(ledger, "a")
    ledger.close()  # a clean daemon exit checkpoints and removes -wal and -shm
    assert not (state_dir / "ledger.sqlite3-wal").exists()
    body = client.get("/api/jobs").json()
    assert [j["name"] for j in body["jobs"]] == ["a"]
    assert (
        not (state_dir / "ledger.sqlite3-wal").exists()
        or (state_dir / "ledger.sqlite3-wal").stat().st_size == 0
    )


def test_create_app_takes_the_daemons_settings(
    tmp_path: Path, ledger: Ledger, state_dir: Path, outbox: Path
) -> None:
    from daemon.config import settings_from_mapping
    from dashboard.app import create_app

    queue_job(ledger, "from-settings")
    settings = settings_from_mapping(
        {"state_dir": str(state_dir), "outbox": str(outbox), "dashboard": {"port": 8123}}, base=tmp_path
    )
    app = create_app(settings)
    assert app.state.config.port == 8123 and app.state.config.ledger_path == state_dir / "ledger.sqlite3"
    with TestClient(app, base_url="http://localhost:8123") as c:
        assert [j["name"] for j in c.get("/api/jobs").json()["jobs"]] == ["from-settings"]
