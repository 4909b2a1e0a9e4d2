"""Read-only access to the daemon's ledger (schema: docs/daemon.md, written by daemon/ledger.py).

Every connection is opened `file:...?mode=ro` with `PRAGMA query_only=1` (`daemon.ledger.connect`);
the dashboard never writes. The states and their groups come from `daemon/states.py`. Reads happen inside one short transaction (`snapshot`) so the jobs, the counts and the last
event id agree with each other, and every cursor is drained at once so the daemon's WAL checkpoints
are never held back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from daemon import ledger
from daemon.states import ACTIVE, PROBLEM, State

Row = dict[str, Any]


class LedgerUnavailable(Exception):
    """The ledger cannot be read now (daemon never ran, file removed, schema not created yet)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"ledger {path} unavailable: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The page's whole state at one instant."""

    counts: dict[str, int]
    jobs: list[Row]  #: active jobs in arrival order, then finished ones newest first
    last_event_id: int  #: 0 when there are no events yet
    daemon: Row | None = None  #: the newest `daemon` event (started, stopped, config reloaded)


class LedgerConnection(sqlite3.Connection):
    """A read-only ledger connection; `frozen` ones see the file as it was when opened."""

    frozen: bool = False


def _open(path: Path, *, immutable: bool = False) -> LedgerConnection:
    conn = cast(
        LedgerConnection,
        ledger.connect(path, readonly=True, timeout_s=5.0, immutable=immutable, factory=LedgerConnection),
    )
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def connect(path: Path) -> LedgerConnection:
    """Open the ledger read-only; raise `LedgerUnavailable` if it is missing or not a ledger.

    A WAL database opened `mode=ro` needs its `-shm` file. When the daemon has stopped cleanly
    (no `-wal` left) and the state folder is read-only to us (systemd `ReadOnlyPaths=`), SQLite
    cannot create it; the ledger then cannot change under us, so it is opened `immutable=1`
    instead, as a `frozen` connection that callers reopen for every read.
    """
    if not path.is_file():
        raise LedgerUnavailable(path, "no such file")
    try:
        try:
            conn = _open(path)
        except sqlite3.OperationalError:
            if Path(f"{path}-wal").exists():
                raise
            conn = _open(path, immutable=True)
            conn.frozen = True
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as e:
        raise LedgerUnavailable(path, f"{type(e).__name__}: {e}") from e
    if not {"jobs", "events"} <= tables:
        conn.close()
        raise LedgerUnavailable(path, "the jobs and events tables do not exist yet")
    return conn


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the ledger file, to notice it being replaced; None when missing (or
    when it cannot be looked at: the stream then says the ledger is unavailable)."""
    try:
        return ledger.file_id(path)
    except OSError:
        return None


@contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One consistent read snapshot; always ended, never held across an await."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def _rows(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...] = ()) -> list[Row]:
    return [dict(r) for r in conn.execute(sql, args).fetchall()]


#: jobs per state: every state (0 when none), then any the ledger holds that this code does not know
counts = ledger.state_counts


def last_event_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])


def count_events_after(conn: sqlite3.Connection, after: int) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM events WHERE id > ?", (after,)).fetchone()[0])


def _in(states: tuple[str, ...]) -> str:
    return ",".join("?" * len(states))


#: at most this many running, queued and retry_wait jobs in a snapshot (the daemon caps the first
#: two; retry_wait is small in practice), and at most `WAITING_LIMIT` waiting ones (the oldest:
#: the inbox backlog is not capped; the counts say how many there are, the search pages them all)
ACTIVE_LIMIT = 200
WAITING_LIMIT = 50


def active_jobs(
    conn: sqlite3.Connection, limit: int = ACTIVE_LIMIT, waiting_limit: int = WAITING_LIMIT
) -> list[Row]:
    """Jobs not yet final, in arrival order (the page sorts the queue by priority itself)."""
    busy = tuple(s for s in ACTIVE if s != State.waiting)
    rows = _rows(
        conn,
        f"SELECT * FROM jobs WHERE state IN ({_in(busy)}) ORDER BY state != 'running', seq LIMIT ?",
        (*busy, limit),
    )
    rows += _rows(conn, "SELECT * FROM jobs WHERE state = 'waiting' ORDER BY seq LIMIT ?", (waiting_limit,))
    return sorted(rows, key=lambda r: (r.get("seq") or 0, r.get("created_at") or 0))


def final_jobs(conn: sqlite3.Connection, states: tuple[str, ...], limit: int) -> list[Row]:
    """The newest `limit` jobs in `states`, newest first."""
    sql = (
        f"SELECT * FROM jobs WHERE state IN ({_in(states)}) "
        "ORDER BY COALESCE(finished_at, created_at) DESC, seq DESC LIMIT ?"
    )
    return _rows(conn, sql, (*states, limit))


def last_daemon_event(conn: sqlite3.Connection) -> Row | None:
    rows = _rows(
        conn, "SELECT * FROM events WHERE job_id IS NULL AND kind = 'daemon' ORDER BY id DESC LIMIT 1"
    )
    return rows[0] if rows else None


def read_snapshot(conn: sqlite3.Connection, *, done_limit: int, problem_limit: int) -> Snapshot:
    """The page's state; call inside `read_transaction` so every part agrees."""
    return Snapshot(
        counts=counts(conn),
        jobs=active_jobs(conn)
        + final_jobs(conn, ("done",), done_limit)
        + final_jobs(conn, PROBLEM, problem_limit),
        last_event_id=last_event_id(conn),
        daemon=last_daemon_event(conn),
    )


