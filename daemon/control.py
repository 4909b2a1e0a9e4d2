"""`cancel`, `retry` and `delete`: requests the ledger's single writer applies.

The commands never write the ledger while a daemon runs: they drop a request file into
`<state_dir>/requests/` (written under a dot-name, then renamed) and wait for the daemon's
answer `<request>.done.json`. When no daemon holds the state-dir lock, the command takes the
lock itself and applies the request with the same code and the same transaction rules.

A request names its job by a reference (`daemon.job_refs`: id, name or unique id prefix); the
answer says which job was meant.

Users of the upload group (who may not enter the state dir) drop cancel requests into
`<inbox>/.control/` instead (`inbox_cancel_requests`; `consume_inbox_requests`): read as hostile
input (regular files only, never through a link, bounded in size and number), cancel only, and
only of jobs that are waiting, queued or waiting for a retry.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.errors import LedgerConflict
from daemon.job_refs import JobRefError, describe_job, resolve
from daemon.ledger import JobRow, Ledger, new_job_id
from daemon.outbox import Outbox, is_same_file, names_job
from daemon.states import ACTIVE, State

logger = logging.getLogger(__name__)

ACTIONS = ("cancel", "retry", "delete")
#: the one action a request from the inbox's control folder may carry (upload-group users)
INBOX_ACTION = "cancel"
#: what a cancel from the inbox's control folder may act on (not running jobs)
INBOX_CANCEL_STATES = tuple(s for s in ACTIVE if s != State.running)
#: internal action name of an inbox cancel (restricted as above)
_INBOX_CANCEL = "inbox-cancel"
INBOX_REQUEST_MAX_BYTES = 1024
#: entries of the control folder looked at per pass (a flood is worked off over several passes)
INBOX_SCAN_LIMIT = 256
INBOX_ANSWER_SUFFIX = ".answer.json"
_INBOX_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\.json")
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_WARNED: set[str] = set()


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    ok: bool
    message: str
    state: str | None = None
    #: the job the request meant (None when the reference matched none or several)
    job_id: str | None = None
    #: "id (name, state)" of each job an ambiguous reference matched
    candidates: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "message": self.message,
            "state": self.state,
            "job_id": self.job_id,
            "candidates": list(self.candidates),
        }


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
    if settings.inbox_cancel_requests:
        done += consume_inbox_requests(settings, apply)
    return done


# ---------------------------------------------------------------------- the inbox's control folder


def write_inbox_request(settings: Settings, ref: str) -> Path:
    """A cancel request in `<inbox>/.control/` (for users of the upload group, who may not enter
    the state dir); returns the path of the answer file the daemon writes."""
    folder = settings.control_dir
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        # the inbox is setgid (its upload group): let every uploader drop requests here
        os.chmod(folder, 0o2770)
    stem = f"{time.time_ns()}-{secrets.token_hex(4)}"
    tmp = folder / f".{stem}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o660)
    os.fchmod(fd, 0o660)  # whatever the umask: the daemon reads it through the group
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"action": INBOX_ACTION, "job": ref}))
    os.replace(tmp, folder / f"{stem}.json")
    return folder / f"{stem}{INBOX_ANSWER_SUFFIX}"


def _read_inbox_request(dir_fd: int, name: str) -> str:
    """The job reference of the request file `name` (in the folder `dir_fd`); raises ValueError
    saying what is wrong. Never follows a link, never blocks on a FIFO, never reads more than
    INBOX_REQUEST_MAX_BYTES, never echoes the file's content."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_nlink != 1:
            raise ValueError("a hard link (a request must be a file of its own)")
        if st.st_size > INBOX_REQUEST_MAX_BYTES:
            raise ValueError(f"larger than {INBOX_REQUEST_MAX_BYTES} bytes")
        raw = os.read(fd, INBOX_REQUEST_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > INBOX_REQUEST_MAX_BYTES:
        raise ValueError(f"larger than {INBOX_REQUEST_MAX_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(
            'not JSON of the form {"action": "cancel", "job": "<id, id prefix or name>"}'
        ) from None
    if not isinstance(doc, dict) or set(doc) - {"action", "job", "at"}:
        raise ValueError('expected {"action": "cancel", "job": "<id, id prefix or name>"}')
    if doc.get("action") != INBOX_ACTION:
        raise ValueError(f"only {INBOX_ACTION!r} may be requested here (retry and delete need an operator)")
    ref = doc.get("job")
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError('"job" must be a job id, id prefix or name')
    return ref


def _write_inbox_answer(dir_fd: int, name: str, outcome: Outcome) -> None:
    """`name` written in the folder `dir_fd` through a fresh file renamed over it: a link an
    uploader put at that name is replaced, never followed."""
    tmp = f".{secrets.token_hex(8)}.answer.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o640, dir_fd=dir_fd)
    os.fchmod(fd, 0o640)  # the asking uploader reads it through the group
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(outcome.to_dict()))
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def consume_inbox_requests(settings: Settings, apply: Callable[[str, str], Outcome]) -> int:
    """Apply the cancel requests of `<inbox>/.control/` (if the folder exists), at most
    INBOX_SCAN_LIMIT entries a pass; each request file is removed and answered in
    `<stem>.answer.json`, readable by the upload group. Returns how many were answered."""
    try:
        dir_fd = os.open(settings.control_dir, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except FileNotFoundError:
        return 0
    except OSError as e:  # a link or a file in its place, or no permission: nothing is read
        why = f"inbox control folder {settings.control_dir} not used: {e.strerror or e}"
        if why not in _WARNED:  # once, not every loop
            _WARNED.add(why)
            logger.warning("%s", why)
        return 0
    done = 0
    now = time.time()
    try:
        names: list[str] = []
        try:
            with os.scandir(dir_fd) as it:
                for _, entry in zip(range(16 * INBOX_SCAN_LIMIT), it, strict=False):
                    # being written (or an answer's temporary file); folders are not requests
                    if not entry.name.startswith(".") and not entry.is_dir(follow_symlinks=False):
                        names.append(entry.name)
                    if len(names) >= INBOX_SCAN_LIMIT:
                        break
        except OSError as e:
            logger.warning("inbox control folder %s cannot be listed: %s", settings.control_dir, e)
        for name in names:
            try:
                if name.endswith(INBOX_ANSWER_SUFFIX):
                    _drop_old_answer(dir_fd, name, now)
                else:
                    done += _answer_one(dir_fd, name, apply)
            except OSError as e:  # one odd entry must not stop the daemon
                logger.warning("inbox control folder: %r: %s", name[:80], e)
    finally:
        os.close(dir_fd)
    return done


def _answer_one(dir_fd: int, name: str, apply: Callable[[str, str], Outcome]) -> int:
    if not _INBOX_NAME.fullmatch(name):
        _unlink_at(dir_fd, name)  # litter: not a request; no answer (its name is not ours to extend)
        logger.warning("inbox control folder: %r is not a request name; removed", name[:80])
        return 0
    try:
        ref = _read_inbox_request(dir_fd, name)
    except (OSError, ValueError) as e:
        outcome = Outcome(ok=False, message=f"bad request {name}: {e}")
    else:
        outcome = apply(_INBOX_CANCEL, ref)
    _unlink_at(dir_fd, name)
    answer = name[: -len(".json")] + INBOX_ANSWER_SUFFIX
    try:
        _write_inbox_answer(dir_fd, answer, outcome)
    except OSError as e:
        logger.warning("inbox control folder: cannot answer %s: %s", name, e)
    logger.info("inbox control request %s: %s", name, outcome.message)
    return 1


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)  # a link itself, never what it points at
    except FileNotFoundError:
        pass


