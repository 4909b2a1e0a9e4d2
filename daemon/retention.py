"""Retention, applied by the daemon: old outputs, old claimed inputs, old ledger rows.

Also notices a published video that someone removed from the outbox by hand: the job is then
shown as deleted (event `deleted`), not as an error.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from daemon.config import RetentionSettings, Settings
from daemon.control import output_replaced_or_gone, remove_outputs
from daemon.ledger import Ledger
from daemon.states import FINAL

logger = logging.getLogger(__name__)

DAY_S = 86400.0


def notice_removed_outputs(ledger: Ledger) -> list[str]:
    """Done jobs whose video is gone from the outbox, or whose video's name now holds another
    file (removed by hand, the name then reused), are marked deleted; returns their ids."""
    gone = []
    for job in ledger.jobs(["done"]):
        why = output_replaced_or_gone(job) if job.deleted_at is None else None
        if why is not None:
            reason = "removed from the outbox by hand" + (
                "" if why == "removed" else "; its name holds another file"
            )
            ledger.mark_deleted(job.id, reason=reason)
            logger.info("job %s (%s): video %s", job.id, job.name, reason)
            gone.append(job.id)
    return gone


def apply_retention(settings: Settings, ledger: Ledger, *, now: float | None = None) -> dict[str, int]:
    """Apply the [retention] settings once; returns how many outputs, inputs and rows went."""
    r: RetentionSettings = settings.retention
    now = time.time() if now is None else now
    counts = {"outputs": 0, "archives": 0, "rows": 0, "progress": 0}
    final = ledger.jobs(FINAL)
    if r.outputs_days > 0:
        cutoff = now - r.outputs_days * DAY_S
        for job in final:
            if (
                job.deleted_at is None
                and (job.finished_at or now) < cutoff
                and (job.output_video or job.output_json)
            ):
                remove_outputs(job)
                ledger.mark_deleted(job.id, reason=f"retention: older than {r.outputs_days:g} days")
                counts["outputs"] += 1
    if r.archive_days > 0:
        cutoff = now - r.archive_days * DAY_S
        for job in final:
            if job.job_dir and (job.finished_at or now) < cutoff and Path(job.job_dir).is_dir():
                shutil.rmtree(job.job_dir, ignore_errors=True)
                counts["archives"] += 1
    if r.ledger_days > 0:
        counts["rows"] = ledger.purge_finished_before(now - r.ledger_days * DAY_S)
    if r.progress_events_days > 0:  # only useful while a job runs; opt-in, the table is append-only
        counts["progress"] = ledger.prune_progress_events(now - r.progress_events_days * DAY_S)
    if any(counts.values()):
        logger.info(
            "retention: %d outputs, %d claimed inputs, %d ledger rows, %d progress events removed",
            counts["outputs"],
            counts["archives"],
            counts["rows"],
            counts["progress"],
        )
    return counts
