"""The job states, their legal edges, the event each state change writes, and the crash intents.

Stdlib only: imported by the ledger, the endings, control, logs and the dashboard (which serves the
lists in `/api/jobs`, so the browser code hard-codes none of them). Adding a state costs one enum
member, its `EDGES` row, its `EVENT_OF` entry and the code that enters it.

    waiting ──▶ queued ──▶ running ──▶ done
       │          │           ├──▶ retry_wait ──▶ queued        (transient failure, backoff)
       │          │           ├──▶ queued                        (daemon stopped or died mid-render)
       │          │           ├──▶ failed                        (permanent, or attempts used up)
       ▼          ▼           ▼
    rejected   cancelled   cancelled
                                       failed / cancelled ──▶ retry_wait (the `retry` command)

Also: a waiting or retry_wait job can be cancelled, and a retry_wait one can fail for good. A done
job is never moved again: `retry` (or `"rerender": true`) renders it again as a new job.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    waiting = "waiting"  #: in the inbox: incomplete, being checked, or no room in the queue
    queued = "queued"  #: claimed and admitted, waiting for a worker
    running = "running"  #: a worker renders it
    retry_wait = "retry_wait"  #: a transient failure (or a full queue on requeue): due again later
    done = "done"  #: published to the outbox
    failed = "failed"  #: a permanent failure, or its attempts used up
    rejected = "rejected"  #: the upload was not a valid job (never queued)
    cancelled = "cancelled"  #: cancelled by an operator, or its upload removed while it waited


#: every state, in the order the dashboard and `status` list them
STATES: tuple[State, ...] = tuple(State)

#: the legal transitions; the ledger raises `IllegalTransition` on any other
EDGES: dict[State, frozenset[State]] = {
    State.waiting: frozenset({State.queued, State.rejected, State.cancelled}),
    State.queued: frozenset({State.running, State.cancelled}),
    State.running: frozenset({State.done, State.failed, State.retry_wait, State.queued, State.cancelled}),
    State.retry_wait: frozenset({State.queued, State.cancelled, State.failed}),
    State.done: frozenset(),
    State.failed: frozenset({State.retry_wait}),
    State.rejected: frozenset(),
    State.cancelled: frozenset({State.retry_wait}),
}
#: the states a new row may start in (`Ledger.insert_job`)
INITIAL: tuple[State, ...] = (State.waiting, State.queued, State.rejected)

#: states a job can still leave
ACTIVE: tuple[State, ...] = (State.waiting, State.queued, State.running, State.retry_wait)
#: states a job stays in (until `retry`)
FINAL: tuple[State, ...] = (State.done, State.failed, State.rejected, State.cancelled)
#: the final states without a video: the dashboard's problem list; their sidecar is the error JSON
PROBLEM: tuple[State, ...] = (State.failed, State.rejected, State.cancelled)

#: the event kind each state change writes
EVENT_OF: dict[State, str] = {
    State.waiting: "waiting",
    State.queued: "queued",
    State.running: "started",
    State.retry_wait: "retry",
    State.done: "done",
    State.failed: "failed",
    State.rejected: "rejected",
    State.cancelled: "cancelled",
}
#: every event kind the events table holds (state changes, plus the ones that are not)
EVENT_KINDS: tuple[str, ...] = (
    "created",
    *EVENT_OF.values(),
    "progress",
    "deleted",
    "daemon",
)


class Intent(StrEnum):
    """What a crash may leave half done: set in the first ledger write of a protocol ("intent →
    move files → transition") and cleared by its final transition, so one `recover()` at start
    knows what to finish from the column alone."""

    claim = "claim"  #: the upload is being moved into the state dir
    reject = "reject"  #: the rejection's error file and moved upload are being written
    publish = "publish"  #: the outputs are being linked into the outbox
    fail = "fail"  #: the failure's error file is being written
