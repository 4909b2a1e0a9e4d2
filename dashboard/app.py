"""The dashboard's Starlette app: `create_app(config)`.

Routes (GET and HEAD only):

    /                     the live page (static/index.html); ?state=&q=&before= browse all jobs
    /jobs/{id}            one job's page: summary, progress chart, attempts, failure detail
                          (static/job.html); ?events=1&after=N pages its raw events
    /api/jobs             JSON: counts, active jobs, newest finished ones; with ?state=a,b, ?q=text,
                          ?before=SEQ or ?limit=N one page of all jobs, newest first (`page.next`)
    /api/jobs/{id}        JSON: one job, its summary (timeline, progress series, attempts) and
                          the first page of its events
    /api/jobs/{id}/events JSON: one page of a job's events (?after=ID&limit=N)
    /api/daemon           JSON: the daemon's liveness from its heartbeat
    /events               server-sent events, resumable with Last-Event-ID (dashboard/sse.py)
    /jobs/{id}/video      the job's MP4 (HTTP Range; ?download=1 for an attachment)
    /jobs/{id}/poster     the job's poster JPEG
    /jobs/{id}/json       the job's sidecar JSON (or error JSON) from the outbox
    /healthz              liveness, with whether the ledger is readable
    /metrics              Prometheus text (dashboard/metrics.py)
    /static/...           the page's JS, CSS and icon

Files are found by job id in the ledger and must lie inside the outbox; no path ever comes from
the URL. The ledger is opened read-only per request; a missing ledger is a 503 for the API and a
note on the page, never a crash.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from daemon.states import PROBLEM, STATES, State
from dashboard import metrics, reader, sidecars, sse, views
from dashboard.config import DashboardConfig, from_settings
from dashboard.security import ReadOnlyMiddleware, SecurityHeadersMiddleware, TokenMiddleware

STATIC_DIR = Path(__file__).resolve().parent / "static"
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_LIMIT = 1000
PAGE_LIMIT = 50  #: jobs per page of /api/jobs when paging
EVENT_PAGE = 100  #: events per page of a job's raw events
MAX_QUERY = 200  #: characters of a search
NO_STORE = {"Cache-Control": "no-store"}


class _Problem(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@contextmanager
def _ledger(cfg: DashboardConfig) -> Iterator[sqlite3.Connection]:
    """A read-only connection for one request; any SQLite error reading it is `LedgerUnavailable`."""
    conn = reader.connect(cfg.ledger_path)
    try:
        yield conn
    except sqlite3.Error as e:
        raise reader.LedgerUnavailable(cfg.ledger_path, f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=NO_STORE)


def _job_id(request: Request) -> str:
    job_id = str(request.path_params["job_id"])
    if not JOB_ID.fullmatch(job_id):
        raise _Problem(404, f"no job {job_id!r}: job ids are 1-64 letters, digits, '-' or '_'")
    return job_id


def _states(raw: str | None) -> tuple[str, ...]:
    states = tuple(s for s in (raw or "").replace(" ", "").split(",") if s)
    unknown = [s for s in states if s not in STATES]
    if unknown:
        raise _Problem(400, f"unknown state {unknown[0]!r}; states are {', '.join(STATES)}")
    return states


def _limit(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise _Problem(400, f"limit must be an integer 1..{MAX_LIMIT}, got {raw!r}")
    return int(raw)


def _int(raw: str | None, name: str) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise _Problem(400, f"{name} must be a non-negative integer, got {raw!r}")
    return int(raw)


def _query(raw: str | None) -> str:
    text = (raw or "").strip()
    if len(text) > MAX_QUERY:
        raise _Problem(400, f"a search is at most {MAX_QUERY} characters, got {len(text)}")
    return text


def _config(request: Request) -> DashboardConfig:
    cfg = request.app.state.config
    assert isinstance(cfg, DashboardConfig)
    return cfg


def _output_file(request: Request, column: str) -> Path:
    """The job's output file from the ledger, checked to be a regular file inside the outbox.
    The sidecar (`output_json`) is served in any final state (a failure's is its error JSON)."""
    cfg, job_id = _config(request), _job_id(request)
    with _ledger(cfg) as conn:
        row = reader.get_job(conn, job_id)
    if row is None:
        raise _Problem(404, f"no job {job_id!r} in the ledger")
    if row.get("deleted_at"):
        raise _Problem(410, f"the outputs of job {job_id!r} were deleted")
    ready = row.get("state") == State.done or (column == "output_json" and row.get("state") in PROBLEM)
    if not ready or not row.get(column):
        raise _Problem(
            404, f"job {job_id!r} has no {column.removeprefix('output_')} (state {row.get('state')})"
        )
    path = Path(row[column]).resolve()
    if not path.is_relative_to(cfg.outbox.resolve()):
        raise _Problem(404, f"the {column} of job {job_id!r} is outside the outbox; not served")
    if not path.is_file():
        raise _Problem(410, f"the {column} of job {job_id!r} is no longer in the outbox")
    return path


# ---------------------------------------------------------------------- endpoints


def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def job_page(request: Request) -> Response:
    _job_id(request)
    return FileResponse(STATIC_DIR / "job.html", headers={"Cache-Control": "no-cache"})


def api_jobs(request: Request) -> Response:
    cfg, params = _config(request), request.query_params
    states = _states(params.get("state"))
    limit = params.get("limit")
    query = _query(params.get("q"))
    before = _int(params.get("before"), "before")
    paged = bool(states or query or limit is not None or before is not None)
    size = _limit(limit, PAGE_LIMIT)
    now = time.time()
    with _ledger(cfg) as conn, reader.read_transaction(conn):
        if not paged:
            snap = reader.read_snapshot(conn, done_limit=cfg.done_limit, problem_limit=cfg.problem_limit)
        else:
            rows = reader.list_jobs(conn, states, size + 1, query=query, before=before)
            snap = reader.Snapshot(
                counts=reader.counts(conn),
                jobs=rows[:size],
                last_event_id=reader.last_event_id(conn),
                daemon=reader.last_daemon_event(conn),
            )
        beat = reader.heartbeat(conn, now)
    body = views.snapshot_view(snap, now, heartbeat=beat, facts=request.app.state.sidecars.facts)
    if paged:
        more = len(rows) > size
        next_before = snap.jobs[-1]["seq"] if more and snap.jobs else None
        link = {"state": ",".join(states), "q": query, "limit": str(size), "before": str(next_before)}
        body["page"] = {
            "state": list(states),
            "q": query,
            "limit": size,
            "before": before,
            "next_before": next_before,
            "next": "/api/jobs?" + urlencode({k: v for k, v in link.items() if v}) if more else None,
        }
    return _json(body)


def api_job(request: Request) -> Response:
    job_id, side = _job_id(request), request.app.state.sidecars
    now = time.time()
    with _ledger(_config(request)) as conn, reader.read_transaction(conn):
        row = reader.get_job(conn, job_id)
        if row is None:
            raise _Problem(404, f"no job {job_id!r} in the ledger")
        events = reader.job_events(conn, job_id, limit=EVENT_PAGE + 1)
        summary = reader.job_summary(conn, job_id)
        attempts = reader.job_attempts(conn, job_id)
        last_id = reader.last_event_id(conn)
        beat = reader.heartbeat(conn, now)
    more = len(events) > EVENT_PAGE
    events = events[:EVENT_PAGE]
    sidecar = side.read(row) if row.get("state") in (State.done, *PROBLEM) else None
    timings = sidecar.get("timings_s") if isinstance(sidecar, dict) else None
    return _json(
        {
            "now": now,
            "last_event_id": last_id,
            "heartbeat": beat,
            "job": views.job_view(row, now, facts=side.facts(row), detail=True),
            "summary": {
                "events_total": summary["events_total"],
                "progress_events": summary["progress_events"],
                "timeline": [views.event_view(e) for e in summary["timeline"]],
                "series": summary["series"],
                "attempts": attempts,
                "timings_s": timings if isinstance(timings, dict) else None,
            },
            "events": [views.event_view(e) for e in events],
            "events_next": f"/api/jobs/{job_id}/events?after={events[-1]['id']}" if more else None,
        }
    )


def api_job_events(request: Request) -> Response:
    job_id = _job_id(request)
    after = _int(request.query_params.get("after"), "after") or 0
    size = _limit(request.query_params.get("limit"), EVENT_PAGE)
    with _ledger(_config(request)) as conn, reader.read_transaction(conn):
        if reader.get_job(conn, job_id) is None:
            raise _Problem(404, f"no job {job_id!r} in the ledger")
        events = reader.job_events(conn, job_id, after=after, limit=size + 1)
        total = int(conn.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0])
    more = len(events) > size
    events = events[:size]
    return _json(
        {
            "now": time.time(),
            "job_id": job_id,
            "events_total": total,
            "after": after,
            "events": [views.event_view(e) for e in events],
            "next": f"/api/jobs/{job_id}/events?after={events[-1]['id']}&limit={size}" if more else None,
        }
    )