def snapshot(conn: sqlite3.Connection, *, done_limit: int, problem_limit: int) -> Snapshot:
    with read_transaction(conn):
        return read_snapshot(conn, done_limit=done_limit, problem_limit=problem_limit)


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_jobs(
    conn: sqlite3.Connection,
    states: tuple[str, ...],
    limit: int,
    *,
    query: str = "",
    before: int | None = None,
) -> list[Row]:
    """Jobs in `states` (all states when empty), newest first (by `seq`, unique and never
    reused: a stable order to page through), at most `limit`, with `seq < before` when given
    (the next page's cursor is the last row's `seq`). `query` matches an id prefix, or any part
    of the name or of the prompt, case-insensitively."""
    where: list[str] = []
    args: list[Any] = []
    if states:
        where.append(f"state IN ({_in(states)})")
        args += states
    if before is not None:
        where.append("seq < ?")
        args.append(before)
    query = query.strip()
    if query:
        like = _like(query)
        where.append(
            "(id LIKE ? ESCAPE '\\' OR name LIKE ? ESCAPE '\\'"
            " OR json_extract(CASE WHEN json_valid(spec_json) THEN spec_json END, '$.prompt') LIKE ? ESCAPE '\\')"
        )
        args += [like + "%", f"%{like}%", f"%{like}%"]
    sql = (
        "SELECT * FROM jobs"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY seq DESC LIMIT ?"
    )
    return _rows(conn, sql, (*args, limit))


def get_job(conn: sqlite3.Connection, job_id: str) -> Row | None:
    rows = _rows(conn, "SELECT * FROM jobs WHERE id = ?", (job_id,))
    return rows[0] if rows else None


def get_jobs(conn: sqlite3.Connection, job_ids: set[str]) -> dict[str, Row]:
    ids = sorted(job_ids)
    if not ids:
        return {}
    rows = _rows(conn, f"SELECT * FROM jobs WHERE id IN ({_in(tuple(ids))})", tuple(ids))
    return {r["id"]: r for r in rows}


def job_events(conn: sqlite3.Connection, job_id: str, *, after: int = 0, limit: int = 100) -> list[Row]:
    """One page of a job's events in id order: those with `id > after`, at most `limit`."""
    return _rows(
        conn, "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?", (job_id, after, limit)
    )


#: at most this many points in a job page's progress-over-time series, whatever the job's length
SERIES_POINTS = 120
#: the newest this many events that are not `progress` make a job page's timeline
TIMELINE_LIMIT = 200


