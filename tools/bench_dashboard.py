"""Dashboard scale benchmark: a ledger of 5,000 jobs and 500,000 events, a real dashboard
process (uvicorn), and the time and size of every page and API response.

    .venv/bin/python tools/bench_dashboard.py [--jobs 5000] [--events 500000] [--runs 20] [--keep DIR]

The ledger is made through daemon/ledger.py (schema and migrations) and filled with plain SQL
in the daemon's shapes: jobs in every state with settings and prompts, each with its state and
progress events, and one long job (a 10-minute video) with 20,000 progress events. A second,
small ledger (half the jobs, the same events per job) is measured too, to show that response sizes do not grow with
the ledger. Each URL is fetched `--runs` times after one warm-up; the median and the worst time
and the body size are printed as a Markdown table (the figures in docs/dashboard.md).
Exit status 1 if any worst time is over `--budget-ms` (300).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.ledger import Ledger  # noqa: E402
from tests.dashboard.server_proc import dashboard_server, free_port, write_config  # noqa: E402

WORDS = [
    "woman",
    "man",
    "studio",
    "talks",
    "sings",
    "bright",
    "dark",
    "podcast",
    "interview",
    "news",
    "anchor",
    "laughs",
    "calm",
]
LONG_JOB_EVENTS = 20_000


def fill(path: Path, jobs: int, events: int, seed: int = 1) -> dict[str, str]:
    """A ledger at `path` with `jobs` jobs and about `events` events; returns sample ids."""
    rng = random.Random(seed)
    led = Ledger(path)
    conn = led.conn
    now = time.time()
    pool = ["done"] * 80 + ["failed"] * 8 + ["rejected"] * 4 + ["cancelled"] * 2 + ["waiting"] * 1
    chosen = [
        "running" if i >= jobs - 3 else ("queued" if i >= jobs - 20 else rng.choice(pool))
        for i in range(jobs)
    ]
    started_jobs = sum(1 for s in chosen if s in ("done", "failed", "running", "cancelled"))
    # the state events of every job, then progress events spread over the jobs that started
    state_events = sum(
        2 + (s in ("done", "failed", "running", "cancelled")) + (s not in ("waiting", "queued", "running"))
        for s in chosen
    )
    per_job = max(4, (events - LONG_JOB_EVENTS - state_events) // max(1, started_jobs - 1) + 4)
    job_rows = []
    event_rows: list[tuple[str, float, str, str]] = []
    samples: dict[str, str] = {}
    for i in range(jobs):
        seq = i + 1
        job_id = f"{seq:012x}"
        state = chosen[i]
        created = now - (jobs - i) * 60.0
        prompt = " ".join(rng.choice(WORDS) for _ in range(12)) + f" take {i}"
        spec = {
            "prompt": prompt,
            "size": "infinitetalk-480",
            "sample_steps": 40,
            "seed": i,
            "mode": "streaming",
        }
        started = created + 30 if state in ("done", "failed", "running", "cancelled") else None
        finished = created + 600 if state in ("done", "failed", "rejected", "cancelled") else None
        name = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{i:05d}"
        job_rows.append(
            (
                job_id,
                name,
                state,
                0,
                seq,
                f"inbox/{name}",
                json.dumps(spec),
                1 if started else 0,
                1.0 if state == "done" else 0.5,
                created,
                created + 1,
                started,
                finished,
                f"/nonexistent/outbox/{name}.mp4" if state == "done" else None,
                60.0 if state == "done" else None,
                570.0 if state == "done" else None,
                "render_error" if state == "failed" else ("bad_json" if state == "rejected" else None),
                "RuntimeError: boom" if state == "failed" else None,
            )
        )
        n_events = LONG_JOB_EVENTS + 4 if i == jobs - 1 else per_job
        event_rows.append((job_id, created, "created", json.dumps({"name": name})))
        event_rows.append((job_id, created + 1, "queued", json.dumps({"state": "queued"})))
        if started:
            event_rows.append((job_id, started, "started", json.dumps({"state": "running", "attempt": 1})))
            for k in range(n_events - 4):
                p = (k + 1) / (n_events - 3)
                data = {
                    "progress": round(p, 4),
                    "chunk": k // 40,
                    "num_chunks": n_events // 40 + 1,
                    "step": k % 40,
                    "num_steps": 40,
                    "stage": "denoise",
                }
                event_rows.append((job_id, started + k * 0.5, "progress", json.dumps(data)))
        if finished:
            event_rows.append((job_id, finished, state, json.dumps({"state": state})))
        if state == "done" and "done" not in samples:
            samples["done"] = job_id
        if state == "failed":
            samples["failed"] = job_id
    samples["long"] = f"{jobs:012x}"
    with led.tx():
        conn.executemany(
            "INSERT INTO jobs (id, name, state, priority, seq, source, spec_json, attempts, progress, created_at,"
            " queued_at, started_at, finished_at, output_video, duration_s, render_s, error_code, error_message)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            job_rows,
        )
        conn.executemany("INSERT INTO events (job_id, at, kind, data_json) VALUES (?, ?, ?, ?)", event_rows)
    from daemon import heartbeat

    heartbeat.write(
        conn, state="ready", pid=1, started_at=now - 3600, data={"tiny": False, "workers": []}, now=now
    )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    n_jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    n_events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    led.close()
    samples["counts"] = f"{n_jobs:,} jobs, {n_events:,} events"
    samples["late_event"] = str(n_events - 100)
    return samples


def urls(samples: dict[str, str]) -> list[tuple[str, str]]:
    long_job, failed, done = (
        samples["long"],
        samples.get("failed", samples["long"]),
        samples.get("done", samples["long"]),
    )
    return [
        ("main page", "/"),
        ("job page (HTML)", f"/jobs/{long_job}"),
        ("/api/jobs (page snapshot)", "/api/jobs"),
        ("/api/jobs first page", "/api/jobs?limit=50"),
        ("/api/jobs page 60 (cursor)", "/api/jobs?limit=50&before=2000"),
        ("/api/jobs state=failed", "/api/jobs?state=failed"),
        ("/api/jobs search prompt text", "/api/jobs?q=studio%20talks"),
        ("/api/jobs search id prefix", f"/api/jobs?q={done[:9]}"),
        ("/api/jobs/{id} (20,000 events)", f"/api/jobs/{long_job}"),
        ("/api/jobs/{id} failed job", f"/api/jobs/{failed}"),
        ("/api/jobs/{id}/events page", f"/api/jobs/{long_job}/events?after=0&limit=100"),
        (
            "/api/jobs/{id}/events late page",
            f"/api/jobs/{long_job}/events?after={samples['late_event']}&limit=100",
        ),
        ("/api/daemon", "/api/daemon"),
        ("/metrics", "/metrics"),
        ("/healthz", "/healthz"),
    ]


def measure(base: str, path: str, runs: int) -> tuple[float, float, int]:
    def once() -> tuple[float, int]:
        t0 = time.perf_counter()
        with urllib.request.urlopen(base + path, timeout=30) as r:
            body = r.read()
        return (time.perf_counter() - t0) * 1000, len(body)

    once()
    times, size = [], 0
    for _ in range(runs):
        ms, size = once()
        times.append(ms)
    return statistics.median(times), max(times), size


def bench(folder: Path, jobs: int, events: int, runs: int) -> tuple[str, dict[str, tuple[float, float, int]]]:
    state = folder / "var"
    outbox = folder / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    samples = fill(state / "ledger.sqlite3", jobs, events)
    made = time.perf_counter() - t0
    port = free_port()
    config = write_config(folder / "infinitetalk.toml", state_dir=state, outbox=outbox, port=port)
    results: dict[str, tuple[float, float, int]] = {}
    with dashboard_server(config, port, folder / "dashboard.log") as (base, _proc):
        for label, path in urls(samples):
            results[label] = measure(base, path, runs)
    return f"{samples['counts']} (made in {made:.1f} s)", results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--budget-ms", type=float, default=300.0)
    ap.add_argument("--keep", type=Path, default=None, help="build the ledgers here and keep them")
    args = ap.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    try:
        big_what, big = bench(root / "big", args.jobs, args.events, args.runs)
        # half the jobs with the same events per job (and the same long job)
        few = max(50, args.jobs // 2)
        small_events = LONG_JOB_EVENTS + (args.events - LONG_JOB_EVENTS) * few // args.jobs
        small_what, small = bench(root / "small", few, small_events, args.runs)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"big ledger: {big_what}; small ledger: {small_what}; {args.runs} runs each after a warm-up\n")
    print("| response | median ms | worst ms | bytes | bytes, small ledger |")
    print("|---|---:|---:|---:|---:|")
    worst = 0.0
    for label, (median, top, size) in big.items():
        worst = max(worst, top)
        print(f"| {label} | {median:.1f} | {top:.1f} | {size:,} | {small[label][2]:,} |")
    print(f"\nworst response: {worst:.1f} ms (budget {args.budget_ms:.0f} ms)")
    return 0 if worst <= args.budget_ms else 1


if __name__ == "__main__":
    sys.exit(main())
