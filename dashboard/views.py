"""Ledger rows as the JSON the page and scripts read (`/api/jobs`, `/events`).

Absolute paths stay on the server: a job's outputs are reached through `/jobs/{id}/video` and
`/jobs/{id}/poster`, and only their file names are shown. JSON columns (`*_json`) are decoded.
Derived times (`elapsed_s`, `eta_s`, `queue_wait_s`) are computed at `now`, the server's clock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from daemon.states import ACTIVE, EVENT_KINDS, EVENT_OF, PROBLEM, STATES
from dashboard.reader import Row, Snapshot

_OUTPUTS = {"output_video": "video", "output_poster": "poster", "output_json": "json"}
#: server-side paths that are not shown (the daemon's claimed-inputs folder); the failure detail
#: (up to tens of KB) is only in the one-job view, so lists stay small
_HIDDEN = ("job_dir", "failure_detail", "intent")


def _decode(text: Any) -> Any:
    if not isinstance(text, str) or not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def eta_s(row: Row, now: float) -> float | None:
    """Seconds left for a running job, from its pace so far: elapsed * (1 - p) / p."""
    progress, started = row.get("progress"), row.get("started_at")
    if row.get("state") != "running" or not started or not progress or progress <= 0:
        return None
    elapsed = max(0.0, now - started)
    return max(0.0, elapsed * (1.0 - min(progress, 1.0)) / progress)


def job_view(
    row: Row, now: float, *, facts: dict[str, Any] | None = None, detail: bool = False
) -> dict[str, Any]:
    """A job as JSON. `facts`: what its sidecar says about the output (dashboard/sidecars.py);
    `detail`: add the stored failure detail (`failure`: traceback and worker log lines)."""
    view: dict[str, Any] = {}
    for key, value in row.items():
        if key in _OUTPUTS or key in _HIDDEN:
            continue
        if key.endswith("_json"):
            view[key[: -len("_json")]] = _decode(value)
        else:
            view[key] = value
    view["settings"] = view.pop("spec", None)
    job_id = row["id"]
    outputs = {name: os.path.basename(row[col]) for col, name in _OUTPUTS.items() if row.get(col)}
    view["outputs"] = outputs
    available = row.get("state") == "done" and not row.get("deleted_at")
    view["urls"] = {
        "page": f"/jobs/{job_id}",
        "api": f"/api/jobs/{job_id}",
        "video": f"/jobs/{job_id}/video" if available and "video" in outputs else None,
        "download": f"/jobs/{job_id}/video?download=1" if available and "video" in outputs else None,
        "poster": f"/jobs/{job_id}/poster" if available and "poster" in outputs else None,
        "json": f"/jobs/{job_id}/json" if "json" in outputs and not row.get("deleted_at") else None,
    }
    view["output"] = facts
    if detail:
        view["failure"] = _decode(row.get("failure_detail"))
    started, queued, finished = row.get("started_at"), row.get("queued_at"), row.get("finished_at")
    view["queue_wait_s"] = started - queued if started and queued else None
    if row.get("state") == "running" and started:
        view["elapsed_s"] = max(0.0, now - started)
    elif started and finished:
        view["elapsed_s"] = max(0.0, finished - started)
    else:
        view["elapsed_s"] = None
    view["eta_s"] = eta_s(row, now)
    return view


def event_view(row: Row) -> dict[str, Any]:
    data = _decode(row.get("data_json"))
    if isinstance(data, dict):  # output paths in event data are shown as file names too
        data = {
            k: os.path.basename(v) if k in _OUTPUTS and isinstance(v, str) else v
            for k, v in data.items()
            if k not in _HIDDEN
        }
    return {
        "id": row["id"],
        "job_id": row.get("job_id"),
        "at": row.get("at"),
        "kind": row.get("kind"),
        "data": data,
    }


def vocabulary() -> dict[str, Any]:
    """The job states (in the order the page lists them), the groups the page shows together, the
    ledger's event kinds and the kind of event entering each state, from daemon/states.py: the
    scripts take them from here."""
    return {
        "states": [s.value for s in STATES],
        "state_groups": {"active": [s.value for s in ACTIVE], "problem": [s.value for s in PROBLEM]},
        "event_kinds": list(EVENT_KINDS),
        "state_events": {s.value: EVENT_OF[s] for s in STATES},
    }


def snapshot_view(
    snap: Snapshot,
    now: float,
    *,
    heartbeat: dict[str, Any] | None = None,
    facts: Callable[[Row], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    return {
        "now": now,
        "ledger": {"available": True},
        "counts": snap.counts,
        "last_event_id": snap.last_event_id,
        "daemon": event_view(snap.daemon) if snap.daemon else None,
        "heartbeat": heartbeat,
        "jobs": [job_view(r, now, facts=facts(r) if facts else None) for r in snap.jobs],
        **vocabulary(),
    }


def unavailable_view(path: str, reason: str, now: float) -> dict[str, Any]:
    return {
        "now": now,
        "ledger": {"available": False, "path": path, "reason": reason},
        "counts": {},
        "last_event_id": 0,
        "daemon": None,
        "heartbeat": None,
        "jobs": [],
        **vocabulary(),
    }