def job_summary(conn: sqlite3.Connection, job_id: str) -> dict[str, Any]:
    """What a job page shows instead of every event: how many events there are, the timeline of
    its state events (newest `TIMELINE_LIMIT`, oldest first), and its progress over time
    sampled down to at most `SERIES_POINTS` points (the first and the last always kept).
    Its cost does not grow with the rest of the ledger (the index on job_id, id)."""
    total = int(conn.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0])
    n_progress = int(
        conn.execute(
            "SELECT COUNT(*) FROM events WHERE job_id = ? AND kind = 'progress'", (job_id,)
        ).fetchone()[0]
    )
    timeline = _rows(
        conn,
        "SELECT * FROM (SELECT * FROM events WHERE job_id = ? AND kind != 'progress' ORDER BY id DESC"
        " LIMIT ?) ORDER BY id",
        (job_id, TIMELINE_LIMIT),
    )
    step = max(1, -(-n_progress // SERIES_POINTS))
    series = conn.execute(
        "SELECT at, json_extract(data_json, '$.progress'), json_extract(data_json, '$.chunk') FROM ("
        " SELECT at, data_json, ROW_NUMBER() OVER (ORDER BY id) - 1 AS n FROM events"
        " WHERE job_id = ? AND kind = 'progress') WHERE n % ? = 0 OR n = ? ORDER BY n",
        (job_id, step, n_progress - 1),
    ).fetchall()
    return {
        "events_total": total,
        "progress_events": n_progress,
        "timeline": timeline,
        "series": [[float(at), p, c] for at, p, c in series],
    }


def events_after(conn: sqlite3.Connection, after: int, limit: int) -> list[Row]:
    return _rows(conn, "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit))


def data_version(conn: sqlite3.Connection) -> int:
    """Changes whenever another connection (the daemon) commits: a cheap 'anything new?' check."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


#: the events that open and close an attempt
_ATTEMPT_KINDS = ("started", "retry", "failed", "done", "cancelled", "queued")


def job_attempts(conn: sqlite3.Connection, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """Each attempt of a job: its number, start, end, outcome and error code (from the events:
    `started` opens one; the next `done`, `failed`, `retry`, `cancelled` or `queued` closes it)."""
    rows = conn.execute(
        f"SELECT at, kind, data_json FROM events WHERE job_id = ? AND kind IN ({_in(_ATTEMPT_KINDS)})"
        " ORDER BY id LIMIT ?",
        (job_id, *_ATTEMPT_KINDS, 4 * limit),
    ).fetchall()
    attempts: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for at, kind, data_json in rows:
        try:
            data = json.loads(data_json or "{}")
        except json.JSONDecodeError:
            data = {}
        data = data if isinstance(data, dict) else {}
        if kind == "started":
            current = {
                "attempt": data.get("attempt", len(attempts) + 1),
                "started_at": at,
                "ended_at": None,
                "outcome": "running",
                "error_code": None,
                "error_message": None,
            }
            attempts.append(current)
        elif current is not None:
            outcome = {"retry": "retry", "queued": "interrupted"}.get(kind, kind)
            current |= {
                "ended_at": at,
                "outcome": outcome,
                "error_code": data.get("error_code") if kind in ("retry", "failed") else None,
                "error_message": data.get("error_message") if kind in ("retry", "failed") else None,
            }
            if kind == "queued" and data.get("reason"):
                current["error_message"] = data.get("reason")
            current = None
    return attempts[-limit:]


def heartbeat(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """The daemon's liveness from its heartbeat row (daemon/heartbeat.py), as JSON."""
    from daemon import heartbeat as hb  # standard library only

    return hb.liveness(conn, now).to_dict()


def counters(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
    """(name, label, value) of the ledger's never-decreasing counters; [] on an older ledger."""
    try:
        return [
            (str(n), str(lbl), float(v))
            for n, lbl, v in conn.execute("SELECT name, label, value FROM counters")
        ]
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
