"""Every way a job ends, in one place: published, failed, retried, requeued, cancelled, rejected;
and `recover()`, which finishes whatever a killed daemon left between files and ledger.

Publication, failure and rejection (and intake's claim) are crash-safe protocols of three steps:
the *intent* (the ledger row records what is about to be written, and its `intent` column,
`daemon.states.Intent`, says which protocol runs), the files (outbox links, error JSON, kept
originals, the claimed inputs), then the final write, which clears the intent. A daemon killed
anywhere in between finds the intent again (`recover`):

- `publish`: the staged outputs are linked into the outbox (`Outbox.commit_publication`, which
  undoes itself on error); the job is done. Recovery finishes the link when the staging is
  complete, else it takes back what reached the outbox (only files proven to be the job's own,
  by the identities recorded with the intent) and the job renders again.
- `fail`: the originals are copied to `outbox/failed/<name>/`, then the error JSON written; the
  job is failed. Recovery writes what is missing. A full outbox keeps the job `running` with its
  intent until there is room (`retry_failures`).
- `reject` (intake): the upload is moved to `outbox/failed/<name>/` (intake moves the files, it
  knows where they are), then the error JSON written; the job is rejected. Recovery moves what
  is left and writes what is missing.
- `claim` (intake): the upload is renamed into the state dir and copied to the job's own input
  folder, then its spec stored. Recovery has intake finish the claim (`Uploads.resume_claim`).

`recover()` runs twice over: at start-up, before anything runs, for the `running` rows (publish,
fail); at every intake scan, for the `waiting` rows (claim, reject; intake passes itself as the
`Uploads` that move the files).

Ledgers written by the previous version have no `intent` column values: their rows are read by
the column combination that version used (`_intent`): "running + error_code + output_json": a
failure; "running + output_json": a publication; "waiting + error_code + output_json +
originals": a rejection; "waiting + job_dir, no spec_json, no error_code": a claim.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from daemon import chunk_nodes, failures, version
from daemon.config import Settings
from daemon.errors import JobRejected, is_disk_full
from daemon.ledger import JobRow, Ledger
from daemon.outbox import Outbox, Published, remove_if_same, restore_loose_job_name
from daemon.policy import Failure
from daemon.protocol import Failed, RunOrder
from daemon.states import Intent
from pipeline.av_input import open_input
from pipeline.types import RenderResult

logger = logging.getLogger(__name__)

_NO_OUTPUTS: dict[str, Any] = {
    "output_video": None,
    "output_poster": None,
    "output_json": None,
    "outputs_identity": None,
    "intent": None,
}


class Uploads(Protocol):
    """What recovery needs of intake: the files of an upload are intake's to move."""

    def keep_rejected(self, row: JobRow) -> None:
        """Move what is left of a rejected upload (inbox or state dir) into `row.originals`."""

    def resume_claim(self, row: JobRow) -> None:
        """Finish a claim left halfway (or leave it to the next scan, if its upload is back)."""


