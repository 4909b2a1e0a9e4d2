"""The daemon's heartbeat: one ledger row (`heartbeat`, id 1) the daemon rewrites every
`EVERY_S` seconds, so that readers (the dashboard, `infinitetalk status --check`, `/metrics`)
can tell a daemon that is up from one that was killed (`kill -9` leaves no "stopped" event).

The row: `at` (wall clock of the write), `pid`, `state` (`loading`: no render worker ready yet;
`ready`; `draining`: stopping, running jobs finish their step; `stopped`: exited cleanly),
`started_at`, and `data_json` with `tiny` (the daemon renders with the tiny random-weight model)
and one entry per render worker: device, node (the host it runs on; a Ray actor: host and node
id), state (`worker_state`), pid, whether its model is loaded, its current jobs, the model facts
it reported, and GPU memory and utilisation (NVML, when `nvidia-ml-py` is
installed and the device is a CUDA GPU).

A reader calls `liveness(conn, now)`: the daemon is `up` when the row is younger than
`STALE_AFTER_S` and its state is not `stopped`. Writing is best effort: a full state dir or a
busy ledger skips one beat, never stops the daemon. This module imports only the standard
library, so the dashboard can use it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

EVERY_S = 2.0  #: how often the daemon writes the row
STALE_AFTER_S = 10.0  #: a row older than this means the daemon is down (5 missed beats)
STATES = ("loading", "ready", "draining", "stopped")


@dataclass(frozen=True, slots=True, kw_only=True)
class Liveness:
    """What a reader concludes from the heartbeat row at `now`."""

    up: bool
    state: str  #: the row's state, or "unknown" when there is no row (an older daemon, or none ran)
    at: float | None = None  #: time of the newest beat
    age_s: float | None = None
    pid: int | None = None
    started_at: float | None = None
    tiny: bool = False
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def down_since(self) -> float | None:
        """When a daemon that is not up was last seen alive (its last beat)."""
        return None if self.up else self.at

    def to_dict(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "state": self.state,
            "at": self.at,
            "age_s": self.age_s,
            "pid": self.pid,
            "started_at": self.started_at,
            "down_since": self.down_since,
            "tiny": self.tiny,
            "workers": self.workers,
        }


def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The heartbeat row as a dict (`data` decoded), or None (no table or no row yet)."""
    try:
        row = conn.execute(
            "SELECT at, pid, state, started_at, data_json FROM heartbeat WHERE id = 1"
        ).fetchone()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return None
        raise
    if row is None:
        return None
    at, pid, state, started_at, data_json = tuple(row)
    try:
        data = json.loads(data_json or "{}")
    except json.JSONDecodeError:
        data = {}
    return {"at": at, "pid": pid, "state": state, "started_at": started_at, "data": data}


def liveness(
    conn: sqlite3.Connection, now: float | None = None, stale_after_s: float = STALE_AFTER_S
) -> Liveness:
    row = read(conn)
    if row is None:
        return Liveness(up=False, state="unknown")
    now = time.time() if now is None else now
    age = max(0.0, now - float(row["at"]))
    data = row["data"] if isinstance(row["data"], dict) else {}
    return Liveness(
        up=row["state"] != "stopped" and age <= stale_after_s,
        state=str(row["state"]),
        at=float(row["at"]),
        age_s=round(age, 3),
        pid=row["pid"],
        started_at=row["started_at"],
        tiny=bool(data.get("tiny")),
        workers=list(data.get("workers") or []),
    )


def write(
    conn: sqlite3.Connection,
    *,
    state: str,
    pid: int,
    started_at: float | None,
    data: dict[str, Any],
    now: float | None = None,
) -> None:
    """Upsert the row in its own short transaction (the caller is not inside one)."""
    if state not in STATES:
        raise ValueError(f"heartbeat state must be one of {', '.join(STATES)}, got {state!r}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO heartbeat (id, at, pid, state, started_at, data_json) VALUES (1, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET at = excluded.at, pid = excluded.pid, state = excluded.state,"
            " started_at = excluded.started_at, data_json = excluded.data_json",
            (time.time() if now is None else now, pid, state, started_at, json.dumps(data, default=str)),
        )
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def worker_state(alive: bool, ready: bool, jobs: Any) -> str:
    """`down` (its process or actor is gone), `loading` (no model yet), `rendering`, `idle`."""
    if not alive:
        return "down"
    if not ready:
        return "loading"
    return "rendering" if jobs else "idle"


def gpu_stats(device: str) -> dict[str, Any]:
    """Memory used/total (bytes) and utilisation (%) of a `cuda:N` device through NVML; {} when
    NVML (`nvidia-ml-py`) or the device is not there. Never imports torch."""
    if not device.startswith("cuda"):
        return {}
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        index = int(device.partition(":")[2] or 0)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if ids and index < len(ids) and ids[index].isdigit():
            index = int(ids[index])
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return {
            "gpu_memory_used": int(mem.used),
            "gpu_memory_total": int(mem.total),
            "gpu_util": int(util.gpu),
        }
    except Exception:  # noqa: BLE001 - GPU facts are best effort
        return {}


class Heartbeat:
    """Owned by the supervisor: `beat_if_due(supervisor)` from its main loop and drain loop."""

    def __init__(self, every_s: float = EVERY_S) -> None:
        self.every_s = every_s
        self.last = 0.0  #: monotonic time of the last write attempt
        self.started_at = time.time()
        self.warned = False

    def beat_if_due(self, sup: Any, *, state: str | None = None) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and state is None:
            return
        self.last = now
        self.beat(sup, state=state)

    def beat(self, sup: Any, *, state: str | None = None) -> None:
        ledger = getattr(sup, "ledger", None)
        if ledger is None or ledger.conn.in_transaction:
            return
        try:
            write(
                ledger.conn,
                state=state or self.state_of(sup),
                pid=os.getpid(),
                started_at=self.started_at,
                data={"tiny": bool(getattr(sup, "tiny", False)), "workers": self.workers_of(sup)},
            )
            self.warned = False
        except sqlite3.Error as e:  # full disk, busy ledger: skip this beat
            if not self.warned:
                logger.warning("could not write the daemon heartbeat to the ledger: %s", e)
                self.warned = True

    @staticmethod
    def state_of(sup: Any) -> str:
        if sup.stop.is_set():
            return "draining"
        pool = getattr(sup, "pool", None)
        return "ready" if pool is not None and pool.any_ready() else "loading"

    @staticmethod
    def workers_of(sup: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        pool = getattr(sup, "pool", None)
        for worker in pool.describe() if pool is not None else []:
            info = worker.info
            entry: dict[str, Any] = {
                "index": worker.index,
                "device": str(info.get("device") or worker.device),
                "pid": worker.pid,
                "alive": worker.alive,
                "model_loaded": worker.ready,
                "jobs": list(worker.jobs),
                "gpu": info.get("gpu"),
                "quant": info.get("quant"),
                "attention": info.get("attention"),
            }
            entry["node"] = str(info.get("node") or socket.gethostname())
            entry["state"] = worker_state(worker.alive, worker.ready, worker.jobs)
            if "node_id" not in info:  # not a Ray actor (whose GPUs NVML here cannot see)
                entry.update(gpu_stats(str(entry["device"])))
            out.append(entry)
        return out
