"""Which job a command means: `cancel`, `retry` and `delete` take a job reference.

A reference is, in this order:

1. a full job id (12 hex characters);
2. a job's name: for `cancel`, the newest job of that name still waiting, queued, waiting for a
   retry or running; for `retry` and `delete`, the newest job of that name;
3. a unique prefix of a job id, at least `MIN_PREFIX` characters.

A reference that matches more than one job (a prefix shared by several ids, or a name of one job
that is also the prefix of another's id) is ambiguous: nothing is done and the candidates are
listed.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from daemon.ledger import JobRow

MIN_PREFIX = 4
MAX_REF_CHARS = 256
#: what `cancel` may act on when it picks a job by name
ACTIVE_STATES = ("waiting", "queued", "retry_wait", "running")
_HEX = frozenset("0123456789abcdef")
_MAX_CANDIDATES = 20


class JobRefError(LookupError):
    """No job, or more than one, for a reference; `candidates` lists the ambiguous matches."""

    def __init__(self, message: str, candidates: tuple[JobRow, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.candidates = candidates


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    job: JobRow
    #: how the reference matched: "id", "name" or "prefix"
    how: str

    def describe(self, ref: str) -> str:
        """One line naming the job meant, e.g. `'anna' is job 3f2a9c1d0b7e (anna, queued)`."""
        via = {"id": "", "name": " (newest of that name)", "prefix": " (id prefix)"}[self.how]
        return f"{ref!r}{via} is job {self.job.id} ({self.job.name}, {self.job.state})"


def describe_job(job: JobRow) -> str:
    return f"{job.id} ({job.name}, {job.state})"


def _rows(conn: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> list[JobRow]:
    conn.row_factory = sqlite3.Row
    return [JobRow.from_row(r) for r in conn.execute(sql, args).fetchall()]


def resolve(
    conn: sqlite3.Connection, ref: str, *, action: str, states: tuple[str, ...] = ACTIVE_STATES
) -> Resolved:
    """The job `ref` means for `action` ("cancel", "retry", "delete"); raises `JobRefError`.
    `states`: the states a name may pick for `cancel` (newest job of the name in one of them)."""
    if not isinstance(ref, str) or not ref.strip():
        raise JobRefError("no job given (a job id, an id prefix or a job name)")
    if len(ref) > MAX_REF_CHARS or "\x00" in ref:
        raise JobRefError(f"not a job reference: {ref[:40]!r}... (at most {MAX_REF_CHARS} characters)")
    exact = _rows(conn, "SELECT * FROM jobs WHERE id = ?", (ref,))
    if exact:
        return Resolved(job=exact[0], how="id")

    named = _rows(conn, "SELECT * FROM jobs WHERE name = ? ORDER BY seq DESC", (ref,))
    by_name: JobRow | None = None
    name_problem = None
    if action == "cancel":
        by_name = next((j for j in named if j.state in states), None)
        if named and by_name is None:
            name_problem = (
                f"no job named {ref!r} is {', '.join(states[:-1])} or {states[-1]} "
                f"(its newest job is {describe_job(named[0])})"
            )
    elif named:
        by_name = named[0]

    prefix = ref.lower()
    by_prefix: list[JobRow] = []
    if len(prefix) >= MIN_PREFIX and set(prefix) <= _HEX:
        by_prefix = _rows(
            conn,
            "SELECT * FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY seq DESC LIMIT ?",
            (len(prefix), prefix, _MAX_CANDIDATES + 1),
        )

    candidates = ([by_name] if by_name else []) + [
        j for j in by_prefix if by_name is None or j.id != by_name.id
    ]
    if len(candidates) > 1:
        shown = candidates[:_MAX_CANDIDATES]
        more = " and more" if len(candidates) > _MAX_CANDIDATES else ""
        raise JobRefError(
            f"{ref!r} is ambiguous: it matches {len(shown)}{more} jobs: "
            + "; ".join(describe_job(j) for j in shown)
            + ". Give more of the id.",
            tuple(shown),
        )
    if by_name is not None:
        return Resolved(job=by_name, how="name")
    if by_prefix:
        return Resolved(job=by_prefix[0], how="prefix")
    if name_problem:
        raise JobRefError(name_problem)
    hint = (
        f" (an id prefix needs at least {MIN_PREFIX} characters)"
        if len(prefix) < MIN_PREFIX and set(prefix) <= _HEX
        else ""
    )
    raise JobRefError(f"no job with id, id prefix or name {ref!r}{hint}")
