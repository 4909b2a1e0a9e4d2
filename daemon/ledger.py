"""The job ledger: SQLite in WAL mode, written only by the daemon's main thread.

Two tables (the schema is shared with the dashboard, which reads it read-only):

- `jobs`: one row per job seen in the inbox, its state and everything shown about it;
- `events`: append-only; every state change inserts its event in the same transaction, and the
  event ids are the dashboard's server-sent-event ids.

The states, their legal edges and the event each state change writes are data in
`daemon/states.py`: `_transition` raises `IllegalTransition` on any edge not in `EDGES`, and logs
one line per state change (`logs.log_state_change`, after the commit).

Every write runs under `BEGIN IMMEDIATE` (a deferred read-then-write transaction can fail at once
with "database is locked"; an immediate one waits for the lock). Transitions are compare-and-set:
`UPDATE ... WHERE id = ? AND state IN (...)`; no matching row raises `LedgerConflict`. The caps
(`max_queued`, `max_running`) are checked inside the same transaction that moves a job, so they
hold whatever the process does in memory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.errors import IllegalTransition, LedgerConflict, LedgerLost
from daemon.errors import is_disk_full as is_disk_full
from daemon.logs import log_state_change
from daemon.states import EDGES, EVENT_KINDS, EVENT_OF, FINAL, INITIAL, STATES, State

logger = logging.getLogger(__name__)
# the state-change lines go where the process's logging goes; a command that sets up none (the CLI
# applying a `retry` itself while the daemon is stopped) prints none of them (no `lastResort`)
logger.addHandler(logging.NullHandler())

EVENT_COLUMNS: dict[str, type] = {"id": int, "job_id": str, "at": float, "kind": str, "data_json": str}


def _migration_0(db: sqlite_utils.Database) -> None:
    db["jobs"].create(  # type: ignore[union-attr]
        {
            k: v
            for k, v in JOB_COLUMNS.items()
            if k
            not in (
                "dedupe_key",
                "job_dir",
                "resumed_from_chunk",
                "cancel_requested",
                "originals",
                "outputs_identity",
                "rerender_of",
                "intent",
            )
        },
        pk="id",
        not_null={"name", "state", "priority", "seq", "source", "attempts", "created_at"},
        defaults={"priority": 0, "attempts": 0, "progress": 0.0},
    )
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT, at REAL NOT NULL,"
        " kind TEXT NOT NULL, data_json TEXT NOT NULL DEFAULT '{}')"
    )
    db.execute("CREATE INDEX events_by_job ON events(job_id, id)")
    db.execute("CREATE INDEX jobs_by_state ON jobs(state, priority, seq)")
    db.execute("CREATE INDEX jobs_by_source ON jobs(source)")


def _migration_1(db: sqlite_utils.Database) -> None:
    table = db["jobs"]
    table.add_column("dedupe_key", str)  # type: ignore[union-attr]
    table.add_column("job_dir", str)  # type: ignore[union-attr]
    table.add_column("resumed_from_chunk", int)  # type: ignore[union-attr]
    table.add_column("cancel_requested", int, not_null_default=0)  # type: ignore[union-attr]
    db.execute("CREATE INDEX jobs_by_dedupe ON jobs(dedupe_key)")


def _migration_2(db: sqlite_utils.Database) -> None:
    db["jobs"].add_column("originals", str)  # type: ignore[union-attr]


def _migration_3(db: sqlite_utils.Database) -> None:
    db["jobs"].add_column("outputs_identity", str)  # type: ignore[union-attr]


def _migration_4(db: sqlite_utils.Database) -> None:
    """Operating at scale (docs/dashboard.md): indexes for paging newest-first, the failure
    details column, the daemon's heartbeat row, and counters that retention never lowers (kept
    by triggers, so every writer of a final state counts)."""
    if "failure_detail" not in db["jobs"].columns_dict:  # new ledgers have it from migration 0
        db["jobs"].add_column("failure_detail", str)  # type: ignore[union-attr]
    # newest-first pages of all jobs (dashboard/reader.py); no index that a query without ORDER BY
    # over one state or one job's events would pick instead of the existing ones (their order holds)
    db.execute("CREATE INDEX IF NOT EXISTS jobs_by_seq ON jobs(seq)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL,"
        " pid INTEGER NOT NULL, state TEXT NOT NULL, started_at REAL, data_json TEXT NOT NULL DEFAULT '{}')"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS counters (name TEXT NOT NULL, label TEXT NOT NULL DEFAULT '',"
        " value REAL NOT NULL DEFAULT 0, PRIMARY KEY (name, label))"
    )
    bump = (
        "INSERT INTO counters (name, label, value) VALUES ('jobs_finished', NEW.state || '|' ||"
        " COALESCE(NEW.error_code, ''), 1) ON CONFLICT (name, label) DO UPDATE SET value = value + 1;"
        " INSERT INTO counters (name, label, value) SELECT 'video_seconds', '', COALESCE(NEW.duration_s, 0)"
        " WHERE NEW.state = 'done' ON CONFLICT (name, label) DO UPDATE SET value = value + excluded.value;"
    )
    final = "NEW.state IN ('done', 'failed', 'rejected', 'cancelled')"
    db.execute(
        f"CREATE TRIGGER IF NOT EXISTS count_finished AFTER UPDATE OF state ON jobs"
        f" WHEN {final} AND OLD.state != NEW.state BEGIN {bump} END"
    )
    db.execute(
        f"CREATE TRIGGER IF NOT EXISTS count_inserted_final AFTER INSERT ON jobs WHEN {final} BEGIN {bump} END"
    )


def _migration_5(db: sqlite_utils.Database) -> None:
    """Re-renders on request: the job a new job renders again (docs/job-format.md)."""
    if "rerender_of" not in db["jobs"].columns_dict:
        db["jobs"].add_column("rerender_of", str)  # type: ignore[union-attr]


def _migration_6(db: sqlite_utils.Database) -> None:
    """Webhooks (daemon/webhooks.py): one row per delivery attempt, written by the main loop."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS webhook_deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " event_id INTEGER NOT NULL, job_id TEXT, url TEXT NOT NULL, attempt INTEGER NOT NULL,"
        " at REAL NOT NULL, outcome TEXT NOT NULL, status INTEGER, error TEXT, duration_s REAL,"
        " next_retry_s REAL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS webhook_deliveries_by_job ON webhook_deliveries(job_id, id)")