def _drop_old_answer(dir_fd: int, name: str, now: float) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if now - st.st_mtime > 3600:
        _unlink_at(dir_fd, name)


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
    """Apply one request. `job_id`: a job reference (`daemon.job_refs`: id, name or unique id
    prefix). `stop_running` asks the worker to stop a running job (daemon only)."""
    inbox_cancel = action == _INBOX_CANCEL
    if action not in ACTIONS and not inbox_cancel:
        return Outcome(ok=False, message=f"unknown action {action!r}")
    try:
        if inbox_cancel:
            found = resolve(ledger.conn, job_id, action="cancel", states=INBOX_CANCEL_STATES)
        else:
            found = resolve(ledger.conn, job_id, action=action)
    except JobRefError as e:
        return Outcome(ok=False, message=e.message, candidates=tuple(describe_job(j) for j in e.candidates))
    job = found.job
    try:
        if inbox_cancel and job.state not in INBOX_CANCEL_STATES:
            outcome = Outcome(
                ok=False,
                message=f"job {job.id} is {job.state}; a cancel from the inbox's control folder only "
                "stops waiting or queued jobs (ask an operator to cancel a running one)",
                state=job.state,
            )
        elif action in ("cancel", _INBOX_CANCEL):
            outcome = _cancel(settings, ledger, outbox, job, stop_running)
        elif action == "retry":
            outcome = _retry(settings, ledger, job)
        else:
            outcome = _delete(ledger, job)
    except LedgerConflict as e:
        outcome = Outcome(ok=False, message=str(e))
    meant = found.describe(job_id)
    return Outcome(
        ok=outcome.ok,
        message=f"{meant}: {outcome.message}",
        state=outcome.state,
        job_id=job.id,
    )


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
    if job.state in INBOX_CANCEL_STATES:  # no worker to stop
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


