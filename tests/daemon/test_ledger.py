"""daemon/ledger.py on real SQLite: schema, CAS transitions with events, caps, claim order, races."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from daemon.errors import LedgerConflict
from daemon.ledger import JOB_COLUMNS, MIGRATIONS, Ledger, connect, events_after, status_snapshot


@pytest.fixture()
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite3")


def _queued(ledger: Ledger, name: str, priority: int = 0) -> str:
    row = ledger.insert_job(
        name=name, source=f"/in/{name}", state="waiting", waiting_reason="checking upload"
    )
    assert ledger.admit(row.id, max_queued=100, priority=priority) is not None
    return row.id


def test_schema_wal_and_version(ledger: Ledger) -> None:
    assert ledger.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    cols = [r[1] for r in ledger.conn.execute("PRAGMA table_info(jobs)")]
    # the migrations build each declared column (a field of JobRow) once and nothing else: a column
    # that migration 0 leaves to a later migration which never adds it, or one a migration adds
    # without its field, fails here
    assert sorted(cols) == sorted(JOB_COLUMNS)
    assert {r[1] for r in ledger.conn.execute("PRAGMA table_info(events)")} == {
        "id",
        "job_id",
        "at",
        "kind",
        "data_json",
    }
    Ledger(ledger.path).close()  # migrating again is a no-op


def test_every_state_change_has_its_event(ledger: Ledger) -> None:
    job = _queued(ledger, "a")
    ledger.claim_next(max_running=3)
    ledger.update_progress(job, progress=0.5, chunk=1, num_chunks=2, step=2, num_steps=4, stage="denoise")
    ledger.transition(job, "running", "done", finished_at=1.0, output_video="/o/a.mp4")
    kinds = [e["kind"] for e in events_after(ledger.conn) if e["job_id"] == job]
    assert kinds == ["created", "waiting", "queued", "started", "progress", "done"]
    progress = [e for e in events_after(ledger.conn) if e["kind"] == "progress"][0]["data"]
    assert progress == {
        "progress": 0.5,
        "chunk": 1,
        "num_chunks": 2,
        "step": 2,
        "num_steps": 4,
        "stage": "denoise",
    }


def test_transition_is_compare_and_set(ledger: Ledger) -> None:
    job = _queued(ledger, "a")
    before = len(events_after(ledger.conn))
    with pytest.raises(LedgerConflict, match="expected state running, found queued"):
        ledger.transition(job, "running", "done")
    with pytest.raises(LedgerConflict, match="no such job"):
        ledger.transition("nope", "queued", "running")
    assert len(events_after(ledger.conn)) == before  # a failed transition writes nothing
    assert ledger.get(job).state == "queued"


def test_queue_cap_is_enforced_in_the_ledger(ledger: Ledger) -> None:
    rows = [ledger.insert_job(name=f"j{i}", source=f"/in/j{i}", state="waiting") for i in range(4)]
    admitted = [ledger.admit(r.id, max_queued=2) for r in rows]
    assert [a is not None for a in admitted] == [True, True, False, False]
    assert ledger.counts()["queued"] == 2 and ledger.counts()["waiting"] == 2


def test_claim_order_priority_then_arrival_and_running_cap(ledger: Ledger) -> None:
    a = _queued(ledger, "a")
    b = _queued(ledger, "b", priority=5)
    c = _queued(ledger, "c")
    d = _queued(ledger, "d")
    claimed = [ledger.claim_next(max_running=3) for _ in range(4)]
    assert [r.id if r else None for r in claimed] == [b, a, c, None]
    assert ledger.get(b).attempts == 1
    ledger.transition(a, "running", "done")
    assert ledger.claim_next(max_running=3).id == d  # type: ignore[union-attr]


def test_recover_running_and_retry_wait(ledger: Ledger) -> None:
    job = _queued(ledger, "a")
    ledger.claim_next(max_running=3)
    [row] = ledger.recover_running(max_queued=20)
    assert row.state == "queued" and row.attempts == 1  # the attempt is kept
    ledger.claim_next(max_running=3)
    ledger.transition(job, "running", "retry_wait", next_attempt_at=ledger.clock() + 3600)
    assert ledger.requeue_due_retries(max_queued=20) == []
    ledger.set_columns(job, next_attempt_at=0.0)
    assert [r.id for r in ledger.requeue_due_retries(max_queued=20)] == [job]


def test_duplicates_and_deletion(ledger: Ledger) -> None:
    job = _queued(ledger, "a")
    ledger.set_columns(job, dedupe_key="k1")
    assert ledger.find_duplicate("k1").id == job  # type: ignore[union-attr]
    assert ledger.find_duplicate("k2") is None
    ledger.claim_next(max_running=1)
    ledger.transition(job, "running", "done")
    ledger.mark_deleted(job, reason="by hand")
    assert ledger.get(job).deleted_at is not None
    assert ledger.find_duplicate("k1") is None  # outputs gone: rendering again is allowed
    with pytest.raises(LedgerConflict):
        ledger.mark_deleted(job, reason="twice")


def test_status_snapshot_reads_read_only(ledger: Ledger) -> None:
    _queued(ledger, "a")
    snap = status_snapshot(ledger.path)
    assert snap["counts"]["queued"] == 1
    assert snap["jobs"][0]["name"] == "a" and 0.0 <= snap["jobs"][0]["progress"] <= 1.0
    ro = connect(ledger.path, readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        ro.execute("DELETE FROM jobs")


def _claimer(path: str, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ledger = Ledger(Path(path))
    got = []
    for _ in range(n * 4):
        row = ledger.claim_next(max_running=3)
        if row is not None:
            got.append(row.id)
            running = ledger.counts()["running"]
            assert running <= 3, running
            ledger.transition(row.id, "running", "done")
    out.put(got)


def test_concurrent_claims_take_each_job_once(ledger: Ledger) -> None:
    ids = {_queued(ledger, f"j{i}") for i in range(40)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(ledger.path), 40, out)) for _ in range(3)]
    for p in procs:
        p.start()
    claimed = [jid for _ in procs for jid in out.get(timeout=60)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(claimed) == sorted(ids)  # every job exactly once


def _fill_to_the_last_page(ledger: Ledger) -> int:
    """Cap the file at its current size (max_page_count) and fill what is left; returns the cap."""
    pages = ledger.conn.execute("PRAGMA page_count").fetchone()[0]
    ledger.conn.execute(f"PRAGMA max_page_count = {pages}")
    for size in (2000, 200, 20, 1):
        try:
            while True:
                with ledger.tx():
                    ledger.conn.execute(
                        "INSERT INTO events (job_id, at, kind, data_json) VALUES (NULL, 0, 'daemon', ?)",
                        ("x" * size,),
                    )
        except sqlite3.OperationalError as e:
            assert "full" in str(e)
    return pages


def test_a_full_database_waits_for_space_then_writes_once(ledger: Ledger) -> None:
    """SQLITE_FULL for real (max_page_count caps the file): a state change calls on_full and tries
    again after space returns, writing exactly one transition and one event; under fail_fast() or
    without on_full the error is raised as is."""
    job_id = _queued(ledger, "a")
    pages = _fill_to_the_last_page(ledger)
    calls: list[int] = []

    def on_full(error: BaseException, attempt: int) -> None:
        assert "full" in str(error)
        calls.append(attempt)
        if attempt == 3:  # space returns
            ledger.conn.execute(f"PRAGMA max_page_count = {pages * 100}")

    with pytest.raises(sqlite3.OperationalError, match="full"):
        ledger.transition(job_id, "queued", "running")  # no on_full: raised at once
    ledger.on_full = on_full
    with ledger.fail_fast(), pytest.raises(sqlite3.OperationalError, match="full"):
        ledger.transition(job_id, "queued", "running")
    assert calls == []
    ledger.transition(job_id, "queued", "running")
    assert calls == [1, 2, 3]
    assert ledger.get(job_id).state == "running"
    kinds = [r[0] for r in ledger.conn.execute("SELECT kind FROM events WHERE job_id = ?", (job_id,))]
    assert kinds.count("started") == 1


def test_on_full_can_give_up(ledger: Ledger) -> None:
    job_id = _queued(ledger, "a")
    _fill_to_the_last_page(ledger)

    def give_up(error: BaseException, attempt: int) -> None:
        raise RuntimeError("stopping") from error

    ledger.on_full = give_up
    with pytest.raises(RuntimeError, match="stopping"):
        ledger.transition(job_id, "queued", "running")
    assert ledger.get(job_id).state == "queued" and not ledger.conn.in_transaction


def test_requeued_running_jobs_keep_the_queue_cap(ledger: Ledger) -> None:
    """A daemon restart or stop puts running jobs back; with the queue full they wait in
    retry_wait (due at once) and go back to queued, oldest first, as room appears."""
    running = [_queued(ledger, f"r{i}") for i in range(3)]
    for _ in running:
        ledger.claim_next(max_running=3)
    queued = [_queued(ledger, f"q{i}") for i in range(2)]
    rows = ledger.recover_running(max_queued=3)
    assert [r.state for r in rows] == ["queued", "retry_wait", "retry_wait"]
    assert ledger.counts()["queued"] == 3
    ledger.claim_next(max_running=3)  # one leaves the queue: one recovered job may come back
    assert [r.id for r in ledger.requeue_due_retries(max_queued=3)] == [running[1]]
    row = ledger.claim_next(max_running=3, job_id=running[1])
    assert row is not None
    requeued = ledger.requeue(row.id, max_queued=1, reason="stopped (daemon shutting down)")
    assert requeued.state == "retry_wait" and queued  # the cap (1) was already reached
    kinds = [r[0] for r in ledger.conn.execute("SELECT kind FROM events WHERE job_id = ?", (running[2],))]
    assert kinds[-1] == "retry"