def _migration_7(db: sqlite_utils.Database) -> None:
    """The crash intents (daemon/endings.py `Endings.recover`): set by the first write of a claim,
    rejection, publication or failure, cleared by its last. Rows of older ledgers have none; the
    recovery infers theirs from the columns set, as the previous version did."""
    if "intent" not in db["jobs"].columns_dict:
        db["jobs"].add_column("intent", str)  # type: ignore[union-attr]


#: applied in order; PRAGMA user_version counts how many ran (each with its bump in one transaction)
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (
    _migration_0,
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRow:
    """One `jobs` row."""

    id: str
    name: str
    state: str
    priority: int = 0
    seq: int = 0
    source: str = ""
    spec_json: str | None = None
    input_hashes_json: str | None = None
    attempts: int = 0
    progress: float | None = 0.0
    chunk: int | None = None
    num_chunks: int | None = None
    step: int | None = None
    num_steps: int | None = None
    stage: str | None = None
    waiting_reason: str | None = None
    created_at: float = 0.0
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    next_attempt_at: float | None = None
    output_video: str | None = None
    output_poster: str | None = None
    output_json: str | None = None
    duration_s: float | None = None
    frames: int | None = None
    render_s: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_field: str | None = None
    duplicate_of: str | None = None
    deleted_at: float | None = None
    # added by the daemon (migration 1)
    dedupe_key: str | None = None
    job_dir: str | None = None
    resumed_from_chunk: int | None = None
    cancel_requested: int = 0
    # migration 2: where a rejected or failed job's original files are kept
    originals: str | None = None
    # migration 3: what was published (device, inode, size, mtime, sha256 per output), so that
    # `delete`, retention and recovery only ever touch files proven to be this job's
    outputs_identity: str | None = None
    # migration 4: the last failure's traceback and worker log lines (JSON, bounded: daemon/failures.py)
    failure_detail: str | None = None
    # migration 5: the job this one renders again ("rerender": true, or `retry` of a done job)
    rerender_of: str | None = None
    # migration 7: the crash-safe protocol under way (daemon.states.Intent), None when none is
    intent: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobRow:
        names = {f.name for f in fields(cls)}
        return cls(**{k: row[k] for k in row.keys() if k in names})  # sqlite3.Row iterates values

    @property
    def spec(self) -> dict[str, Any]:
        return json.loads(self.spec_json) if self.spec_json else {}

    @property
    def input_hashes(self) -> dict[str, str]:
        return json.loads(self.input_hashes_json) if self.input_hashes_json else {}

    @property
    def identities(self) -> dict[str, dict[str, Any]]:
        """Per output role (video, poster, sidecar): the identity recorded at publication."""
        return json.loads(self.outputs_identity) if self.outputs_identity else {}

    def summary(self) -> dict[str, Any]:
        """The fields `infinitetalk status --json` prints for a job."""
        keys = (
            "id",
            "name",
            "state",
            "priority",
            "attempts",
            "stage",
            "chunk",
            "num_chunks",
            "step",
            "num_steps",
            "waiting_reason",
            "created_at",
            "started_at",
            "finished_at",
            "next_attempt_at",
            "output_video",
            "output_poster",
            "output_json",
            "duration_s",
            "frames",
            "render_s",
            "error_code",
            "error_message",
            "error_field",
            "duplicate_of",
            "rerender_of",
            "deleted_at",
        )
        out = {k: getattr(self, k) for k in keys}
        out["progress"] = min(1.0, max(0.0, float(self.progress or 0.0)))
        return out


#: the `jobs` columns in table order, each with its SQLite type: the fields of `JobRow`
JOB_COLUMNS: dict[str, type] = {
    f.name: {"str": str, "int": int, "float": float}[str(f.type).split(" | ")[0]] for f in fields(JobRow)
}


def new_job_id() -> str:
    """Short and URL-safe: 12 lowercase hex characters."""
    return secrets.token_hex(6)


def connect(
    path: Path,
    *,
    readonly: bool = False,
    timeout_s: float = 30.0,
    immutable: bool = False,
    factory: type[sqlite3.Connection] = sqlite3.Connection,
) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, with a busy timeout.
    `readonly`: opened `mode=ro` with `query_only`; `immutable` too: SQLite assumes the file
    never changes (no `-shm` needed; the dashboard's fallback for a read-only state dir)."""
    if readonly:
        query = "mode=ro&immutable=1" if immutable else "mode=ro"
        uri = f"file:{urllib.parse.quote(str(path.resolve()))}?{query}"
        conn = sqlite3.connect(
            uri, uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False, factory=factory
        )
        conn.execute("PRAGMA query_only=1")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(path), timeout=timeout_s, isolation_level=None, check_same_thread=False, factory=factory
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    conn.row_factory = sqlite3.Row
    return conn


def _waits_when_full(method: Callable[..., Any]) -> Callable[..., Any]:
    """A write that, when the state dir is full, calls `ledger.on_full(error, attempt)` and tries
    again (the failed transaction was rolled back, so the retry starts clean). Without `on_full`,
    when called inside an outer transaction, or under `fail_fast()`, the error is raised as is."""

    @functools.wraps(method)
    def wrapper(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        attempt = 0
        # inside an outer transaction the whole outer one must be retried, not this part of it
        # (SQLite may have rolled the outer one back already)
        nested = self.conn.in_transaction
        while True:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.OperationalError as e:
                if self.on_full is None or self._fail_fast or nested or not is_disk_full(e):
                    raise
                attempt += 1
                self.on_full(e, attempt)

    return wrapper


class Ledger:
    """The daemon's write connection and every query it makes."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        if sqlite3.sqlite_version_info < (3, 35):
            raise RuntimeError(f"SQLite >= 3.35 is needed (RETURNING), found {sqlite3.sqlite_version}")
        self.path = path
        self.clock = clock
        #: called as on_full(error, attempt) when a write finds the state dir full; it waits (and
        #: returns, to try again) or raises to give up. None: the error is raised at once.
        self.on_full: Callable[[BaseException, int], None] | None = None
        self._fail_fast = 0
        self._changes: list[tuple[JobRow, str | None]] = []  #: state changes logged at COMMIT
        self.conn = connect(path)
        #: (st_dev, st_ino) of the file opened: the path must keep naming it (`check_file`)
        self.file_id = file_id(path)
        self.db = sqlite_utils.Database(self.conn)
        self.migrate()

    def close(self) -> None:
        self.conn.close()

    def probe_write(self) -> None:
        """One real write (the schema version, rewritten unchanged): a ledger file that SQLite
        opened read-only (no write permission, immutable) fails here, at start, not later."""
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        self.conn.execute(f"PRAGMA user_version={version}")

    def check_file(self) -> None:
        """Raise `LedgerLost` if the ledger's path no longer names the file this connection has
        open (deleted, or replaced by another file): every write would go to a file nobody else
        can see, and a restart would start from a ledger that does not know the claimed jobs."""
        now = file_id(self.path)
        if now == self.file_id:
            return
        if now is None:
            what = "deleted"
        else:
            was = self.file_id[1] if self.file_id else "?"
            what = f"replaced by another file (inode {was} -> {now[1]})"
        raise LedgerLost(f"the ledger {self.path} was {what} while the daemon ran")

    def rescue(self, dest: Path) -> Path:
        """Copy the open ledger (the file still open, even if its path is gone) to `dest`."""
        return backup(self.conn, dest)

    # ------------------------------------------------------------------ plumbing

    def migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        for index in range(version, len(MIGRATIONS)):
            with self.tx():
                MIGRATIONS[index](self.db)
                self.conn.execute(f"PRAGMA user_version={index + 1}")

    @contextmanager
    def fail_fast(self) -> Iterator[None]:
        """Writes in this block raise a full state dir at once instead of waiting (intake pauses)."""
        self._fail_fast += 1
        try:
            yield
        finally:
            self._fail_fast -= 1

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with BEGIN IMMEDIATE (waits for the write lock)."""
        if self.conn.in_transaction:  # nested use joins the outer transaction
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._changes.clear()
        try:
            yield self.conn
        except BaseException:
            # SQLite may already have rolled the transaction back itself (e.g. on SQLITE_FULL);
            # a second ROLLBACK would hide the real error behind "no transaction is active"
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            # e.g. SQLITE_FULL: SQLite may keep the transaction open, and the next `tx` would
            # silently join it and never commit; end it here
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        changes, self._changes = self._changes, []
        for row, old in changes:
            _log_change(row, old)

    def _event(self, job_id: str | None, kind: str, data: Mapping[str, Any] | None = None) -> int:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        cur = self.conn.execute(
            "INSERT INTO events (job_id, at, kind, data_json) VALUES (?, ?, ?, ?)",
            (job_id, self.clock(), kind, json.dumps(dict(data or {}), sort_keys=True, default=str)),
        )
        return int(cur.lastrowid or 0)

    @_waits_when_full
    def daemon_event(self, message: str, **data: Any) -> None:
        with self.tx():
            self._event(None, "daemon", {"message": message, **data})

    # ------------------------------------------------------------------ writes

    @_waits_when_full
    def insert_job(
        self,
        *,
        name: str,
        source: str,
        state: str,
        priority: int = 0,
        event_data: Mapping[str, Any] | None = None,
        **columns: Any,
    ) -> JobRow:
        """A new job seen in the inbox; writes `created` and the event of its first state."""
        if state not in INITIAL:
            raise ValueError(f"a new job starts {', '.join(INITIAL)}, not {state!r}")
        _check_columns(columns)
        now = self.clock()
        with self.tx():
            seq = self.conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            job_id = columns.pop("id", None) or new_job_id()
            row = {
                "id": job_id,
                "name": name,
                "source": source,
                "state": state,
                "priority": priority,
                "seq": seq,
                "created_at": now,
                "attempts": 0,
                "progress": 0.0,
                **columns,
            }
            if state == "queued":
                row.setdefault("queued_at", now)
            if state == "rejected":
                row.setdefault("finished_at", now)
            self.db["jobs"].insert(row)  # type: ignore[union-attr]
            self._event(job_id, "created", {"name": name, "source": source, "state": state})
            self._event(job_id, EVENT_OF[State(state)], _state_data(state, row, event_data))
            self._changes.append((new := self.get(job_id), None))
        return new

    @_waits_when_full
    def transition(
        self,
        job_id: str,
        expected: str | Iterable[str],
        new: str,
        *,
        event_data: Mapping[str, Any] | None = None,
        **columns: Any,
    ) -> JobRow:
        """Compare-and-set `expected -> new` with its event, in one transaction."""
        with self.tx():
            return self._transition(job_id, expected, new, event_data=event_data, **columns)

    def _transition(
        self,
        job_id: str,
        expected: str | Iterable[str],
        new: str,
        *,
        event_data: Mapping[str, Any] | None = None,
        **columns: Any,
    ) -> JobRow:
        allowed = (expected,) if isinstance(expected, str) else tuple(expected)
        _check_edges(job_id, allowed, new)
        _check_columns(columns)
        old = allowed[0] if len(allowed) == 1 else self._state(job_id)
        sets = {"state": new, **columns}
        assignments = ", ".join(f"{k} = ?" for k in sets)
        marks = _marks(allowed)
        cur = self.conn.execute(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND state IN ({marks}) RETURNING *",
            (*sets.values(), job_id, *allowed),
        )
        row = cur.fetchone()
        if row is None:
            raise LedgerConflict(job_id, allowed, self._state(job_id))
        self._event(job_id, EVENT_OF[State(new)], _state_data(new, dict(row), event_data))
        self._changes.append((changed := JobRow.from_row(row), old))
        return changed

    @_waits_when_full
    def admit(self, job_id: str, *, max_queued: int, **columns: Any) -> JobRow | None:
        """`waiting -> queued` if fewer than `max_queued` are queued; None (still waiting) if full."""
        with self.tx():
            if self._count("queued") >= max_queued:
                return None
            return self._transition(
                job_id, "waiting", "queued", queued_at=self.clock(), waiting_reason=None, **columns
            )

    @_waits_when_full
    def requeue_due_retries(self, *, max_queued: int, job_ids: Iterable[str] | None = None) -> list[JobRow]:
        """`retry_wait -> queued` for jobs whose backoff has passed (by this ledger's clock), or
        for the `job_ids` the caller found due (the daemon times backoff on the monotonic clock),
        as room allows."""
        moved: list[JobRow] = []
        with self.tx():
            room = max_queued - self._count("queued")
            if room <= 0:
                return moved
            ids = None if job_ids is None else tuple(job_ids)
            which = "COALESCE(next_attempt_at, 0) <= ?" if ids is None else f"id IN ({_marks(ids)})"
            due = self.conn.execute(
                f"SELECT id FROM jobs WHERE state = 'retry_wait' AND {which} ORDER BY next_attempt_at, seq LIMIT ?",
                (*((self.clock(),) if ids is None else ids), room),
            ).fetchall()
            for (job_id,) in due:
                moved.append(
                    self._transition(
                        job_id, "retry_wait", "queued", queued_at=self.clock(), next_attempt_at=None
                    )
                )
        return moved

    def next_queued(self) -> JobRow | None:
        """The job `claim_next` would take (priority, then arrival), without taking it."""
        return next_queued(self.conn)

    @_waits_when_full
    def claim_next(self, *, max_running: int, job_id: str | None = None) -> JobRow | None:
        """`queued -> running` for the next job (priority, then arrival), or for `job_id`, if
        fewer than `max_running` run; None when the cap is reached or nothing is queued."""
        with self.tx():
            if self._count("running") >= max_running:
                return None
            row = next_queued(self.conn, job_id)
            if row is None:
                return None
            return self._transition(
                row.id,
                "queued",
                "running",
                started_at=self.clock(),
                attempts=row.attempts + 1,
                stage="starting",
                error_code=None,
                error_message=None,
                error_field=None,
                output_video=None,
                output_poster=None,
                output_json=None,
                outputs_identity=None,
                event_data={"attempt": row.attempts + 1},
            )

    def record_webhook_attempt(self, attempt: Mapping[str, Any]) -> None:
        """One webhook delivery attempt (daemon/webhooks.py), in its own short transaction."""
        cols = ("event_id", "job_id", "url", "attempt", "at", "outcome", "status", "error", "duration_s")
        with self.tx():
            self.conn.execute(
                f"INSERT INTO webhook_deliveries ({', '.join(cols)}, next_retry_s) VALUES"
                f" ({', '.join('?' * (len(cols) + 1))})",
                (*(attempt[c] for c in cols), attempt.get("next_retry_s")),
            )

    @_waits_when_full
    def set_waiting_reason(self, job_id: str, reason: str) -> None:
        """Update why a waiting job waits; writes a `waiting` event only when the reason changes."""
        with self.tx():
            cur = self.conn.execute(
                "UPDATE jobs SET waiting_reason = ? WHERE id = ? AND state = 'waiting'"
                " AND COALESCE(waiting_reason, '') != ? RETURNING id",
                (reason, job_id, reason),
            )
            if cur.fetchone() is not None:
                self._event(job_id, "waiting", {"state": "waiting", "waiting_reason": reason})

    def update_progress(
        self,
        job_id: str,
        *,
        progress: float,
        chunk: int,
        num_chunks: int,
        step: int,
        num_steps: int,
        stage: str,
        event: bool = True,
    ) -> None:
        """Live progress of a running job (the caller throttles to about one per second)."""
        data = {
            "progress": min(1.0, max(0.0, progress)),
            "chunk": chunk,
            "num_chunks": num_chunks,
            "step": step,
            "num_steps": num_steps,
            "stage": stage,
        }
        with self.tx():
            cur = self.conn.execute(
                "UPDATE jobs SET progress = ?, chunk = ?, num_chunks = ?, step = ?, num_steps = ?, stage = ?"
                " WHERE id = ? AND state = 'running' RETURNING id",
                (*data.values(), job_id),
            )
            if cur.fetchone() is not None and event:
                self._event(job_id, "progress", data)

    @_waits_when_full
    def request_cancel(self, job_id: str) -> None:
        with self.tx():
            self.conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    @_waits_when_full
    def mark_deleted(self, job_id: str, *, reason: str) -> JobRow:
        """Outputs gone (by `delete` or by hand): the row stays, `deleted_at` is set, event `deleted`."""
        with self.tx():
            row = self.conn.execute(
                "UPDATE jobs SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL RETURNING *",
                (self.clock(), job_id),
            ).fetchone()
            if row is None:
                raise LedgerConflict(job_id, ("not deleted",), "deleted")
            self._event(job_id, "deleted", {"reason": reason})
        return JobRow.from_row(row)

    @_waits_when_full
    def set_columns(self, job_id: str, **columns: Any) -> None:
        """Columns that are no state change (e.g. the job dir after a claim)."""
        _check_columns(columns)
        with self.tx():
            self.conn.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in columns)} WHERE id = ?",
                (*columns.values(), job_id),
            )

    @_waits_when_full
    def recover_running(
        self, *, max_queued: int, give_back_attempt: bool = False, exclude: Iterable[str] = ()
    ) -> list[JobRow]:
        """At start-up: jobs left `running` by a daemon that died go back to `queued`, or to
        `retry_wait` due at once when the queue is full (see `requeue`). The attempt is kept,
        or, with `give_back_attempt` (what the daemon does: a kill of the daemon is not the
        job's fault), not counted (`attempts - 1`), in the same transaction. Jobs in `exclude`
        stay running (a failure whose files wait for room in the outbox)."""
        skip = set(exclude)
        with self.tx():
            rows = [
                r
                for r in self.conn.execute(
                    "SELECT id, attempts FROM jobs WHERE state = 'running' ORDER BY seq"
                )
                if r[0] not in skip
            ]
            return [
                self.requeue(
                    job_id,
                    max_queued=max_queued,
                    reason="daemon restarted while running",
                    stage="recovered",
                    **({"attempts": max(0, attempts - 1)} if give_back_attempt else {}),
                )
                for job_id, attempts in rows
            ]

    @_waits_when_full
    def requeue(self, job_id: str, *, max_queued: int, reason: str, **columns: Any) -> JobRow:
        """`running -> queued`, or, when `max_queued` jobs are already queued, `running ->
        retry_wait` due at once: the queue cap holds, and the job is queued again (before newer
        uploads) as soon as there is room."""
        with self.tx():
            if self._count("queued") < max_queued:
                return self._transition(
                    job_id,
                    "running",
                    "queued",
                    queued_at=self.clock(),
                    event_data={"reason": reason},
                    **columns,
                )
            return self._transition(
                job_id,
                "running",
                "retry_wait",
                next_attempt_at=self.clock(),
                event_data={"reason": f"{reason}; the queue is full, queued again when there is room"},
                **columns,
            )

    @_waits_when_full
    def purge_finished_before(self, cutoff: float) -> int:
        """Retention: drop final rows (and their events) finished before `cutoff`."""
        with self.tx():
            ids = [
                r[0]
                for r in self.conn.execute(
                    f"SELECT id FROM jobs WHERE state IN ({_marks(FINAL)})"
                    " AND COALESCE(finished_at, created_at) < ?",
                    (*FINAL, cutoff),
                )
            ]
            for job_id in ids:
                self.conn.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
                self.conn.execute("DELETE FROM webhook_deliveries WHERE job_id = ?", (job_id,))
                self.conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return len(ids)

    @_waits_when_full
    def prune_progress_events(self, cutoff: float) -> int:
        """Drop the `progress` events of jobs that finished before `cutoff` (state events stay)."""
        with self.tx():
            cur = self.conn.execute(
                "DELETE FROM events WHERE kind = 'progress' AND job_id IN (SELECT id FROM jobs WHERE"
                f" state IN ({_marks(FINAL)}) AND COALESCE(finished_at, 0) < ?)",
                (*FINAL, cutoff),
            )
            return int(cur.rowcount)

    # ------------------------------------------------------------------ reads

    def _count(self, state: str) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0])

    def _state(self, job_id: str) -> str | None:
        row = self.conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def get(self, job_id: str) -> JobRow:
        return get_job(self.conn, job_id)

    def find(self, job_id: str) -> JobRow | None:
        return find_job(self.conn, job_id)

    def counts(self) -> dict[str, int]:
        return state_counts(self.conn)

    def jobs(self, states: Iterable[str] | None = None) -> list[JobRow]:
        return list_jobs(self.conn, states)

    def active_by_source(self) -> dict[str, JobRow]:
        """Jobs still tied to an inbox entry (waiting), keyed by their source path."""
        return {r.source: r for r in self.jobs(["waiting"])}

    def find_duplicate(self, dedupe_key: str) -> JobRow | None:
        return find_duplicate(self.conn, dedupe_key)


