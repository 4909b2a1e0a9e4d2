"""`infinitetalk status`: a summary line, then the newest jobs, from the ledger read-only.

    infinitetalk status [--state S[,S]] [--name TEXT] [--limit N] [--json] [--check]

- The first line says whether the daemon is up (from its heartbeat, daemon/heartbeat.py) and how
  many jobs are in each state; while it is up, one line per render worker (its node, device,
  state and current jobs); then the newest `--limit` jobs (default 50), newest first, with
  human-readable times.
- `--check` (cron, monitoring): only the summary line; exit 0 when the daemon is up, 3 when it is
  down or has never written a heartbeat.
- No ledger at the configured path: it says so and exits 1 (never a page of zeros).
- Output into a closed pipe (`status | head -3`) ends quietly.

Imports only the standard library at module level (`infinitetalk status` stays fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from daemon.states import State

EXIT_DOWN = 3
DEFAULT_LIMIT = 50
STATES = tuple(s.value for s in State)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", default="", help="only jobs in these states (comma-separated)")
    p.add_argument("--name", default="", help="only jobs whose name contains this text")
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"at most this many jobs, newest first (default {DEFAULT_LIMIT})",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help=f"print the summary line only; exit {EXIT_DOWN} if the daemon is down",
    )


def ago(seconds: float) -> str:
    s = abs(seconds)
    if s < 60:
        text = f"{s:.0f} s"
    elif s < 3600:
        text = f"{s / 60:.0f} min"
    elif s < 86400:
        text = f"{s / 3600:.1f} h"
    else:
        text = f"{s / 86400:.1f} days"
    return f"{text} ago" if seconds >= 0 else f"in {text}"


def when(at: float | None, now: float) -> str:
    """'5 min ago (14:03:22)', local time; the date too when not today."""
    if not at:
        return "-"
    local = time.localtime(at)
    same_day = time.strftime("%Y-%m-%d", local) == time.strftime("%Y-%m-%d", time.localtime(now))
    stamp = time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S %Z", local)
    return f"{ago(now - at)} ({stamp})"


def daemon_line(beat: dict[str, Any], now: float) -> str:
    if beat["state"] == "unknown":
        return "daemon: no heartbeat in the ledger (not running, or never ran with this version)"
    if beat["up"]:
        workers = beat.get("workers") or []
        ready = sum(1 for w in workers if w.get("model_loaded"))
        tiny = " · TINY random-weight model" if beat.get("tiny") else ""
        return (
            f"daemon up ({beat['state']}, pid {beat['pid']}, {ready}/{len(workers)} worker(s) ready,"
            f" heartbeat {ago(beat['age_s'] or 0)}){tiny}"
        )
    if beat["state"] == "stopped":
        return f"daemon stopped {when(beat['at'], now)}"
    return f"daemon DOWN since {when(beat['at'], now)}: no heartbeat for {beat['age_s']:.0f} s"


def worker_line(worker: dict[str, Any]) -> str:
    """'  worker 0  node gpu-a  cuda:0  rendering 3f2a9c1b (alice)' (state from the heartbeat)."""
    state = worker.get("state") or ("idle" if worker.get("model_loaded") else "loading")
    ids = [str(j) for j in worker.get("jobs") or []]
    names = list(worker.get("job_names") or []) + [""] * len(ids)
    jobs = [f"{job} ({name})" if name else job for job, name in zip(ids, names, strict=False)]
    doing = f" {', '.join(jobs)}" if jobs else ""
    return (
        f"  worker {worker.get('index', '?')}  node {worker.get('node') or '?'}  "
        f"{worker.get('device') or '?'}  {state}{doing}"
    )


def _states(raw: str) -> tuple[str, ...]:
    states = tuple(s for s in raw.replace(" ", "").split(",") if s)
    bad = [s for s in states if s not in STATES]
    if bad:
        raise ValueError(f"unknown state {bad[0]!r}; states are {', '.join(STATES)}")
    return states


def read(path: Path, *, states: tuple[str, ...], name: str, limit: int, now: float) -> dict[str, Any]:
    from daemon import heartbeat, webhooks
    from daemon.ledger import JobRow, connect, state_counts

    conn = connect(path, readonly=True, timeout_s=5.0)
    try:
        conn.execute("BEGIN")
        counts = state_counts(conn)
        where: list[str] = []
        args: list[Any] = []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        if name:
            where.append("instr(lower(name), lower(?)) > 0")
            args.append(name)
        clause = " WHERE " + " AND ".join(where) if where else ""
        matching = int(conn.execute(f"SELECT COUNT(*) FROM jobs{clause}", args).fetchone()[0])
        rows = conn.execute(
            f"SELECT * FROM jobs{clause} ORDER BY seq DESC LIMIT ?", (*args, limit)
        ).fetchall()
        beat = heartbeat.liveness(conn, now).to_dict()
        busy = sorted({str(j) for w in beat["workers"] for j in w.get("jobs") or []})
        names = (
            dict(
                conn.execute(
                    f"SELECT id, name FROM jobs WHERE id IN ({', '.join('?' * len(busy))})", busy
                ).fetchall()
            )
            if busy
            else {}
        )
        for w in beat["workers"]:
            w["job_names"] = [names.get(str(j), "") for j in w.get("jobs") or []]
        hooks = webhooks.summary(conn)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return {
        "counts": counts,
        "daemon": beat,
        "matching": matching,
        "limit": limit,
        "jobs": [JobRow.from_row(r).summary() for r in rows],
        "webhooks": hooks,
    }


def job_line(job: dict[str, Any], now: float) -> str:
    extra = ""
    state = job["state"]
    if state.startswith("running"):
        extra = (
            f" {job['progress'] * 100:5.1f}%  chunk {job['chunk']}/{job['num_chunks']} step {job['step']}/"
            f"{job['num_steps']}  started {when(job['started_at'], now)}"
        )
    elif state == "waiting":
        extra = f" ({job['waiting_reason']})"
    elif state in ("failed", "rejected", "retry_wait"):
        extra = f" {job['error_code']}: {job['error_message']}"
    elif state == "done":
        extra = f" {job['output_video']}" + (" (deleted)" if job["deleted_at"] else "")
    stamp = job["finished_at"] or job["created_at"]
    return f"{job['id']}  {state:<10} {job['name']}{extra}  [{when(stamp, now)}]"


def run(args: argparse.Namespace, ledger_path: Path, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        return _run(args, ledger_path, out)
    except BrokenPipeError:
        # the reader went away (`status | head`): stop quietly; point stdout at /dev/null so the
        # interpreter's final flush does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


def _run(args: argparse.Namespace, ledger_path: Path, out: TextIO) -> int:
    now = time.time()
    try:
        states = _states(args.state)
    except ValueError as e:
        print(f"infinitetalk status: {e}", file=sys.stderr)
        return 2
    if args.limit < 1:
        print(f"infinitetalk status: --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return 2
    if not ledger_path.is_file():
        print(
            f"infinitetalk status: no ledger at {ledger_path} (missing): the daemon has not run with this"
            " state_dir, or --config names another one",
            file=sys.stderr,
        )
        return 1
    try:
        snap = read(ledger_path, states=states, name=args.name, limit=args.limit, now=now)
    except sqlite3.Error as e:
        print(f"infinitetalk status: cannot read the ledger {ledger_path}: {e}", file=sys.stderr)
        return 1
    beat = snap["daemon"]
    down = not beat["up"]
    if args.json:
        print(json.dumps(snap, sort_keys=True), file=out)
        return EXIT_DOWN if args.check and down else 0
    counts = snap["counts"]
    total = sum(counts.values())
    summary = " · ".join(f"{n} {state}" for state, n in counts.items() if n) or "no jobs"
    print(f"{daemon_line(beat, now)} | {total} jobs: {summary}", file=out)
    if args.check:
        return EXIT_DOWN if down else 0
    for worker in beat["workers"] if not down else []:
        print(worker_line(worker), file=out)
    filters = ", ".join(
        part
        for part in (f"state {args.state}" if states else "", f"name ~ {args.name!r}" if args.name else "")
        if part
    )
    shown = len(snap["jobs"])
    print(
        f"newest {shown} of {snap['matching']} job(s)"
        + (f" matching {filters}" if filters else "")
        + (f" (--limit {args.limit})" if snap["matching"] > shown else ""),
        file=out,
    )
    for job in snap["jobs"]:
        if down and job["state"] == "running":
            job = {**job, "state": "running?"}  # nobody is rendering it now
        print(job_line(job, now), file=out)
    return 0
