"""/events: ledger event ids as SSE ids, snapshot first, Last-Event-ID resume missing nothing,
heartbeats, and carrying on across a missing ledger."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from daemon.ledger import Ledger
from dashboard.app import create_app
from dashboard.config import DashboardConfig
from tests.dashboard.sse_client import frames, take
from tests.helpers.ledger import finish_job, queue_job, run_job

pytestmark = pytest.mark.timeout(60)


def _event_ids(ledger: Ledger, after: int = 0) -> list[int]:
    return [r[0] for r in ledger.conn.execute("SELECT id FROM events WHERE id > ? ORDER BY id", (after,))]


def test_snapshot_then_every_event_with_ledger_ids(client: TestClient, ledger: Ledger, outbox: Path) -> None:
    first = queue_job(ledger, "alice")
    with client.stream("GET", "/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        stream = frames(response.iter_lines())
        hello, ledger_frame, snapshot = take(stream, 3)
        assert hello.retry == 3000
        assert ledger_frame.event == "ledger" and ledger_frame.json() == {"available": True}
        assert snapshot.event == "snapshot" and snapshot.id == "2"
        body = snapshot.json()
        assert body["last_event_id"] == 2 and [j["name"] for j in body["jobs"]] == ["alice"]

        run_job(ledger, first.id)
        finish_job(ledger, outbox, first.id, "alice")
        expected = _event_ids(ledger, after=2)
        got = take(stream, len(expected))
    assert [int(f.id or 0) for f in got] == expected
    assert [f.event for f in got] == ["started", "progress", "done"]
    last = got[-1].json()
    assert last["event"]["kind"] == "done" and last["event"]["job_id"] == first.id
    assert last["job"]["state"] == "done" and last["job"]["urls"]["video"] == f"/jobs/{first.id}/video"
    assert last["counts"]["done"] == 1 and last["counts"]["queued"] == 0
    assert got[1].json()["event"]["data"]["chunk"] == 1
    assert last["event"]["data"]["output_video"] == "alice.mp4"
    assert all(str(outbox) not in f.data for f in got)  # server paths stay on the server


def test_reconnect_with_last_event_id_misses_nothing(
    client: TestClient, ledger: Ledger, outbox: Path
) -> None:
    jobs = [queue_job(ledger, f"job{i}") for i in range(3)]
    with client.stream("GET", "/events") as response:
        stream = frames(response.iter_lines())
        snapshot = take(stream, 3)[-1]
        run_job(ledger, jobs[0].id)
        seen = take(stream, 2)  # started, progress
    last_seen = seen[-1].id
    assert last_seen is not None
    # while the browser is away: many events, more than one read batch
    finish_job(ledger, outbox, jobs[0].id, "job0")
    for i in range(600):
        ledger.daemon_event(f"tick {i}")
    missed = _event_ids(ledger, after=int(last_seen))
    with client.stream("GET", "/events", headers={"last-event-id": last_seen}) as response:
        stream = frames(response.iter_lines())
        got = take(stream, 2 + len(missed))  # hello, the ledger frame, then exactly the missed events
    assert got[0].retry == 3000 and got[1].event == "ledger"
    assert [int(f.id or 0) for f in got[2:]] == missed
    assert all(f.event != "snapshot" for f in got)
    assert got[2].event == "done" and got[-1].json()["event"]["data"] == {"message": "tick 599"}
    assert int(snapshot.id or 0) < int(last_seen)


def test_unknown_position_gets_a_fresh_snapshot(client: TestClient, ledger: Ledger, outbox: Path) -> None:
    job = queue_job(ledger, "old")
    run_job(ledger, job.id)
    finish_job(ledger, outbox, job.id, "old")
    queue_job(ledger, "new")
    newest = _event_ids(ledger)[-1]
    # the events after id 1 were pruned (retention): replay is impossible, so a snapshot comes
    ledger.purge_finished_before(ledger.clock() + 1)
    for header in ("1", str(newest + 1000), "not-a-number"):
        with client.stream("GET", "/events", headers={"last-event-id": header}) as response:
            got = take(frames(response.iter_lines()), 3)
        assert got[2].event == "snapshot", header
        assert got[2].id == str(newest)
        assert [j["name"] for j in got[2].json()["jobs"]] == ["new"]


def test_heartbeats(cfg: DashboardConfig, ledger: Ledger) -> None:
    with (
        TestClient(create_app(replace(cfg, ping_s=0.2)), base_url="http://127.0.0.1") as c,
        c.stream("GET", "/events") as response,
    ):
        stream = frames(response.iter_lines())
        pings = [f for f in take(stream, 6, skip_comments=False) if any("ping" in x for x in f.comments)]
    assert len(pings) >= 2


def test_stream_survives_the_ledger_going_away_and_coming_back(
    client: TestClient, cfg: DashboardConfig, outbox: Path
) -> None:
    with client.stream("GET", "/events") as response:
        stream = frames(response.iter_lines())
        _, gone = take(stream, 2)
        assert gone.event == "ledger" and gone.json()["available"] is False
        assert "no such file" in gone.json()["reason"] and gone.id is None

        led = Ledger(cfg.ledger_path)  # the daemon starts
        queue_job(led, "first")
        back, snapshot = take(stream, 2)
        assert back.event == "ledger" and back.json() == {"available": True}
        assert snapshot.event == "snapshot" and [j["name"] for j in snapshot.json()["jobs"]] == ["first"]

        led.close()  # the ledger is moved away (a new state_dir), then a fresh one appears
        os.rename(cfg.ledger_path, cfg.ledger_path.with_suffix(".old"))
        for suffix in ("-wal", "-shm"):
            Path(str(cfg.ledger_path) + suffix).unlink(missing_ok=True)
        gone_again = take(stream, 1)[0]
        assert gone_again.event == "ledger" and gone_again.json()["available"] is False
        fresh = Ledger(cfg.ledger_path)
        queue_job(fresh, "second")
        back, snapshot = take(stream, 2)
        fresh.close()
    assert snapshot.event == "snapshot" and snapshot.id == "2"
    assert [j["name"] for j in snapshot.json()["jobs"]] == ["second"]


def test_events_pruned_inside_the_replay_range_give_a_snapshot(
    client: TestClient, ledger: Ledger, outbox: Path
) -> None:
    waiting = ledger.insert_job(name="keeps-waiting", source="inbox/w", state="waiting")
    position = _event_ids(ledger)[-1]  # the client saw this much
    old = queue_job(ledger, "old")
    run_job(ledger, old.id)
    finish_job(ledger, outbox, old.id, "old")
    queue_job(ledger, "later")
    ledger.conn.execute("UPDATE jobs SET finished_at = 1 WHERE id = ?", (old.id,))
    assert ledger.purge_finished_before(2) == 1  # retention removes "old" and its events
    with client.stream("GET", "/events", headers={"last-event-id": str(position)}) as response:
        got = take(frames(response.iter_lines()), 3)
    assert got[2].event == "snapshot"  # replaying "later" alone would leave "old" on the page
    assert [j["name"] for j in got[2].json()["jobs"]] == ["keeps-waiting", "later"]
    assert waiting.id == got[2].json()["jobs"][0]["id"]
