"""daemon/webhooks.py without the daemon: a full sender queue drops (and records) a delivery
instead of blocking the main loop; no URLs start no thread; `status` reads an older ledger."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from daemon import webhooks
from daemon.config import NotifySettings
from daemon.ledger import Ledger


@pytest.fixture()
def hanging_url() -> Iterator[str]:
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            release.wait(20)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    release.set()
    server.shutdown()
    server.server_close()


def test_a_full_queue_drops_the_delivery_without_waiting(
    tmp_path: Path, hanging_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "QUEUE_MAX", 1)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    hooks = webhooks.Webhooks(
        NotifySettings(webhook_urls=(hanging_url,), webhook_timeout_s=5.0, webhook_retry_s=0.0), ledger
    )
    for n in range(3):
        ledger.insert_job(name=f"j{n}", source=f"/in/j{n}", state="rejected", error_code="bad_json")
    started = time.monotonic()
    hooks.tick()
    assert time.monotonic() - started < 1.0  # the main loop never waits for a POST
    rows = ledger.conn.execute("SELECT outcome, attempt, error FROM webhook_deliveries").fetchall()
    dropped = [r for r in rows if r[0] == "dropped"]
    assert dropped and all(r[1] == 0 and "more than 1 deliveries waiting" in r[2] for r in dropped)
    summary = webhooks.summary(ledger.conn)
    assert summary["counts"]["dropped"] == len(dropped)
    hooks.senders[0].stopping.set()
    ledger.close()


def test_no_urls_no_threads(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    before = threading.active_count()
    hooks = webhooks.Webhooks(NotifySettings(), ledger)
    ledger.insert_job(name="a", source="/in/a", state="rejected", error_code="bad_json")
    hooks.tick()
    hooks.close()
    assert hooks.senders == [] and threading.active_count() == before
    assert ledger.conn.execute("SELECT COUNT(*) FROM webhook_deliveries").fetchone()[0] == 0
    ledger.close()


def test_status_reads_a_ledger_without_the_table() -> None:
    conn = sqlite3.connect(":memory:")
    assert webhooks.summary(conn) == {"counts": {}, "recent": []}
