"""`/metrics`: the ledger in the Prometheus text exposition format (version 0.0.4).

Everything is derived from the ledger at scrape time, so the numbers survive dashboard restarts:
jobs per state, render seconds and queue wait of the jobs still in the ledger (histograms), the
progress of running jobs, the newest event id, and whether the ledger could be read at all.
"""

from __future__ import annotations

import bisect
import sqlite3
from collections.abc import Iterable

from dashboard import reader

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RENDER_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


def _head(name: str, kind: str, doc: str) -> list[str]:
    return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]


def histogram(name: str, doc: str, values: Iterable[float], buckets: tuple[float, ...]) -> list[str]:
    values = sorted(values)
    lines = _head(name, "histogram", doc)
    for bound in buckets:
        lines.append(f'{name}_bucket{{le="{_num(bound)}"}} {bisect.bisect_right(values, bound)}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {len(values)}')
    lines.append(f"{name}_sum {_num(sum(values))}")
    lines.append(f"{name}_count {len(values)}")
    return lines


def render(conn: sqlite3.Connection | None) -> str:
    """The exposition text; `conn` None means the ledger is unavailable (only `ledger_up 0`)."""
    lines = _head("infinitetalk_ledger_up", "gauge", "1 if the dashboard can read the ledger, else 0.")
    if conn is None:
        lines.append("infinitetalk_ledger_up 0")
        return "\n".join(lines) + "\n"
    lines.append("infinitetalk_ledger_up 1")
    with reader.read_transaction(conn):
        counts = reader.counts(conn)
        render_s = [
            r[0]
            for r in conn.execute(
                "SELECT render_s FROM jobs WHERE state = 'done' AND render_s IS NOT NULL"
            ).fetchall()
        ]
        waits = [
            r[0]
            for r in conn.execute(
                "SELECT started_at - queued_at FROM jobs"
                " WHERE started_at IS NOT NULL AND queued_at IS NOT NULL"
            ).fetchall()
        ]
        running = conn.execute(
            "SELECT id, name, COALESCE(progress, 0) FROM jobs WHERE state = 'running' ORDER BY seq"
        ).fetchall()
        last_id = reader.last_event_id(conn)
    lines += _head("infinitetalk_jobs", "gauge", "Jobs in the ledger by state.")
    lines += [f'infinitetalk_jobs{{state="{_label(s)}"}} {n}' for s, n in counts.items()]
    lines += histogram(
        "infinitetalk_render_seconds",
        "Render time of the finished jobs in the ledger.",
        render_s,
        RENDER_BUCKETS,
    )
    lines += histogram(
        "infinitetalk_queue_wait_seconds",
        "Time from queued to started, for every job that started.",
        [max(0.0, w) for w in waits],
        WAIT_BUCKETS,
    )
    lines += _head("infinitetalk_job_progress", "gauge", "Progress (0..1) of each running job.")
    lines += [
        f'infinitetalk_job_progress{{id="{_label(i)}",name="{_label(n or "")}"}} {_num(p)}'
        for i, n, p in running
    ]
    lines += _head("infinitetalk_last_event_id", "gauge", "Id of the newest ledger event.")
    lines.append(f"infinitetalk_last_event_id {last_id}")
    return "\n".join(lines) + "\n"
