"""The daemon's loop (`Supervisor`) over a `FakePool`: dispatch order, isolation after a crash that
took several jobs, the backoff sequence and requeue on stop, in-process and in milliseconds.

The ledger, outbox, state dir and job files are real (tmp_path); only the render workers are
the test's own: the fake pool records the orders it is given and returns the events the test
queues, as a `WorkerPool` does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings
from daemon.jobs import parse_job
from daemon.ledger import JobRow
from daemon.policy import Failure
from daemon.pool import WorkerState
from daemon.protocol import Event, Failed, Finished, RunOrder, Stopped, WorkerDied
from daemon.supervisor import Supervisor
from pipeline.types import RenderResult
from tests.helpers.media import make_job_bundle

OOM = Failure(code="cuda_oom", transient=True)


class FakePool:
    """A `WorkerPool` of `workers` always-ready workers that render nothing."""

    def __init__(self, workers: int = 1) -> None:
        self.isolated: set[str] = set()
        self.jobs: list[set[str]] = [set() for _ in range(workers)]
        #: (worker, job id) of every `run`, in order
        self.runs: list[tuple[int, str]] = []
        self.orders: dict[str, RunOrder] = {}
        self.stops: list[tuple[str, str]] = []
        self.pending: list[Event] = []

    def start(self) -> None:
        pass

    def free_worker(self) -> int | None:
        return min(range(len(self.jobs)), key=lambda i: (len(self.jobs[i]), i))

    def any_ready(self) -> bool:
        return True

    def run(self, index: int, order: RunOrder) -> None:
        self.jobs[index].add(order.job_id)
        self.runs.append((index, order.job_id))
        self.orders[order.job_id] = order
        order.out_path.parent.mkdir(parents=True, exist_ok=True)
        order.out_path.write_bytes(b"not really a video")
        order.poster_path.write_bytes(b"not really a poster")

    def stop(self, job_id: str, why: str) -> None:
        self.stops.append((job_id, why))

    def wait(self, timeout_s: float, *, restart: bool = True) -> list[Event]:
        events, self.pending = self.pending, []
        for event in events:
            match event:
                case Finished(job_id) | Stopped(job_id) | Failed(job_id):
                    for jobs in self.jobs:
                        jobs.discard(job_id)
                case WorkerDied(worker, job_ids):
                    self.jobs[worker].clear()
                    if len(job_ids) > 1:
                        self.isolated |= set(job_ids)
        return events

    def busy(self) -> bool:
        return any(self.jobs)

    def shutdown(self, timeout_s: float) -> None:
        for job_id in sorted(set().union(*self.jobs)):
            self.pending.append(Stopped(job_id, "shutdown"))

    def kill(self) -> None:
        pass

    def device(self, index: int) -> str:
        return f"fake:{index}"

    def info(self, index: int) -> dict[str, Any]:
        return {"device": f"fake:{index}", "pid": 4242}

    def describe(self) -> list[WorkerState]:
        return [
            WorkerState(index=i, device=f"fake:{i}", pid=4242, alive=True, ready=True, jobs=tuple(j), info={})
            for i, j in enumerate(self.jobs)
        ]

    def reconfigure(self, settings: Settings) -> None:
        pass

    def running(self) -> set[str]:
        return set().union(*self.jobs)


def _result(seed: int = 1) -> RenderResult:
    return RenderResult(
        video_path=Path("x.mp4"),
        poster_path=None,
        num_frames=9,
        fps=25,
        duration_s=0.36,
        width=64,
        height=64,
        seed=seed,
    )


@pytest.fixture
def make_sup(tmp_path: Path) -> Iterator[Any]:
    made: list[Supervisor] = []

    def make(*, workers: int = 1, **settings: Any) -> tuple[Supervisor, FakePool]:
        s = Settings(
            inbox=tmp_path / "inbox",
            outbox=tmp_path / "outbox",
            state_dir=tmp_path / "var",
            weights_dir=tmp_path / "no-weights",
            allow_tiny_model=True,
            tick_s=0.01,
            **settings,
        )
        pool = FakePool(workers)
        sup = Supervisor(s, pool=pool)
        sup.start()
        made.append(sup)
        return sup, pool

    yield make
    for sup in made:
        sup._close()


def queue(sup: Supervisor, name: str, *, priority: int = 0) -> str:
    """A claimed, queued job with real inputs in its job dir (as intake leaves one)."""
    assert sup.ledger is not None
    job_dir = sup.settings.jobs_dir / name
    bundle = make_job_bundle(job_dir / "input", duration_s=0.5, sample_steps=1, seed=len(name))
    spec = parse_job((bundle / "job.json").read_bytes(), base_dir=bundle)
    hashes = {rel: "0" * 64 for rel in spec.media_files}
    row = sup.ledger.insert_job(
        name=name,
        source=str(sup.settings.inbox / name),
        state="queued",
        priority=priority,
        spec_json=spec.to_json(),
        input_hashes_json=json.dumps(hashes),
        job_dir=str(job_dir),
    )
    return row.id


def turns(sup: Supervisor, n: int = 3) -> None:
    for _ in range(n):
        assert sup._turn() is None


def row(sup: Supervisor, job_id: str) -> JobRow:
    assert sup.ledger is not None
    return sup.ledger.get(job_id)


def test_dispatch_runs_by_priority_then_arrival_and_publishes(make_sup: Any) -> None:
    sup, pool = make_sup(max_running=1)
    low = queue(sup, "low")
    first = queue(sup, "first", priority=5)
    second = queue(sup, "second", priority=5)
    for expected in (first, second, low):
        turns(sup)
        assert pool.running() == {expected}  # max_running 1: one at a time
        pool.pending.append(Finished(expected, _result(), 0.5))
        turns(sup)
        assert row(sup, expected).state == "done"
    assert [job for _, job in pool.runs] == [first, second, low]
    done = row(sup, low)
    assert done.output_video and Path(done.output_video).read_bytes() == b"not really a video"
    sidecar = json.loads(Path(str(done.output_json)).read_text())
    assert sidecar["model"]["worker_pid"] == 4242 and sidecar["timings_s"]["render"] == 0.5
    assert done.intent is None


def test_jobs_spread_over_the_workers(make_sup: Any) -> None:
    sup, pool = make_sup(workers=2, max_running=4)
    a, b = queue(sup, "a"), queue(sup, "b")
    turns(sup, 1)
    assert sorted(pool.runs) == [(0, a), (1, b)]


def test_after_a_crash_with_two_jobs_each_runs_alone(make_sup: Any) -> None:
    sup, pool = make_sup(max_running=2, retry_backoff_s=0.0)
    a, b = queue(sup, "a"), queue(sup, "b")
    turns(sup, 1)
    assert pool.running() == {a, b}
    pool.pending.append(WorkerDied(0, (a, b), was_ready=True))
    turns(sup, 1)
    assert {row(sup, a).state, row(sup, b).state} == {"retry_wait"}
    assert row(sup, a).error_code == "worker_crash"
    turns(sup, 3)  # the backoff (0 s) is over: both are queued again, but only one runs
    assert pool.running() == {a}
    assert row(sup, b).state == "queued"
    pool.pending.append(Finished(a, _result(), 0.1))
    turns(sup, 2)
    assert row(sup, a).state == "done" and pool.running() == {b}
    queue(sup, "c")
    turns(sup, 2)
    assert pool.running() == {b}  # an isolated job runs alone: c waits for it
    pool.pending.append(Finished(b, _result(), 0.1))
    turns(sup, 2)
    assert len(pool.running()) == 1 and not pool.isolated


def test_a_crash_of_one_job_isolates_nothing(make_sup: Any) -> None:
    sup, pool = make_sup(max_running=2, retry_backoff_s=0.0)
    a = queue(sup, "a")
    turns(sup, 1)
    pool.pending.append(WorkerDied(0, (a,), was_ready=True))
    turns(sup, 3)
    b = queue(sup, "b")
    turns(sup, 2)
    assert pool.running() == {a, b}


def test_transient_failures_back_off_doubling_then_fail(make_sup: Any) -> None:
    sup, pool = make_sup(max_attempts=4, retry_backoff_s=0.001, retry_backoff_max_s=0.003)
    job = queue(sup, "flaky")
    for _ in range(4):
        for _ in range(200):  # until the backoff (at most 3 ms) is over and it runs again
            turns(sup, 1)
            if pool.running():
                break
        assert pool.running() == {job}
        pool.pending.append(Failed(job, OOM, "OutOfMemoryError: CUDA out of memory", "Traceback ..."))
        turns(sup, 1)
    assert sup.ledger is not None
    delays = [
        json.loads(r[0])["delay_s"]
        for r in sup.ledger.conn.execute(
            "SELECT data_json FROM events WHERE job_id = ? AND kind = 'retry' ORDER BY id", (job,)
        )
    ]
    assert delays == [0.001, 0.002, 0.003]
    failed = row(sup, job)
    assert failed.state == "failed" and failed.error_code == "cuda_oom"
    assert failed.error_message == "OutOfMemoryError: CUDA out of memory (gave up after 4 attempts)"
    error = json.loads(Path(str(failed.output_json)).read_text())
    assert error["code"] == "cuda_oom" and failed.intent is None


def test_a_permanent_failure_fails_at_once(make_sup: Any) -> None:
    sup, pool = make_sup()
    job = queue(sup, "bad")
    turns(sup, 1)
    pool.pending.append(Failed(job, Failure(code="bad_input", transient=False), "ValueError: no"))
    turns(sup, 1)
    assert row(sup, job).state == "failed" and row(sup, job).attempts == 1


def test_a_stopped_job_is_queued_again_without_counting_the_attempt(make_sup: Any) -> None:
    sup, pool = make_sup()
    job = queue(sup, "stopped")
    turns(sup, 1)
    assert row(sup, job).attempts == 1
    pool.pending.append(Stopped(job, "shutdown"))
    turns(sup, 1)
    assert row(sup, job).state == "queued" and row(sup, job).attempts == 0  # the attempt given back
    turns(sup, 1)
    assert pool.runs == [(0, job), (0, job)]
    assert row(sup, job).state == "running" and row(sup, job).attempts == 1


def test_a_cancel_stops_the_render_and_cancels(make_sup: Any) -> None:
    sup, pool = make_sup()
    job = queue(sup, "cancelme")
    turns(sup, 1)
    outcome = sup._apply_request("cancel", job)
    assert pool.stops == [(job, "cancel")], outcome
    pool.pending.append(Stopped(job, "cancel"))
    turns(sup, 1)
    assert row(sup, job).state == "cancelled" and len(pool.runs) == 1


def test_drain_requeues_what_runs(make_sup: Any) -> None:
    sup, pool = make_sup(max_running=2, stop_timeout_s=0.05)
    a, b = queue(sup, "a"), queue(sup, "b")
    turns(sup, 1)
    sup.stop.set()
    assert sup._turn() == 0
    assert sorted(pool.stops) == sorted([(a, "shutdown"), (b, "shutdown")])
    assert {row(sup, a).state, row(sup, b).state} == {"queued"}
    assert row(sup, a).attempts == 0


def test_a_pool_that_gives_up_stops_the_daemon(make_sup: Any) -> None:
    sup, pool = make_sup(retry_backoff_s=0.0)
    job = queue(sup, "a")
    turns(sup, 1)
    pool.pending.append(WorkerDied(0, (job,), was_ready=False, fatal="the model cannot be loaded on fake:0"))
    assert sup._turn() == 1
    assert row(sup, job).state == "retry_wait"
