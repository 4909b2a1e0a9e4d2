"""The page's scripts take the states and event kinds from the server (dashboard/views.py
`vocabulary`, from daemon/states.py) instead of naming them: the "All jobs" state filter offers
exactly the served states, and a job's page reloads its summary on every served state-change
event kind. Real uvicorn, real headless Chromium, a real ledger."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from daemon.ledger import Ledger
from daemon.states import EVENT_OF, STATES
from tests.dashboard.cdp import Browser, Page
from tests.dashboard.server_proc import dashboard_server, write_config
from tests.helpers.ledger import queue_job
from tests.helpers.proc import free_port

pytestmark = pytest.mark.timeout(120)


@contextmanager
def _opened(tmp_path: Path, dirs: tuple[Path, Path], browser: Browser, path: str) -> Iterator[Page]:
    """The dashboard served over the ledger of `dirs` (state_dir, outbox), its `path` open in the
    browser."""
    port = free_port()
    cfg = write_config(tmp_path / "it.toml", state_dir=dirs[0], outbox=dirs[1], port=port)
    with dashboard_server(cfg, port, tmp_path / "dashboard.log") as (url, _proc):
        browser.page.goto(url + path)
        yield browser.page


MENU = "[...document.getElementById('state').options].map((o) => [o.value, o.textContent])"


def test_the_state_filter_offers_exactly_the_served_states(
    tmp_path: Path, ledger: Ledger, state_dir: Path, outbox: Path, browser: Browser
) -> None:
    queue_job(ledger, "alice")
    with _opened(tmp_path, (state_dir, outbox), browser, "/?state=retry_wait#browse") as page:
        page.wait_for("document.getElementById('state').options.length > 1")
        served = page.evaluate(
            "fetch('/api/jobs').then((r) => r.json()).then((b) => b.states)", await_promise=True
        )
        assert served == [str(s) for s in STATES]
        menu = page.evaluate(MENU)
        assert [value for value, _ in menu] == ["", *served]
        assert (
            menu[0][1] == "any" and dict(menu)["retry_wait"] == "retry wait" and dict(menu)["done"] == "done"
        )
        assert page.evaluate("document.getElementById('state').value") == "retry_wait"  # the URL's view
        page.wait_for("document.body.dataset.ready === '1'")
        assert page.evaluate(MENU) == menu  # filled once: the snapshot and the list add nothing


def test_a_job_page_reloads_on_a_served_state_change_kind(
    tmp_path: Path, ledger: Ledger, state_dir: Path, outbox: Path, browser: Browser
) -> None:
    job = ledger.insert_job(
        name="bob", source="inbox/bob", state="waiting", waiting_reason="incomplete upload"
    )
    loads = (
        "performance.getEntriesByType('resource')"
        f".filter((e) => new URL(e.name).pathname === '/api/jobs/{job.id}').length"
    )
    with _opened(tmp_path, (state_dir, outbox), browser, f"/jobs/{job.id}") as page:
        page.wait_for(
            "document.body.dataset.ready === '1' && document.getElementById('conn').dataset.state === 'live'"
        )
        before = page.evaluate(loads)
        assert before >= 1
        # `rejected`, a state-change kind the script once left out of its own list
        ledger.transition(
            job.id, "waiting", "rejected", error_code="bad_json", error_message="job.json line 1: no prompt"
        )
        page.wait_for(f"{loads} > {before}")


def test_the_state_change_kinds_are_served(client: TestClient, ledger: Ledger) -> None:
    """`state_events` (state -> the kind of event entering it), in /api/jobs as in every
    vocabulary: the kinds a job's page reloads on."""
    queue_job(ledger, "alice")
    body = client.get("/api/jobs").json()
    assert body["state_events"] == {str(s): EVENT_OF[s] for s in STATES}
    assert set(body["state_events"].values()) <= set(body["event_kinds"])
    assert "progress" not in body["state_events"].values()
