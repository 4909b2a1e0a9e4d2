"""`/metrics`: the ledger in the Prometheus text format, written by `prometheus_client`.

Everything is derived from the ledger at scrape time (a custom collector on a registry of its
own per scrape), so the numbers survive dashboard restarts:

- `infinitetalk_ledger_up`: the dashboard can read the ledger;
- `infinitetalk_daemon_up`, `infinitetalk_daemon_heartbeat_age_seconds`, `infinitetalk_workers_ready`,
  `infinitetalk_model_loaded{device}`, `infinitetalk_tiny_model`, and per device
  `infinitetalk_gpu_memory_used_bytes`, `infinitetalk_gpu_memory_total_bytes`,
  `infinitetalk_gpu_utilization_ratio`: from the daemon's heartbeat row (daemon/heartbeat.py);
  down when the row is older than 10 s;
- `infinitetalk_jobs{state}`: queue depth by state;
- `infinitetalk_jobs_finished_total{outcome,error_code}` and
  `infinitetalk_video_rendered_seconds_total`: counters the ledger keeps (triggers on the jobs
  table), so retention never lowers them;
- `infinitetalk_render_seconds` and `infinitetalk_queue_wait_seconds`: histograms over the jobs
  still in the ledger;
- `infinitetalk_job_progress{id,name}` of each running job, `infinitetalk_last_event_id`.
"""

from __future__ import annotations

import bisect
import sqlite3
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from dashboard import reader

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RENDER_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)


def histogram(
    name: str, doc: str, values: Iterable[float], buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    ordered = sorted(values)
    counts = [(repr(b), float(bisect.bisect_right(ordered, b))) for b in buckets]
    counts.append(("+Inf", float(len(ordered))))
    return HistogramMetricFamily(name, doc, buckets=counts, sum_value=float(sum(ordered)))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class _LedgerCollector(Collector):
    def __init__(self, data: dict[str, Any] | None) -> None:
        self.data = data

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            "infinitetalk_ledger_up", "1 if the dashboard can read the ledger, else 0.", 1 if self.data else 0
        )
        if not self.data:
            yield _gauge("infinitetalk_daemon_up", "1 while the daemon's heartbeat is fresh, else 0.", 0)
            return
        yield from _daemon_metrics(self.data["heartbeat"])
        yield from _job_metrics(self.data)


def _daemon_metrics(beat: dict[str, Any]) -> Iterator[Metric]:
    """What the daemon's heartbeat row says: up, age, workers, their devices, the tiny model."""
    yield _gauge(
        "infinitetalk_daemon_up",
        "1 while the daemon's heartbeat is fresh, else 0.",
        1 if beat["up"] else 0,
    )
    if beat.get("age_s") is not None:
        yield _gauge(
            "infinitetalk_daemon_heartbeat_age_seconds",
            "Seconds since the daemon's last heartbeat.",
            beat["age_s"],
        )
    workers = (beat.get("workers") or []) if beat["up"] else []
    yield _gauge(
        "infinitetalk_workers_ready",
        "Render workers with their model loaded (0 while the daemon is down).",
        sum(1 for w in workers if w.get("model_loaded")),
    )
    loaded = GaugeMetricFamily(
        "infinitetalk_model_loaded",
        "1 if the render worker on the device has its model loaded.",
        labels=["device"],
    )
    used = GaugeMetricFamily(
        "infinitetalk_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["device"]
    )
    total = GaugeMetricFamily(
        "infinitetalk_gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=["device"]
    )
    util = GaugeMetricFamily(
        "infinitetalk_gpu_utilization_ratio", "GPU utilisation 0..1 (NVML).", labels=["device"]
    )
    for w in workers:
        device = str(w.get("device") or w.get("index"))
        loaded.add_metric([device], 1 if w.get("model_loaded") else 0)
        if w.get("gpu_memory_used") is not None:
            used.add_metric([device], float(w["gpu_memory_used"]))
        if w.get("gpu_memory_total") is not None:
            total.add_metric([device], float(w["gpu_memory_total"]))
        if w.get("gpu_util") is not None:
            util.add_metric([device], float(w["gpu_util"]) / 100.0)
    yield from (loaded, used, total, util)
    yield _gauge(
        "infinitetalk_tiny_model",
        "1 while the daemon renders with the tiny random-weight model.",
        1 if beat["up"] and beat.get("tiny") else 0,
    )


def _job_metrics(d: dict[str, Any]) -> Iterator[Metric]:
    """Jobs by state, the ledger's counters, the render and wait histograms, running progress."""
    jobs = GaugeMetricFamily("infinitetalk_jobs", "Jobs in the ledger by state.", labels=["state"])
    for state, n in d["counts"].items():
        jobs.add_metric([state], n)
    yield jobs
    finished = CounterMetricFamily(
        "infinitetalk_jobs_finished",
        "Jobs that reached a final state, by outcome and error code (kept by the ledger).",
        labels=["outcome", "error_code"],
    )
    seconds = 0.0
    for name, label, value in d["counters"]:
        if name == "jobs_finished":
            outcome, _, code = label.partition("|")
            finished.add_metric([outcome, code], value)
        elif name == "video_seconds":
            seconds += value
    yield finished
    yield CounterMetricFamily(
        "infinitetalk_video_rendered_seconds",
        "Seconds of finished video rendered (kept by the ledger).",
        value=seconds,
    )
    yield histogram(
        "infinitetalk_render_seconds",
        "Render time of the finished jobs in the ledger.",
        d["render_s"],
        RENDER_BUCKETS,
    )
    yield histogram(
        "infinitetalk_queue_wait_seconds",
        "Time from queued to started, for every job that started.",
        [max(0.0, w) for w in d["waits"]],
        WAIT_BUCKETS,
    )
    progress = GaugeMetricFamily(
        "infinitetalk_job_progress", "Progress (0..1) of each running job.", labels=["id", "name"]
    )
    for job_id, name, p in d["running"]:
        progress.add_metric([str(job_id), str(name or "")], float(p))
    yield progress
    yield _gauge("infinitetalk_last_event_id", "Id of the newest ledger event.", d["last_id"])


def read(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    """Everything a scrape shows, in one read transaction."""
    now = time.time() if now is None else now
    with reader.read_transaction(conn):
        return {
            "counts": reader.counts(conn),
            "counters": reader.counters(conn),
            "heartbeat": reader.heartbeat(conn, now),
            "render_s": [
                r[0]
                for r in conn.execute(
                    "SELECT render_s FROM jobs WHERE state = 'done' AND render_s IS NOT NULL"
                )
            ],
            "waits": [
                r[0]
                for r in conn.execute(
                    "SELECT started_at - queued_at FROM jobs WHERE started_at IS NOT NULL AND queued_at IS NOT NULL"
                )
            ],
            "running": conn.execute(
                "SELECT id, name, COALESCE(progress, 0) FROM jobs WHERE state = 'running' ORDER BY seq"
            ).fetchall(),
            "last_id": reader.last_event_id(conn),
        }


def render(conn: sqlite3.Connection | None) -> str:
    """The exposition text; `conn` None means the ledger is unavailable (`ledger_up 0`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LedgerCollector(read(conn) if conn is not None else None))
    return generate_latest(registry).decode()