def api_daemon(request: Request) -> Response:
    now = time.time()
    with _ledger(_config(request)) as conn:
        return _json({"now": now, "heartbeat": reader.heartbeat(conn, now)})


async def events(request: Request) -> Response:
    cfg = _config(request)
    last = sse.parse_last_event_id(request.headers.get("last-event-id"))
    stop = anyio.Event()
    return EventSourceResponse(
        sse.event_stream(cfg, last, stop),
        ping=cfg.ping_s,
        headers=NO_STORE,
        shutdown_event=stop,
        shutdown_grace_period=sse.SHUTDOWN_GRACE_S,
    )


def video(request: Request) -> Response:
    path = _output_file(request, "output_video")
    download = request.query_params.get("download") == "1"
    return FileResponse(
        path,
        media_type="video/mp4",
        filename=path.name,
        content_disposition_type="attachment" if download else "inline",
    )


def poster(request: Request) -> Response:
    return FileResponse(_output_file(request, "output_poster"), media_type="image/jpeg")


def sidecar(request: Request) -> Response:
    return FileResponse(_output_file(request, "output_json"), media_type="application/json", headers=NO_STORE)


def healthz(request: Request) -> Response:
    cfg = _config(request)
    ledger: dict[str, Any] = {"path": str(cfg.ledger_path)}
    try:
        with _ledger(cfg) as conn:
            ledger |= {"available": True, "last_event_id": reader.last_event_id(conn)}
    except reader.LedgerUnavailable as e:
        ledger |= {"available": False, "reason": e.reason}
    return _json({"status": "ok", "ledger": ledger})