class Endings:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        outbox: Outbox,
        *,
        weights_dir: Path | None = None,
        tiny: bool = False,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.outbox = outbox
        #: the model facts every sidecar records
        self.weights_dir = weights_dir or settings.weights_dir
        self.tiny = tiny
        #: failures waiting for room in the outbox: job id -> (code, message, traceback)
        self.failing: dict[str, tuple[str, str, str | None]] = {}

    # ------------------------------------------------------------------ publish

    def publish(
        self,
        row: JobRow,
        order: RunOrder,
        result: RenderResult,
        render_s: float,
        worker_info: dict[str, Any],
    ) -> Failed | None:
        """The render is done: poster, sidecar, the two-phase publication, state done. A
        publication that fails leaves nothing in the outbox and comes back as a `Failed`
        (`disk_full`, transient, or `publish_error`) for the retry policy to judge."""
        poster = order.poster_path if order.poster_path.exists() else None
        if poster is None:
            poster = make_poster(order.out_path, order.poster_path)
        sidecar = self._sidecar(row, result, render_s, worker_info, order.checkpoint_dir.parent)
        try:
            self._publish(row, order, poster, sidecar)
        except OSError as e:  # nothing of it is in the outbox (`commit_publication` undid it)
            self.ledger.set_columns(row.id, **_NO_OUTPUTS)
            full = is_disk_full(e)
            code = "disk_full" if full else "publish_error"
            return Failed(row.id, Failure(code=code, transient=full), f"publishing failed: {e}")
        self._mark_done(row.id, sidecar)
        shutil.rmtree(order.checkpoint_dir, ignore_errors=True)
        chunk_nodes.forget(order.checkpoint_dir.parent)  # it described that checkpoint
        return None

    def _sidecar(
        self,
        row: JobRow,
        result: RenderResult,
        render_s: float,
        worker_info: dict[str, Any],
        job_dir: Path,
    ) -> dict[str, Any]:
        finished = time.time()
        node = str(worker_info.get("node") or socket.gethostname())
        return {
            "job_id": row.id,
            "name": row.name,
            "state": "done",
            "source": row.source,
            "input_hashes": row.input_hashes,
            "settings": row.spec,
            "model": {
                **{k: v for k, v in worker_info.items() if k not in ("pid", "load_s")},
                "worker_pid": worker_info.get("pid"),
                "tiny": self.tiny,
                "weights_dir": str(self.weights_dir),
            },
            "gpu": worker_info.get("gpu"),
            "service": version.describe(),
            "frames": result.num_frames,
            "fps": result.fps,
            "duration_s": result.duration_s,
            "width": result.width,
            "height": result.height,
            "seed": result.seed,
            "attempts": row.attempts,
            "resumed_from_chunk": result.resumed_from_chunk,
            # the node that rendered each chunk (a resumed job: the lost node's chunks, then the
            # resuming node's; daemon/chunk_nodes.py)
            "chunks": chunk_nodes.per_chunk(job_dir, row.num_chunks or 0, node),
            "timings_s": {
                **(result.timings_s or {}),
                "render": render_s,
                "queue_wait": round((row.started_at or finished) - (row.queued_at or row.created_at), 3),
                "total": round(finished - row.created_at, 3),
            },
            "created_at": row.created_at,
            "finished_at": finished,
        }

    def _publish(
        self, row: JobRow, order: RunOrder, poster: Path | None, sidecar: dict[str, Any]
    ) -> Published:
        """Stage, record the intent (names and identities), commit: all of it or none of it.

        A name taken meanwhile by a file that is not ours (FileExistsError) moves on to the next
        free name; any other error propagates with nothing of the job left in the outbox."""
        taken: set[str] = set()
        while True:
            published = self.outbox.stage_publication(
                job_id=row.id,
                name=row.name,
                video=order.out_path,
                poster=poster,
                sidecar=sidecar,
                taken=taken,
            )
            # the intent: a daemon killed from here on completes (or undoes) this at start-up
            self.ledger.set_columns(
                row.id,
                output_video=str(published.video),
                output_json=str(published.sidecar),
                output_poster=str(published.poster) if published.poster else None,
                outputs_identity=published.identity_json(),
                intent=Intent.publish.value,
            )
            try:
                self.outbox.commit_publication(published, staging=order.out_path.parent, job_id=row.id)
            except FileExistsError:
                if len(taken) >= 100:
                    raise
                taken.add(published.base)
                continue
            return published

    def _mark_done(self, job_id: str, sidecar: dict[str, Any]) -> None:
        self.ledger.transition(
            job_id,
            "running",
            "done",
            finished_at=sidecar.get("finished_at") or time.time(),
            progress=1.0,
            stage="done",
            frames=sidecar.get("frames"),
            duration_s=sidecar.get("duration_s"),
            render_s=(sidecar.get("timings_s") or {}).get("render"),
            resumed_from_chunk=sidecar.get("resumed_from_chunk", 0),
            intent=None,
        )
        self.outbox.finish_publication(job_id)

    # ------------------------------------------------------------------ retry, requeue, cancel

    def retry(self, row: JobRow, code: str, message: str, delay_s: float, traceback: str | None) -> None:
        """`running -> retry_wait`: due again in `delay_s` (the loop times it on the monotonic
        clock; `next_attempt_at` is what users see)."""
        self.ledger.transition(
            row.id,
            "running",
            "retry_wait",
            next_attempt_at=time.time() + delay_s,
            error_code=code,
            error_message=message,
            event_data={"delay_s": delay_s, "traceback": traceback},
        )
        logger.warning(
            "job %s (%s) attempt %d failed (%s: %s); retry in %.0f s",
            row.id,
            row.name,
            row.attempts,
            code,
            message,
            delay_s,
        )

    def requeue(self, row: JobRow, why: str) -> None:
        """Running -> queued without counting the attempt (shutdown, not the job's fault)."""
        new = self.ledger.requeue(
            row.id,
            max_queued=self.settings.max_queued,
            reason=why,
            stage="interrupted",
            attempts=max(0, row.attempts - 1),
        )
        logger.info(
            "job %s (%s) %s; %s",
            row.id,
            row.name,
            why,
            "queued again" if new.state == "queued" else "the queue is full: queued again when there is room",
        )

    def cancel(self, row: JobRow) -> None:
        """A running job the user cancelled stopped: `running -> cancelled`."""
        self.ledger.transition(
            row.id,
            "running",
            "cancelled",
            finished_at=time.time(),
            error_code="cancelled",
            error_message="cancelled by the user",
        )

    def stopped(self, row: JobRow, reason: str) -> None:
        """A render stopped on request: cancelled if that was asked, else queued again."""
        if reason == "cancel" or row.cancel_requested:
            self.cancel(row)
        else:
            self.requeue(row, f"stopped ({reason})")

    # ------------------------------------------------------------------ fail

    def fail(self, row: JobRow, code: str, message: str, traceback: str | None = None) -> None:
        """A permanent failure: error JSON, a copy of the inputs under failed/, state failed."""
        try:
            kept = self.outbox.keep_originals(row.name, [])  # reserves failed/<name>[-n]/
        except OSError as e:
            self._fail_later(row, code, message, traceback, e)
            return
        error_path = self.outbox.root / f"{self.outbox.reserve_base(row.name)}.error.json"
        self.ledger.set_columns(
            row.id,
            error_code=code,
            error_message=message,
            output_json=str(error_path),
            originals=str(kept),
            intent=Intent.fail.value,
        )
        self._finish_failure(self.ledger.get(row.id), traceback=traceback)

    def keep_failure_detail(self, failed: Failed, worker_info: dict[str, Any] | None) -> None:
        """The traceback and the worker's last log lines of a failed attempt, bounded, on the
        job's row (daemon/failures.py): shown by the dashboard, copied into the error JSON."""
        row = self.ledger.find(failed.job_id)
        if row is None or row.state != "running":
            return
        found = failures.detail(
            traceback=failed.traceback,
            log_lines=list(failed.log_tail),
            attempt=row.attempts,
            at=time.time(),
            worker=worker_info,
        )
        self.ledger.set_columns(row.id, failure_detail=failures.encode(found))

    def fail_exhausted(self) -> None:
        """Start-up, before the requeue: a job left running whose counted attempts (those before
        the interrupted one) already reach `max_attempts` (the cap was lowered meanwhile) fails
        instead of running once more."""
        cap = self.settings.max_attempts
        for row in self.ledger.jobs(["running"]):
            if row.attempts - 1 >= cap and row.id not in self.failing:
                self.fail(
                    row,
                    code="attempts_exhausted",
                    message=f"gave up after {row.attempts - 1} failed attempts (max_attempts = {cap})",
                )

    def _fail_later(
        self, row: JobRow, code: str, message: str, traceback: str | None, error: OSError
    ) -> None:
        """The outbox is full (or over quota) while a failure is written: the job stays `running`
        with its intent, and `retry_failures` finishes it once there is room again."""
        if not is_disk_full(error):
            raise error
        if row.id not in self.failing:
            logger.error(
                "job %s (%s) failed (%s), but the outbox %s is full (%s): its error JSON and "
                "originals are written when space returns",
                row.id,
                row.name,
                code,
                self.settings.outbox,
                error,
            )
        self.failing[row.id] = (code, message, traceback)

    def retry_failures(self) -> None:
        """Finish failures that waited for room in the outbox (`_fail_later`)."""
        for job_id, (code, message, traceback) in list(self.failing.items()):
            row = self.ledger.get(job_id)
            if row.state != "running":
                self.failing.pop(job_id, None)
                continue
            if _intent(row) is Intent.fail:
                self._finish_failure(row, traceback=traceback)
            else:
                self.fail(row, code, message, traceback)

    def _finish_failure(self, row: JobRow, traceback: str | None = None) -> None:
        try:
            self._write_failure(row)
        except OSError as e:
            self._fail_later(row, str(row.error_code), str(row.error_message), traceback, e)
            return
        self.failing.pop(row.id, None)
        self.ledger.transition(
            row.id,
            "running",
            "failed",
            finished_at=time.time(),
            event_data={"traceback": traceback} if traceback else None,
            intent=None,
        )
        shutil.rmtree(self.outbox.partial / row.id, ignore_errors=True)

    def _write_failure(self, row: JobRow) -> None:
        """The files of a failure: the originals under failed/<name>/, then the error JSON."""
        kept = Path(str(row.originals))
        job_dir = Path(row.job_dir or self.settings.jobs_dir / row.id)
        if (job_dir / "input").is_dir():
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copytree(job_dir / "input", kept, symlinks=True, dirs_exist_ok=True)
            restore_loose_job_name(kept, row.name, row.source)
        self._write_error(
            row,
            "failed",
            kept,
            field=None,
            attempts=row.attempts,
            failure=failures.decode(row.failure_detail),
        )

    def _write_error(self, row: JobRow, state: str, originals: Path, **extra: Any) -> None:
        """The job's `<name>.error.json` at the path its intent reserved, unless written already."""
        error_path = Path(str(row.output_json))
        if not error_path.exists():
            self.outbox.write_error_at(
                error_path,
                error_payload(
                    job_id=row.id,
                    name=row.name,
                    state=state,
                    code=str(row.error_code),
                    message=str(row.error_message),
                    originals=originals,
                    **extra,
                ),
            )

    # ------------------------------------------------------------------ reject

    def reject(self, row: JobRow, rejected: JobRejected, keep: Callable[[JobRow], object]) -> None:
        """An upload that is no valid job (intake): the intent, then `keep(row)` moves the upload
        into `row.originals`, then the error JSON; state rejected."""
        kept = self.outbox.keep_originals(row.name, [])  # reserves failed/<name>[-n]/
        error_path = self.outbox.root / f"{self.outbox.reserve_base(row.name)}.error.json"
        self.ledger.set_columns(
            row.id,
            error_code=rejected.code,
            error_message=rejected.message,
            error_field=rejected.field or None,
            duplicate_of=rejected.duplicate_of,
            output_json=str(error_path),
            originals=str(kept),
            intent=Intent.reject.value,
        )
        keep(self.ledger.get(row.id))
        self._finish_rejection(row.id)

    def _finish_rejection(self, job_id: str) -> None:
        row = self.ledger.get(job_id)
        originals = Path(str(row.originals))
        self._write_error(row, "rejected", originals, field=row.error_field, duplicate_of=row.duplicate_of)
        self.ledger.transition(
            row.id, "waiting", "rejected", finished_at=time.time(), waiting_reason=None, intent=None
        )

    # ------------------------------------------------------------------ recovery

    def recover(self, uploads: Uploads | None = None) -> None:
        """Finish what was left half done, by each row's intent: without `uploads` (start-up,
        before anything runs) the running rows' publications and failures; with them (every
        intake scan) the waiting rows' rejections and claims."""
        for row in self.ledger.jobs(["running"] if uploads is None else ["waiting"]):
            match _intent(row):
                case Intent.fail:
                    self._finish_failure(row)
                case Intent.publish:
                    self._recover_publication(row)
                case Intent.reject if uploads is not None:
                    uploads.keep_rejected(row)
                    self._finish_rejection(row.id)
                case Intent.claim if uploads is not None:
                    uploads.resume_claim(row)

    def _recover_publication(self, row: JobRow) -> None:
        sidecar = self.outbox.staged_sidecar(row.id)
        staging = self.outbox.partial / row.id
        if sidecar is None or not (staging / f"{row.id}.mp4").exists():
            self._forget_publication(row)
            return
        published = Published(
            base=Path(str(row.output_json)).stem,
            video=Path(str(row.output_video)),
            poster=Path(row.output_poster) if row.output_poster else None,
            sidecar=Path(str(row.output_json)),
        )
        try:
            self.outbox.commit_publication(published, staging=staging, job_id=row.id)
        except OSError as e:  # undone by commit_publication: the job renders again
            logger.error("job %s: cannot finish its publication (%s); rendering it again", row.id, e)
            self._forget_publication(row)
            return
        self._mark_done(row.id, sidecar)
        logger.info("job %s (%s): finished a publication interrupted by a restart", row.id, row.name)

    def _forget_publication(self, row: JobRow) -> None:
        """Undo a publication that cannot be finished: unlink whatever of it reached the outbox
        (only files proven to be its own, by the identity recorded with the intent), then clear
        the intent; the job renders again."""
        paths = {"video": row.output_video, "poster": row.output_poster, "sidecar": row.output_json}
        for role, identity in row.identities.items():
            path = paths.get(role)
            if path and remove_if_same(Path(path), identity):
                logger.info("job %s: took back %s of a publication that was not finished", row.id, path)
        self.ledger.set_columns(row.id, **_NO_OUTPUTS)