def backup(conn: sqlite3.Connection, dest: Path) -> Path:
    """Copy the database `conn` has open to `dest` (written beside it, then renamed over it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    target = sqlite3.connect(str(tmp))
    try:
        conn.backup(target)
    finally:
        target.close()
    os.replace(tmp, dest)
    return dest


def _marks(values: tuple[Any, ...]) -> str:
    """The `?, ?, ?` of an `IN (...)` with one mark per value."""
    return ", ".join("?" * len(values))


def _check_columns(columns: Mapping[str, Any]) -> None:
    bad = set(columns) - set(JOB_COLUMNS)
    if bad:
        raise ValueError(f"unknown job columns {sorted(bad)}")


def _check_edges(job_id: str, expected: tuple[str, ...], new: str) -> None:
    """Raise unless `new` is a state and every `expected -> new` an edge of `EDGES`."""
    if new not in STATES:
        raise ValueError(f"unknown state {new!r}; states are {', '.join(STATES)}")
    for old in expected:
        if old not in STATES:
            raise ValueError(f"unknown state {old!r}; states are {', '.join(STATES)}")
        if new not in EDGES[State(old)]:
            raise IllegalTransition(job_id, old, new, sorted(EDGES[State(old)], key=STATES.index))


def _log_change(row: JobRow, old: str | None) -> None:
    """The one log line of a committed state change (`old` None: a new row), with what explains it."""
    detail = ""
    if row.state == State.running:
        detail = f"attempt {row.attempts}"
    elif row.state == State.done:
        detail = row.output_video or ""
    elif row.state == State.waiting:
        detail = row.waiting_reason or ""
    elif row.state in (State.failed, State.rejected, State.retry_wait, State.cancelled) and row.error_code:
        detail = f"{row.error_code}: {row.error_message}"
    log_state_change(logger, row.id, row.name, old, row.state, detail)


def file_id(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of `path` now; None when nothing is there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _state_data(state: str, row: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    data: dict[str, Any] = {"state": state}
    for key in (
        "waiting_reason",
        "error_code",
        "error_message",
        "error_field",
        "duplicate_of",
        "next_attempt_at",
        "output_video",
        "attempts",
    ):
        if row.get(key) not in (None, ""):
            data[key] = row[key]
    data.update(extra or {})
    return data


# ---------------------------------------------------------------------- read helpers (any connection)


def get_job(conn: sqlite3.Connection, job_id: str) -> JobRow:
    row = find_job(conn, job_id)
    if row is None:
        raise KeyError(f"no job with id {job_id!r}")
    return row


def find_job(conn: sqlite3.Connection, job_id: str) -> JobRow | None:
    conn.row_factory = sqlite3.Row
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return JobRow.from_row(row) if row else None


def list_jobs(conn: sqlite3.Connection, states: Iterable[str] | None = None) -> list[JobRow]:
    conn.row_factory = sqlite3.Row
    if states is None:
        rows = conn.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
    else:
        wanted = tuple(states)
        rows = conn.execute(
            f"SELECT * FROM jobs WHERE state IN ({', '.join('?' for _ in wanted)}) ORDER BY seq", wanted
        ).fetchall()
    return [JobRow.from_row(r) for r in rows]


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {state.value: 0 for state in STATES}
    for state, n in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
        counts[state] = n
    return counts


def next_queued(conn: sqlite3.Connection, job_id: str | None = None) -> JobRow | None:
    """The queued job to run next (priority, then arrival), or `job_id` if it is queued."""
    conn.row_factory = sqlite3.Row
    row = conn.execute(
        "SELECT * FROM jobs WHERE state = 'queued' AND (? IS NULL OR id = ?) ORDER BY priority DESC, seq LIMIT 1",
        (job_id, job_id),
    ).fetchone()
    return JobRow.from_row(row) if row else None


#: the states in which a job is the one its duplicates point at (unless its outputs were deleted)
DUPLICATE_STATES = (State.queued, State.running, State.retry_wait, State.done)


def find_duplicate(conn: sqlite3.Connection, dedupe_key: str) -> JobRow | None:
    conn.row_factory = sqlite3.Row
    row = conn.execute(
        f"SELECT * FROM jobs WHERE dedupe_key = ? AND state IN ({_marks(DUPLICATE_STATES)})"
        " AND deleted_at IS NULL ORDER BY seq LIMIT 1",
        (dedupe_key, *DUPLICATE_STATES),
    ).fetchone()
    return JobRow.from_row(row) if row else None


def events_after(conn: sqlite3.Connection, after_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
    return [{**dict(r), "data": json.loads(r["data_json"])} for r in rows]


def status_snapshot(path: Path) -> dict[str, Any]:
    """`infinitetalk status --json`: counts per state and every job, from a read-only connection."""
    if not path.exists():
        return {"counts": {state: 0 for state in STATES}, "jobs": []}
    conn = connect(path, readonly=True)
    try:
        return {"counts": state_counts(conn), "jobs": [j.summary() for j in list_jobs(conn)]}
    finally:
        conn.close()
