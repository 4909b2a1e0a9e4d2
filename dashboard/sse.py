"""`/events`: the ledger's `events` table as a server-sent event stream.

Each ledger event becomes one frame whose SSE id is the event's row id and whose name is its kind
(`created`, `queued`, `progress`, ...). Its data is JSON: `{"event": {...}, "job": {...} | null,
"counts": {...}, "now": t}` where `job` is the job's current row and `counts` the jobs per state,
so one frame is enough to update a page.

- A new client (no `Last-Event-ID`) first gets one `snapshot` frame (the `/api/jobs` body) whose
  id is the newest event id, then every later event.
- A client reconnecting with `Last-Event-ID: N` gets every event after N, in order, nothing
  missed. If those events are no longer there (pruned, or the ledger was replaced), it gets a fresh
  `snapshot` instead.
- `ledger` frames (no id) say when the ledger becomes unavailable or available again; the stream
  stays open meanwhile and carries on when the daemon returns.

Each stream owns its read-only connection (opened inside the generator) and polls
`PRAGMA data_version` every `poll_s`; blocking SQLite calls run in a worker thread.
sse-starlette sends the heartbeats and, when uvicorn shuts down, sets the stream's stop event so
the generator returns and the response ends cleanly (within `SHUTDOWN_GRACE_S`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from sse_starlette import ServerSentEvent

from dashboard import reader, sidecars, views
from dashboard.config import DashboardConfig

BATCH = 500  #: events per read; a long replay is sent in batches
RETRY_MS = 3000  #: how long a browser waits before reconnecting
SHUTDOWN_GRACE_S = 1.0  #: at server shutdown, time for streams to end by themselves


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def parse_last_event_id(value: str | None) -> int | None:
    """The numeric `Last-Event-ID`, or None when absent or not ours (then a snapshot is sent)."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


@dataclass(slots=True)
class _Cursor:
    """One stream's position and connection."""

    cfg: DashboardConfig
    last_id: int | None
    conn: reader.LedgerConnection | None = None
    file_id: tuple[int, int] | None = None
    version: int | None = None
    available: bool | None = None
    more: bool = False  #: the last read was a full batch: read again without waiting

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, self.file_id, self.version, self.more = None, None, None, False

    def poll(self) -> list[ServerSentEvent]:
        """Run in a worker thread: (re)open the ledger if needed and read what is new."""
        out: list[ServerSentEvent] = []
        try:
            self._ensure_open()
            if self.available is not True:
                if self.available is False:  # back after a gap: the page was emptied, resend it all
                    self.last_id = None
                self.available = True
                out.append(ServerSentEvent(_dumps({"available": True}), event="ledger"))
            out += self._read_new()
        except (reader.LedgerUnavailable, sqlite3.Error) as e:
            self.close()
            reason = e.reason if isinstance(e, reader.LedgerUnavailable) else f"{type(e).__name__}: {e}"
            if self.available is not False:
                self.available = False
                # with the states and event kinds: a page opened while the ledger is missing has no snapshot
                data = {
                    "available": False,
                    "path": str(self.cfg.ledger_path),
                    "reason": reason,
                    **views.vocabulary(),
                }
                out.append(ServerSentEvent(_dumps(data), event="ledger"))
        return out

    def _ensure_open(self) -> None:
        current = reader.file_id(self.cfg.ledger_path)
        if self.conn is not None and current == self.file_id and not self.conn.frozen:
            return
        self.close()
        if current is None:
            raise reader.LedgerUnavailable(self.cfg.ledger_path, "no such file")
        self.conn = reader.connect(self.cfg.ledger_path)
        self.file_id = current

    def _read_new(self) -> list[ServerSentEvent]:
        """At most one batch of events (and a snapshot first if needed); `more` says if the
        backlog goes on, so a long replay is sent batch by batch without holding a transaction."""
        assert self.conn is not None
        version = reader.data_version(self.conn)
        if version == self.version and not self.more and self.last_id is not None and not self.conn.frozen:
            return []
        out: list[ServerSentEvent] = []
        with reader.read_transaction(self.conn):
            if self.last_id is None or self._gap(self.conn, self.last_id):
                out.append(self._snapshot(self.conn))
            batch = reader.events_after(self.conn, self.last_id or 0, BATCH)
            out += self._frames(self.conn, batch)
        self.more = len(batch) == BATCH
        self.version = version
        return out

    @staticmethod
    def _gap(conn: sqlite3.Connection, last_id: int) -> bool:
        """True when the events after `last_id` can no longer be replayed exactly: the ledger is
        older than the client's position (replaced), or some of them were deleted (retention).
        Event ids are AUTOINCREMENT, so without deletions they have no holes."""
        newest = reader.last_event_id(conn)
        return newest < last_id or reader.count_events_after(conn, last_id) != newest - last_id

    def _snapshot(self, conn: sqlite3.Connection) -> ServerSentEvent:
        snap = reader.read_snapshot(
            conn, done_limit=self.cfg.done_limit, problem_limit=self.cfg.problem_limit
        )
        self.last_id = snap.last_event_id
        now = time.time()
        facts = sidecars.Sidecars(self.cfg.outbox).facts
        body = views.snapshot_view(snap, now, heartbeat=reader.heartbeat(conn, now), facts=facts)
        return ServerSentEvent(_dumps(body), event="snapshot", id=str(snap.last_event_id))

    def _frames(self, conn: sqlite3.Connection, batch: list[reader.Row]) -> list[ServerSentEvent]:
        if not batch:
            return []
        now = time.time()
        rows = reader.get_jobs(conn, {r["job_id"] for r in batch if r.get("job_id")})
        # each job and the counts are encoded once per batch, then spliced into every frame
        facts = sidecars.Sidecars(self.cfg.outbox).facts
        jobs = {job_id: _dumps(views.job_view(row, now, facts=facts(row))) for job_id, row in rows.items()}
        tail = f',"counts":{_dumps(reader.counts(conn))},"now":{_dumps(now)}}}'
        frames = []
        for row in batch:
            job = jobs.get(row.get("job_id") or "", "null")
            data = f'{{"event":{_dumps(views.event_view(row))},"job":{job}{tail}'
            frames.append(ServerSentEvent(data, event=str(row.get("kind") or "event"), id=str(row["id"])))
        self.last_id = int(batch[-1]["id"])
        return frames


async def event_stream(
    cfg: DashboardConfig, last_event_id: int | None, stop: anyio.Event | None = None
) -> AsyncIterator[bytes]:
    """Encoded frames for one client until it disconnects or `stop` is set (server shutdown: the
    stream then ends cleanly and the browser reconnects later with its Last-Event-ID). The frames
    of one read go out as one chunk, so a long replay costs one send per batch."""
    stop = stop or anyio.Event()
    cursor = _Cursor(cfg=cfg, last_id=last_event_id)
    yield ServerSentEvent(comment="infinitetalk ledger events", retry=RETRY_MS).encode()
    try:
        while not stop.is_set():
            frames = await anyio.to_thread.run_sync(cursor.poll)
            if frames:
                yield b"".join(frame.encode() for frame in frames)
            if not cursor.more:
                with anyio.move_on_after(cfg.poll_s):
                    await stop.wait()
    finally:
        cursor.close()