def _intent(row: JobRow) -> Intent | None:
    """The row's intent; for a row of a ledger written before the `intent` column, the one its
    columns imply (the previous version's rules)."""
    if row.intent:
        return Intent(row.intent)
    if row.state == "running" and row.output_json:
        return Intent.fail if row.error_code else Intent.publish
    if row.state == "waiting" and row.error_code and row.output_json and row.originals:
        return Intent.reject
    if row.state == "waiting" and row.job_dir and not row.spec_json and not row.error_code:
        return Intent.claim
    return None


def error_payload(
    *,
    job_id: str,
    name: str,
    state: str,
    code: str,
    message: str,
    field: str | None,
    originals: Path | None,
    duplicate_of: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The body of `<name>.error.json` (a rejected or a failed job)."""
    payload: dict[str, Any] = {
        "job_id": job_id,
        "name": name,
        "state": state,
        "code": code,
        "message": message,
        "field": field or None,
        "originals": str(originals) if originals else None,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if duplicate_of:
        payload["duplicate_of"] = duplicate_of
    payload.update(extra)
    return payload


def make_poster(video: Path, poster: Path) -> Path | None:
    """A JPEG of the first frame, when the pipeline wrote none."""
    try:
        with open_input(video) as container:
            for frame in container.decode(video=0):
                frame.to_image().convert("RGB").save(poster, "JPEG", quality=90)
                return poster
    except Exception as e:  # noqa: BLE001 - a missing poster is not worth failing a job for
        logger.warning("could not make a poster from %s: %s", video, e)
    return None
