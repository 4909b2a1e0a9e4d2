"""The job states, their groups and the event kinds reach the page from daemon/states.py: in
/api/jobs (live and paged), in its 503 body, in the /events snapshot and in its ledger-gone note,
so the scripts name none of them."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from daemon.ledger import Ledger
from daemon.states import ACTIVE, EVENT_KINDS, PROBLEM, STATES
from tests.dashboard.sse_client import frames, take
from tests.helpers.ledger import queue_job

pytestmark = pytest.mark.timeout(60)

#: what the page's scripts used to hard-code (index.js STATES and groups, common.js EVENT_KINDS)
PAGE_STATES = ["waiting", "queued", "running", "retry_wait", "done", "failed", "rejected", "cancelled"]


def _check(body: dict[str, Any]) -> None:
    assert body["states"] == [str(s) for s in STATES] == PAGE_STATES
    assert body["state_groups"] == {
        "active": [str(s) for s in ACTIVE],
        "problem": [str(s) for s in PROBLEM],
    }
    assert body["state_groups"]["problem"] == ["failed", "rejected", "cancelled"]
    assert body["event_kinds"] == list(EVENT_KINDS)
    assert {"created", "started", "progress", "retry", "done", "deleted", "daemon"} <= set(
        body["event_kinds"]
    )


def test_api_jobs_serves_the_states_and_event_kinds(client: TestClient, ledger: Ledger) -> None:
    queue_job(ledger, "alice")
    live = client.get("/api/jobs")
    assert live.status_code == 200
    _check(live.json())
    paged = client.get("/api/jobs?state=queued&limit=5").json()
    _check(paged)
    assert [j["name"] for j in paged["jobs"]] == ["alice"]
    assert list(paged["counts"]) == PAGE_STATES  # every state counted, in the same order


def test_a_missing_ledger_still_names_them(client: TestClient) -> None:
    response = client.get("/api/jobs")
    assert response.status_code == 503
    _check(response.json())
    with client.stream("GET", "/events") as stream:
        _, gone = take(frames(stream.iter_lines()), 2)
    assert gone.event == "ledger" and gone.json()["available"] is False
    _check(gone.json())


def test_the_events_snapshot_names_them(client: TestClient, ledger: Ledger) -> None:
    queue_job(ledger, "bob")
    with client.stream("GET", "/events") as stream:
        _, _, snapshot = take(frames(stream.iter_lines()), 3)
    assert snapshot.event == "snapshot"
    _check(snapshot.json())