def metrics_page(request: Request) -> Response:
    try:
        with _ledger(_config(request)) as conn:
            text = metrics.render(conn)
    except reader.LedgerUnavailable:
        text = metrics.render(None)
    return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE, headers=NO_STORE)


async def problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _Problem)
    if request.url.path.startswith("/api/"):
        return _json({"error": exc.message}, exc.status)
    return PlainTextResponse(exc.message, status_code=exc.status, headers=NO_STORE)


async def unavailable(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, reader.LedgerUnavailable)
    if request.url.path.startswith("/api/"):
        return _json(views.unavailable_view(str(_config(request).ledger_path), exc.reason, time.time()), 503)
    return PlainTextResponse(
        f"the ledger cannot be read now: {exc.reason}", status_code=503, headers=NO_STORE
    )


GET = ["GET", "HEAD"]
routes = [
    Route("/", index, methods=GET),
    Route("/api/jobs", api_jobs, methods=GET),
    Route("/api/jobs/{job_id}", api_job, methods=GET),
    Route("/api/jobs/{job_id}/events", api_job_events, methods=GET),
    Route("/api/daemon", api_daemon, methods=GET),
    Route("/events", events, methods=GET),
    Route("/jobs/{job_id}", job_page, methods=GET),
    Route("/jobs/{job_id}/video", video, methods=GET),
    Route("/jobs/{job_id}/poster", poster, methods=GET),
    Route("/jobs/{job_id}/json", sidecar, methods=GET),
    Route("/healthz", healthz, methods=GET),
    Route("/metrics", metrics_page, methods=GET),
    Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
]
exception_handlers = {_Problem: problem, reader.LedgerUnavailable: unavailable}


def create_app(cfg: DashboardConfig | Any) -> Starlette:
    """The read-only dashboard for the ledger and outbox named in `cfg`: a `DashboardConfig`, or
    the daemon's `Settings` (daemon/config.py), whose [dashboard] table then applies. The
    endpoints read it from `request.app.state.config` (and the sidecar cache from `.sidecars`)."""
    if not isinstance(cfg, DashboardConfig):
        cfg = from_settings(cfg)
    middleware = [
        Middleware(SecurityHeadersMiddleware),
        Middleware(TrustedHostMiddleware, allowed_hosts=list(cfg.allowed_hosts), www_redirect=False),
        Middleware(ReadOnlyMiddleware),
    ]
    if cfg.token:
        middleware.append(Middleware(TokenMiddleware, token=cfg.token))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=exception_handlers)
    app.state.config = cfg
    app.state.sidecars = sidecars.Sidecars(cfg.outbox)
    return app
