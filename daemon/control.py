"""`cancel`, `retry` and `delete`: requests the ledger's single writer applies.

The commands never write the ledger while a daemon runs: they drop a request file into
`<state_dir>/requests/` (written under a dot-name, then renamed) and wait for the daemon's
answer `<request>.done.json`. When no daemon holds the state-dir lock, the command takes the
lock itself and applies the request with the same code and the same transaction rules.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.errors import LedgerConflict
from daemon.ledger import JobRow, Ledger
from daemon.outbox import Outbox, is_same_file, names_job

logger = logging.getLogger(__name__)

ACTIONS = ("cancel", "retry", "delete")


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    ok: bool
    message: str
    state: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "message": self.message, "state": self.state}


def write_request(settings: Settings, action: str, job_id: str) -> Path:
    """Drop a request for the daemon; returns the path of the answer file to wait for."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
    folder = settings.requests_dir
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{time.time_ns()}-{secrets.token_hex(3)}"
    tmp = folder / f".{stem}.tmp"
    tmp.write_text(json.dumps({"action": action, "job_id": job_id, "at": time.time()}))
    os.replace(tmp, folder / f"{stem}.json")
    return folder / f"{stem}.done.json"


def pending_requests(settings: Settings) -> list[Path]:
    folder = settings.requests_dir
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.glob("*.json") if not p.name.endswith(".done.json") and not p.name.startswith(".")
    )


def consume_requests(settings: Settings, apply: Callable[[str, str], Outcome]) -> int:
    """Apply every pending request, writing each answer next to it; returns how many ran."""
    done = 0
    for path in pending_requests(settings):
        try:
            request = json.loads(path.read_text())
            outcome = apply(str(request["action"]), str(request["job_id"]))
        except (ValueError, KeyError, TypeError) as e:
            outcome = Outcome(ok=False, message=f"bad request {path.name}: {e}")
        answer = path.with_name(path.name[:-5] + ".done.json")
        tmp = path.with_name(f".{answer.name}.tmp")
        tmp.write_text(json.dumps(outcome.to_dict()))
        os.replace(tmp, answer)
        path.unlink(missing_ok=True)
        done += 1
    # answers nobody collected are removed after an hour
    for old in settings.requests_dir.glob("*.done.json") if settings.requests_dir.is_dir() else []:
        if time.time() - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    return done


@dataclass(frozen=True, slots=True, kw_only=True)
class Removal:
    #: the job's own output files, unlinked
    removed: tuple[str, ...]
    #: files at the job's output names that are not (or no longer provably) the job's: kept
    kept: tuple[str, ...]


def _outputs(job: JobRow) -> list[tuple[str, str]]:
    """(role, path) of every output the ledger names for `job`."""
    roles = (("video", job.output_video), ("poster", job.output_poster), ("sidecar", job.output_json))
    return [(role, path) for role, path in roles if path]


def owns_output(job: JobRow, role: str, path: str, *, check_hash: bool = True) -> bool:
    """Whether the file at `path` is provably `job`'s output `role` (video, poster, sidecar).

    With the identity recorded at publication: the same device, inode, size and mtime (and, with
    `check_hash`, sha256). Without one (an error JSON, or a job published before identities were
    recorded): a JSON file must name the job; a video or poster must be listed by the job's own
    sidecar, still in place. Anything else (a name freed by hand and taken by a newer job) is not
    the job's."""
    identity = job.identities.get(role)
    if identity:
        return is_same_file(Path(path), identity, check_hash=check_hash)
    if role == "sidecar":
        return names_job(Path(path), job.id)
    return (
        Path(path).is_file()
        and not Path(path).is_symlink()
        and bool(job.output_json)
        and names_job(Path(str(job.output_json)), job.id, listing=Path(path))
    )


def output_replaced_or_gone(job: JobRow) -> str | None:
    """Why a done job's video is no longer in the outbox ("removed", "replaced"), else None
    (a cheap check: no hashing)."""
    if not job.output_video:
        return None
    if not os.path.lexists(job.output_video):
        return "removed"
    if not owns_output(job, "video", job.output_video, check_hash=False):
        return "replaced"
    return None


def remove_outputs(job: JobRow) -> Removal:
    """Unlink the job's outputs, only those proven to be its own (`owns_output`): a file that took
    one of its names later (a newer job's, after the old files were removed by hand) is kept."""
    # decide for every file first: a legacy video is proven by the sidecar, removed last
    verdicts = [(path, owns_output(job, role, path)) for role, path in _outputs(job) if os.path.lexists(path)]
    removed, kept = [], []
    for path, ours in verdicts:
        if ours:
            Path(path).unlink(missing_ok=True)
            removed.append(path)
        else:
            kept.append(path)
            logger.warning("job %s: %s is not this job's file (replaced since); left alone", job.id, path)
    return Removal(removed=tuple(removed), kept=tuple(kept))


