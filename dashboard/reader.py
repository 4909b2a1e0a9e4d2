"""Read-only access to the daemon's ledger (schema: docs/daemon.md, written by daemon/ledger.py).

Every connection is opened `file:...?mode=ro` with `PRAGMA query_only=1`; the dashboard never
writes. Reads happen inside one short transaction (`snapshot`) so the jobs, the counts and the last
event id agree with each other, and every cursor is drained at once so the daemon's WAL checkpoints
are never held back.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: states a job can still leave; the others are final
ACTIVE_STATES = ("waiting", "queued", "running", "retry_wait")
PROBLEM_STATES = ("failed", "rejected", "cancelled")
ALL_STATES = ACTIVE_STATES + ("done",) + PROBLEM_STATES

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


def _open(path: Path, query: str) -> LedgerConnection:
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?" + query
    conn = sqlite3.connect(
        uri, uri=True, timeout=5.0, check_same_thread=False, isolation_level=None, factory=LedgerConnection
    )
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA query_only=1")
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
            conn = _open(path, "mode=ro")
        except sqlite3.OperationalError:
            if Path(f"{path}-wal").exists():
                raise
            conn = _open(path, "mode=ro&immutable=1")
            conn.frozen = True
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as e:
        raise LedgerUnavailable(path, f"{type(e).__name__}: {e}") from e
    if not {"jobs", "events"} <= tables:
        conn.close()
        raise LedgerUnavailable(path, "the jobs and events tables do not exist yet")
    return conn


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the ledger file, to notice it being replaced; None when missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


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


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    found = {r[0]: r[1] for r in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()}
    return {state: int(found.pop(state, 0)) for state in ALL_STATES} | found


def last_event_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])


def count_events_after(conn: sqlite3.Connection, after: int) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM events WHERE id > ?", (after,)).fetchone()[0])


def _in(states: tuple[str, ...]) -> str:
    return ",".join("?" * len(states))


def active_jobs(conn: sqlite3.Connection) -> list[Row]:
    """Jobs not yet final, in arrival order (the page sorts the queue by priority itself)."""
    return _rows(
        conn,
        f"SELECT * FROM jobs WHERE state IN ({_in(ACTIVE_STATES)}) ORDER BY seq, created_at",
        ACTIVE_STATES,
    )


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
        + final_jobs(conn, PROBLEM_STATES, problem_limit),
        last_event_id=last_event_id(conn),
        daemon=last_daemon_event(conn),
    )


def snapshot(conn: sqlite3.Connection, *, done_limit: int, problem_limit: int) -> Snapshot:
    with read_transaction(conn):
        return read_snapshot(conn, done_limit=done_limit, problem_limit=problem_limit)


def list_jobs(conn: sqlite3.Connection, states: tuple[str, ...], limit: int) -> list[Row]:
    """Jobs in `states` (all states when empty), newest first, at most `limit`."""
    states = states or ALL_STATES
    sql = f"SELECT * FROM jobs WHERE state IN ({_in(states)}) ORDER BY seq DESC, created_at DESC LIMIT ?"
    return _rows(conn, sql, (*states, limit))


def get_job(conn: sqlite3.Connection, job_id: str) -> Row | None:
    rows = _rows(conn, "SELECT * FROM jobs WHERE id = ?", (job_id,))
    return rows[0] if rows else None


def get_jobs(conn: sqlite3.Connection, job_ids: set[str]) -> dict[str, Row]:
    ids = sorted(job_ids)
    if not ids:
        return {}
    rows = _rows(conn, f"SELECT * FROM jobs WHERE id IN ({_in(tuple(ids))})", tuple(ids))
    return {r["id"]: r for r in rows}


def job_events(conn: sqlite3.Connection, job_id: str) -> list[Row]:
    return _rows(conn, "SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))


def events_after(conn: sqlite3.Connection, after: int, limit: int) -> list[Row]:
    return _rows(conn, "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit))


def data_version(conn: sqlite3.Connection) -> int:
    """Changes whenever another connection (the daemon) commits: a cheap 'anything new?' check."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])