def _retry(settings: Settings, ledger: Ledger, job: JobRow) -> Outcome:
    if job.state == "done":
        return _rerender(settings, ledger, job)
    if job.state == "rejected" and job.duplicate_of:
        return Outcome(
            ok=False,
            message=f"job {job.id} was rejected as a duplicate of {job.duplicate_of}; retry that job "
            'to render it again (a new job), or drop this one again with "rerender": true',
            state=job.state,
        )
    if job.state not in ("failed", "cancelled"):
        return Outcome(
            ok=False,
            message=f"job {job.id} is {job.state}; only done, failed or cancelled jobs can be "
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


def _rerender(settings: Settings, ledger: Ledger, job: JobRow) -> Outcome:
    """A done job rendered again: a new job (its own id, ledger row and outputs) from a copy of
    the done job's claimed inputs, with the same resolved settings (seed included), linked by
    `rerender_of`. The done job and its outputs stay as they are."""
    from daemon.intake import copy_inputs, private_dir  # the intake's no-follow copy

    input_dir = Path(job.job_dir) / "input" if job.job_dir else None
    if input_dir is None or not input_dir.is_dir() or not job.spec_json:
        return Outcome(
            ok=False,
            message=f"job {job.id} is done but its claimed inputs are gone (deleted, or removed by "
            'retention after archive_days); drop the job again with "rerender": true to render it again',
            state=job.state,
        )
    new_id = new_job_id()
    new_dir = settings.jobs_dir / new_id
    private_dir(settings.jobs_dir)
    private_dir(new_dir)
    try:
        if not _link_inputs(input_dir, new_dir):
            copy_inputs(input_dir, new_dir)
    except BaseException:
        shutil.rmtree(new_dir, ignore_errors=True)
        raise
    row = ledger.insert_job(
        id=new_id,
        name=job.name,
        source=job.source,
        state="waiting",
        priority=job.priority,
        waiting_reason=f"re-render of {job.id}",
        job_dir=str(new_dir),
        spec_json=job.spec_json,
        input_hashes_json=job.input_hashes_json,
        dedupe_key=job.dedupe_key,
        rerender_of=job.id,
        event_data={"rerender_of": job.id},
    )
    admitted = ledger.admit(row.id, max_queued=settings.max_queued)
    state = admitted.state if admitted is not None else row.state
    return Outcome(
        ok=True,
        message=f"renders again as the new job {row.id} ({state}); job {job.id} and its outputs stay",
        state=state,
        job_id=row.id,
    )


def _link_inputs(src: Path, job_dir: Path) -> bool:
    """`job_dir/input` as hard links to the files of `src` (a done job's claimed inputs: the
    daemon's own private copy, never written again), so a re-render of gigabytes of media does
    not hold up the daemon's loop; False (nothing left behind) where links cannot be made (then
    the caller copies)."""
    partial = job_dir / ".input.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for root, _dirs, files in os.walk(src):
            target = partial / Path(root).relative_to(src)
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                os.link(Path(root) / name, target / name, follow_symlinks=False)
        os.rename(partial, job_dir / "input")
    except OSError as e:
        logger.info("re-render: cannot link the inputs of %s (%s); copying them", src, e)
        shutil.rmtree(partial, ignore_errors=True)
        return False
    return True


def _delete(ledger: Ledger, job: JobRow) -> Outcome:
    if job.state in ACTIVE:
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
