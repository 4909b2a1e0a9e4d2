"""daemon/states.py enforced by the ledger on real SQLite: every edge of `EDGES` works, every other
pair raises `IllegalTransition` and writes nothing, and each committed state change logs one line."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import deque
from itertools import product
from pathlib import Path

import pytest

from daemon.errors import IllegalTransition, LedgerConflict
from daemon.ledger import Ledger, events_after
from daemon.states import EDGES, EVENT_OF, INITIAL, STATES, State

#: the transitions the daemon's code takes today (intake, supervisor, control, ledger.requeue...):
#: written out here so that dropping one from `EDGES` fails this test, not a daemon in production
TAKEN = {
    ("waiting", "queued"),  # admit
    ("waiting", "rejected"),  # intake rejection
    ("waiting", "cancelled"),  # upload removed, or `cancel`
    ("queued", "running"),  # claim_next
    ("queued", "cancelled"),  # `cancel`
    ("running", "done"),  # publication
    ("running", "failed"),  # permanent failure
    ("running", "retry_wait"),  # transient failure, or requeue with the queue full
    ("running", "queued"),  # requeue (daemon stopped, restarted)
    ("running", "cancelled"),  # `cancel` of a running job
    ("retry_wait", "queued"),  # requeue_due_retries
    ("retry_wait", "cancelled"),  # `cancel`
    ("retry_wait", "failed"),  # gives up while waiting (tests/dashboard/test_browser.py)
    ("failed", "retry_wait"),  # `retry`
    ("cancelled", "retry_wait"),  # `retry`
}


@pytest.fixture()
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite3")


def _path_to(state: State) -> list[State]:
    """The shortest walk over `EDGES` from a state a new row may start in to `state`."""
    paths = deque([s] for s in INITIAL)
    while paths:
        path = paths.popleft()
        if path[-1] == state:
            return path
        paths.extend(path + [n] for n in sorted(EDGES[path[-1]]) if n not in path)
    raise AssertionError(f"{state} cannot be reached from {INITIAL}")


def _job_in(ledger: Ledger, state: State) -> str:
    first, *rest = _path_to(state)
    job = ledger.insert_job(name=f"in-{state}", source=f"/in/{state}", state=first).id
    for old, new in zip([first, *rest], rest, strict=False):
        ledger.transition(job, old, new)
    assert ledger.get(job).state == state
    return job


def test_every_transition_the_code_takes_is_an_edge() -> None:
    legal = {(old, new) for old, news in EDGES.items() for new in news}
    assert legal == TAKEN
    assert set(EDGES) == set(STATES) == set(EVENT_OF)


@pytest.mark.parametrize(("old", "new"), sorted(TAKEN))
def test_every_edge_works_through_the_ledger_and_writes_its_event(ledger: Ledger, old: str, new: str) -> None:
    job = _job_in(ledger, State(old))
    row = ledger.transition(job, old, new)
    assert row.state == new == ledger.get(job).state
    assert events_after(ledger.conn)[-1]["kind"] == EVENT_OF[State(new)]


@pytest.mark.parametrize(("old", "new"), [(o, n) for o, n in product(STATES, STATES) if (o, n) not in TAKEN])
def test_an_illegal_transition_raises_and_changes_nothing(ledger: Ledger, old: State, new: State) -> None:
    job = _job_in(ledger, old)
    before = (ledger.get(job), len(events_after(ledger.conn)))
    with pytest.raises(IllegalTransition, match=f"job {job}: {old} -> {new} is not a legal transition"):
        ledger.transition(job, old, new, error_code="x")
    assert (ledger.get(job), len(events_after(ledger.conn))) == before
    assert not ledger.conn.in_transaction


def test_every_expected_state_must_have_the_edge(ledger: Ledger) -> None:
    """`expected` lists the states a caller accepts: each must lead to `new`, not just the actual one."""
    job = _job_in(ledger, State.queued)
    with pytest.raises(IllegalTransition, match="done -> running") as caught:
        ledger.transition(job, ("queued", "done"), "running")
    assert (caught.value.job_id, caught.value.old, caught.value.new) == (job, "done", "running")
    assert caught.value.allowed == ()
    assert ledger.get(job).state == "queued"
    with pytest.raises(ValueError, match="unknown state 'finished'"):
        ledger.transition(job, "queued", "finished")
    with pytest.raises(ValueError, match="unknown state 'ready'"):
        ledger.transition(job, "ready", "running")


def test_a_legal_edge_from_another_state_is_still_a_conflict(ledger: Ledger) -> None:
    job = _job_in(ledger, State.queued)
    with pytest.raises(LedgerConflict, match="expected state running, found queued"):
        ledger.transition(job, "running", "done")


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "daemon.ledger"]


def test_each_committed_state_change_logs_one_line(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # the lines of the set-up (queued, running) are not this test's
    row = ledger.insert_job(
        name="alice", source="/in/alice", state="waiting", waiting_reason="checking upload"
    )
    j = row.id
    ledger.set_waiting_reason(j, "incomplete")  # no state change: no line
    ledger.admit(j, max_queued=10)
    ledger.claim_next(max_running=1)
    ledger.update_progress(j, progress=0.5, chunk=1, num_chunks=2, step=1, num_steps=4, stage="denoise")
    ledger.transition(j, "running", "retry_wait", error_code="cuda_oom", error_message="CUDA out of memory")
    ledger.requeue_due_retries(max_queued=10, job_ids=[j])
    ledger.claim_next(max_running=1)
    ledger.transition(j, "running", "failed", error_code="render_error", error_message="boom")
    ledger.transition(j, ("failed", "cancelled"), "retry_wait", error_code=None)
    assert _lines(caplog) == [
        ("INFO", f'job {j} "alice" waiting: checking upload'),
        ("INFO", f'job {j} "alice" waiting -> queued'),
        ("INFO", f'job {j} "alice" queued -> running: attempt 1'),
        ("WARNING", f'job {j} "alice" running -> retry_wait: cuda_oom: CUDA out of memory'),
        ("INFO", f'job {j} "alice" retry_wait -> queued'),
        ("INFO", f'job {j} "alice" queued -> running: attempt 2'),
        ("ERROR", f'job {j} "alice" running -> failed: render_error: boom'),
        ("WARNING", f'job {j} "alice" failed -> retry_wait'),  # the old state read back when several
    ]


def test_no_line_for_a_change_that_was_not_committed(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    job = _job_in(ledger, State.queued)
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # the lines of the set-up (queued, running) are not this test's
    with pytest.raises(LedgerConflict):
        ledger.transition(job, "running", "done")
    with pytest.raises(RuntimeError, match="rolled back"), ledger.tx():
        ledger.transition(job, "queued", "running")
        raise RuntimeError("rolled back")
    assert ledger.get(job).state == "queued"
    assert _lines(caplog) == []
    with ledger.tx():  # nested writes log once, when the outer transaction commits
        ledger.transition(job, "queued", "running")
        assert _lines(caplog) == []
    assert [m for _, m in _lines(caplog)] == [f'job {job} "in-queued" queued -> running: attempt 0']


def test_a_process_without_logging_set_up_prints_no_state_lines(tmp_path: Path) -> None:
    """The CLI applies `retry`/`cancel` itself while the daemon is stopped and sets up no logging:
    the ledger's warning and error lines must not reach its stderr through `logging.lastResort`."""
    code = (
        "import sys; from pathlib import Path; from daemon.ledger import Ledger\n"
        "led = Ledger(Path(sys.argv[1]))\n"
        "job = led.insert_job(name='a', source='/in/a', state='rejected', error_code='bad', error_message='x').id\n"
        "led.insert_job(name='b', source='/in/b', state='queued')\n"
        "led.claim_next(max_running=1)\n"
        "print(led.transition(led.jobs(['running'])[0].id, 'running', 'failed', error_code='e').state)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ledger.sqlite3")],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (result.stdout, result.stderr) == ("failed\n", "")