def apply_request(
    settings: Settings,
    ledger: Ledger,
    outbox: Outbox,
    action: str,
    job_id: str,
    *,
    stop_running: Callable[[str], None] | None = None,
) -> Outcome:
    """Apply one request. `stop_running` asks the worker to stop a running job (daemon only)."""
    job = ledger.find(job_id)
    if job is None:
        return Outcome(ok=False, message=f"no job with id {job_id!r}")
    try:
        if action == "cancel":
            return _cancel(settings, ledger, outbox, job, stop_running)
        if action == "retry":
            return _retry(ledger, job)
        if action == "delete":
            return _delete(ledger, job)
    except LedgerConflict as e:
        return Outcome(ok=False, message=str(e))
    return Outcome(ok=False, message=f"unknown action {action!r}")


def _cancel(
    settings: Settings,
    ledger: Ledger,
    outbox: Outbox,
    job: JobRow,
    stop_running: Callable[[str], None] | None,
) -> Outcome:
    now = time.time()
    if job.state == "running":
        if stop_running is not None:
            ledger.request_cancel(job.id)
            stop_running(job.id)
            return Outcome(ok=True, message=f"job {job.id} stops at the next step boundary", state="running")
        row = ledger.transition(
            job.id,
            "running",
            "cancelled",
            finished_at=now,
            error_code="cancelled",
            error_message="cancelled by the user",
        )
        return Outcome(ok=True, message=f"job {job.id} cancelled", state=row.state)
    if job.state == "waiting" and not job.job_dir:
        source = Path(job.source)
        kept = None
        if source.exists():
            items = [(source, source.name, True)]
            kept = outbox.keep_originals(job.name, items)
        row = ledger.transition(
            job.id,
            "waiting",
            "cancelled",
            finished_at=now,
            error_code="cancelled",
            error_message="cancelled by the user" + (f"; files kept in {kept}" if kept else ""),
        )
        return Outcome(ok=True, message=f"job {job.id} cancelled", state=row.state)
    if job.state in ("waiting", "queued", "retry_wait"):
        row = ledger.transition(
            job.id,
            job.state,
            "cancelled",
            finished_at=now,
            error_code="cancelled",
            error_message="cancelled by the user",
        )
        return Outcome(ok=True, message=f"job {job.id} cancelled", state=row.state)
    return Outcome(
        ok=False,
        message=f"job {job.id} is {job.state}; only waiting, queued, retry_wait or "
        "running jobs can be cancelled",
        state=job.state,
    )


def _retry(ledger: Ledger, job: JobRow) -> Outcome:
    if job.state not in ("failed", "cancelled"):
        return Outcome(
            ok=False,
            message=f"job {job.id} is {job.state}; only failed or cancelled jobs can be "
            "retried (a rejected job must be fixed and dropped again)",
            state=job.state,
        )
    if not job.job_dir or not (Path(job.job_dir) / "input").is_dir() or not job.spec_json:
        return Outcome(
            ok=False,
            message=f"job {job.id} has no claimed inputs left to retry with "
            "(never taken from the inbox, or removed by retention)",
            state=job.state,
        )
    if (
        job.output_json
        and job.output_json.endswith(".error.json")
        and names_job(Path(job.output_json), job.id)
    ):
        Path(job.output_json).unlink(missing_ok=True)  # it no longer describes the job
    row = ledger.transition(
        job.id,
        job.state,
        "retry_wait",
        attempts=0,
        next_attempt_at=time.time(),
        finished_at=None,
        cancel_requested=0,
        output_json=None,
        event_data={"reason": "retry requested"},
    )
    return Outcome(ok=True, message=f"job {job.id} will be queued again", state=row.state)


def _delete(ledger: Ledger, job: JobRow) -> Outcome:
    if job.state in ("waiting", "queued", "running", "retry_wait"):
        return Outcome(
            ok=False, message=f"job {job.id} is {job.state}; cancel it before deleting", state=job.state
        )
    if job.deleted_at is not None:
        return Outcome(ok=True, message=f"job {job.id}'s outputs were already deleted", state=job.state)
    removal = remove_outputs(job)
    if job.job_dir and Path(job.job_dir).is_dir():
        shutil.rmtree(job.job_dir, ignore_errors=True)
    ledger.mark_deleted(job.id, reason="deleted by the user")
    kept = (
        f"; left {len(removal.kept)} file(s) alone that are not provably this job's (the name was "
        "taken again after its files were removed by hand): " + ", ".join(Path(p).name for p in removal.kept)
        if removal.kept
        else ""
    )
    return Outcome(
        ok=True,
        message=f"job {job.id}: removed {len(removal.removed)} output file(s){kept}; its history is kept",
        state=job.state,
    )
