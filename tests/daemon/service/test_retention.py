"""daemon/retention.py and daemon/control.py against a real ledger and real files (no daemon)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from daemon.config import RetentionSettings, load_settings
from daemon.control import apply_request
from daemon.ledger import Ledger
from daemon.outbox import Outbox
from daemon.retention import DAY_S, apply_retention, notice_removed_outputs


def _done_job(ledger: Ledger, outbox: Path, name: str, finished_at: float, jobs_dir: Path) -> str:
    row = ledger.insert_job(name=name, source=f"/in/{name}", state="waiting")
    ledger.admit(row.id, max_queued=20)
    ledger.claim_next(max_running=3)
    video, sidecar = outbox / f"{name}.mp4", outbox / f"{name}.json"
    video.write_bytes(b"v")
    # as a sidecar written before identities were recorded: it names its job and its video
    sidecar.write_text(json.dumps({"job_id": row.id, "outputs": {"video": str(video), "poster": None}}))
    (jobs_dir / row.id / "input").mkdir(parents=True)
    ledger.transition(
        row.id,
        "running",
        "done",
        finished_at=finished_at,
        output_video=str(video),
        output_json=str(sidecar),
        job_dir=str(jobs_dir / row.id),
    )
    return row.id


def test_retention_and_hand_deletion(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        "[retention]\noutputs_days = 7\narchive_days = 1\nledger_days = 30\nprogress_events_days = 1\n"
    )
    settings = load_settings(conf, environ={})
    settings.outbox.mkdir()
    ledger = Ledger(settings.ledger_path)
    now = time.time()
    old = _done_job(ledger, settings.outbox, "old", now - 40 * DAY_S, settings.jobs_dir)
    week = _done_job(ledger, settings.outbox, "week", now - 8 * DAY_S, settings.jobs_dir)
    fresh = _done_job(ledger, settings.outbox, "fresh", now - 3600, settings.jobs_dir)
    ledger.conn.execute(
        "INSERT INTO events (job_id, at, kind, data_json) VALUES (?, 0, 'progress', '{}')", (week,)
    )
    counts = apply_retention(settings, ledger, now=now)
    assert [
        e
        for e in ledger.conn.execute("SELECT kind FROM events WHERE job_id = ?", (week,))
        if e[0] == "progress"
    ] == []
    assert counts == {"outputs": 2, "archives": 2, "rows": 1, "progress": 1}
    assert ledger.find(old) is None  # past ledger_days: row and events gone
    assert ledger.get(week).deleted_at is not None and not (settings.outbox / "week.mp4").exists()
    assert not (settings.jobs_dir / week).exists()
    assert ledger.get(fresh).deleted_at is None and (settings.outbox / "fresh.mp4").exists()
    # a video removed by hand is shown as deleted, once
    (settings.outbox / "fresh.mp4").unlink()
    assert notice_removed_outputs(ledger) == [fresh]
    assert notice_removed_outputs(ledger) == []
    assert ledger.get(fresh).state == "done"
    off = dataclasses.replace(
        settings, retention=RetentionSettings(outputs_days=0, archive_days=0, ledger_days=0)
    )
    ledger.conn.execute(
        "INSERT INTO events (job_id, at, kind, data_json) VALUES (?, 0, 'progress', '{}')", (fresh,)
    )
    quiet = {"outputs": 0, "archives": 0, "rows": 0, "progress": 0}
    assert apply_retention(off, ledger, now=now + 1000 * DAY_S) == quiet
    # the default: the events table is append-only, progress events are kept
    assert ledger.conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'progress'").fetchone()[0] == 1


def test_requests_without_a_daemon(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("")
    settings = load_settings(conf, environ={})
    settings.outbox.mkdir()
    ledger = Ledger(settings.ledger_path)
    outbox = Outbox(settings.outbox)
    job = _done_job(ledger, settings.outbox, "a", time.time(), settings.jobs_dir)
    waiting = ledger.insert_job(name="w", source=str(tmp_path / "inbox" / "w"), state="waiting")
    (tmp_path / "inbox" / "w").mkdir(parents=True)
    assert not apply_request(settings, ledger, outbox, "retry", job).ok  # done: not retryable
    assert not apply_request(settings, ledger, outbox, "cancel", job).ok
    out = apply_request(settings, ledger, outbox, "cancel", waiting.id)
    assert out.ok and ledger.get(waiting.id).state == "cancelled"
    assert (settings.outbox / "failed" / "w").is_dir()  # the inbox entry is kept, not left to re-enter
    assert apply_request(settings, ledger, outbox, "delete", job).ok
    assert ledger.get(job).deleted_at is not None and not (settings.outbox / "a.mp4").exists()
    assert not apply_request(settings, ledger, outbox, "delete", "nope").ok
