"""The daemon's main loop: intake, admission, dispatch to the workers, and the events they send.

The loop reads typed events from a `WorkerPool` (daemon/pool.py: the render workers; it starts,
restarts and isolates them) and routes each to `Endings` (daemon/endings.py: every way a job
ends) through the `RetryPolicy` (daemon/policy.py); it keeps signals, SIGHUP, the status text,
disk-full waiting and `--once`.

One thread owns the ledger's write connection. Signal handlers only set flags:

- SIGTERM / SIGINT: stop. Running jobs stop at the next step boundary and go back to `queued`
  (the interrupted attempt is not counted; their chunk checkpoints stay), then exit 0. A second
  signal stops at once (the worker is killed, jobs are requeued the same way).
- SIGHUP: re-read the config file: caps, timings, retention and `[defaults]` change live, jobs
  are kept; path and model settings need a restart (logged).

Start-up: take the state-dir lock (a second daemon refuses to start), migrate the ledger, put
jobs left `running` by a dead daemon back to `queued` (they resume from their last finished
chunk; the interrupted attempt is not counted, and one already past `max_attempts` fails), clean `outbox/.partial/`, start the worker (it loads the model once), READY=1.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import control, heartbeat, retention, webhooks
from daemon.cluster import make_pool
from daemon.config import ConfigError, Settings, load_settings
from daemon.endings import Endings
from daemon.errors import DaemonLocked, FolderUnusable, LedgerConflict, LedgerLost, StateDirFull
from daemon.inbox import Watcher
from daemon.intake import Intake, claimed_inputs
from daemon.jobs import JobSpec
from daemon.ledger import JobRow, Ledger
from daemon.ledger import is_disk_full as _is_disk_full
from daemon.outbox import Outbox
from daemon.policy import Failure, GiveUp, Retry, RetryPolicy
from daemon.pool import WorkerPool
from daemon.protocol import Event, Failed, Finished, Progressed, Ready, RunOrder, Stopped, WorkerDied
from daemon.runner import WorkerConfig
from daemon.sdnotify import Notifier
from daemon.space import SpaceWait
from daemon.weights_guard import choose_weights
from pipeline.types import Progress, RenderResult

logger = logging.getLogger(__name__)

#: how often the main loop checks that the ledger's path still names the open ledger file
LEDGER_CHECK_S = 1.0


#: settings a SIGHUP cannot change: they take effect after a restart
RESTART_KEYS = (
    "inbox",
    "outbox",
    "state_dir",
    "weights_dir",
    "device",
    "dtype",
    "quant",
    "lora",
    "lora_scale",
    "attention",
    "notify",  # the webhook senders start with the daemon
    "cluster",  # the executor and its actors start with the daemon
)

#: the state dir's lock: an flock on the directory itself; this file only says who holds it
PID_FILE = "daemon.lock"


def acquire_lock(state_dir: Path) -> int:
    """Hold the state directory locked (flock on an fd of the directory itself) for the life of
    the process; raise DaemonLocked if another process has it. No path inside the state dir can
    be unlinked to break the lock: a directory that holds files cannot be removed, and one that
    is renamed away takes its lock with it. `daemon.lock` only records the holder's pid.

    On a filesystem that cannot lock a directory (NFS turns flock into a POSIX lock, which needs
    a file open for writing) `daemon.lock` itself is locked instead, with a warning."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd, on_dir = _open_locked(state_dir, exclusive=True)
    except BlockingIOError:
        try:
            other = (state_dir / PID_FILE).read_text()[:32].strip() or "?"
        except OSError:
            other = "?"
        raise DaemonLocked(
            f"another infinitetalk daemon (pid {other}) is using the state dir {state_dir}; "
            "stop it first (only one daemon may run per state dir)"
        ) from None
    except OSError as e:
        raise FolderUnusable("state dir", state_dir, e.strerror or str(e)) from e
    try:
        if on_dir:
            tmp = state_dir / f".{PID_FILE}.{os.getpid()}"
            tmp.write_text(f"{os.getpid()}\n")
            os.replace(tmp, state_dir / PID_FILE)
        else:  # the locked file itself: rewritten in place, never replaced
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        if not _is_disk_full(e):  # a full state dir is no reason not to start (writes wait)
            os.close(fd)
            raise FolderUnusable("state dir", state_dir, e.strerror or str(e)) from e
    return fd


def _open_locked(state_dir: Path, *, exclusive: bool) -> tuple[int, bool]:
    """An fd holding the state-dir lock and whether it is the directory's (else `daemon.lock`'s);
    BlockingIOError when someone else holds it."""
    how = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, how)
        return fd, True
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError as e:
        os.close(fd)
        if exclusive:
            logger.warning(
                "cannot lock the state dir %s itself (%s); locking %s instead: do not delete it",
                state_dir,
                e.strerror or e,
                state_dir / PID_FILE,
            )
    flags = os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY
    fd = os.open(state_dir / PID_FILE, flags, 0o644)
    try:
        fcntl.flock(fd, how)
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def lock_is_held(state_dir: Path) -> bool:
    """True while a daemon holds the state-dir lock (used by the commands)."""
    try:
        fd, _ = _open_locked(state_dir, exclusive=False)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    os.close(fd)
    return False


def check_writable(what: str, folder: Path) -> None:
    """Create `folder` if needed and prove it writable (create and remove a file), else raise
    FolderUnusable with one clear reason (read-only file system, permission denied, ...)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as e:
        if not _is_disk_full(e):  # full, not unwritable: the daemon waits for space
            raise FolderUnusable(what, folder, e.strerror or str(e)) from e


def gpu_count(environ: dict[str, str] | None = None) -> int:
    """Visible NVIDIA GPUs, without importing torch: $CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def worker_devices(settings: Settings) -> list[str]:
    """One render worker per entry: `devices` if set, every visible GPU for device = auto, else `device`."""
    if settings.devices:
        return list(settings.devices)
    if settings.device == "auto":
        n = gpu_count()
        if n >= 2:
            return [f"cuda:{i}" for i in range(n)]
    return [settings.device]


def open_ledger(settings: Settings, on_full: Callable[[BaseException, int], None]) -> Ledger:
    """The ledger, migrated and proven writable; `on_full` is its disk-full hook."""
    s = settings
    check_ledger_present(s)
    try:
        ledger = Ledger(s.ledger_path)
        ledger.probe_write()
    except sqlite3.OperationalError as e:
        if _is_disk_full(e) or "readonly" not in str(e) and "unable to open" not in str(e):
            raise
        raise FolderUnusable("ledger", s.ledger_path, str(e)) from e
    ledger.on_full = on_full
    return ledger


def check_ledger_present(s: Settings) -> None:
    """A missing ledger is created afresh, unless the state dir still holds claimed jobs: a new
    ledger would not know them (their inputs and publications would be orphaned)."""
    if s.ledger_path.exists() or not s.jobs_dir.is_dir():
        return
    claimed = sorted(p.name for p in s.jobs_dir.iterdir())
    if not claimed:
        return
    rescued = sorted(s.state_dir.glob(f"{s.ledger_path.name}.rescued-*"))
    fix = (
        f"restore the copy the daemon saved when it lost the ledger: mv {rescued[-1]} {s.ledger_path}"
        if rescued
        else f"restore the ledger from a backup, or move {s.jobs_dir} aside to start with an empty one"
    )
    raise LedgerLost(
        f"the ledger {s.ledger_path} is missing but {s.jobs_dir} holds {len(claimed)} claimed "
        f"job(s) ({', '.join(claimed[:3])}{', ...' if len(claimed) > 3 else ''}); a new ledger would "
        f"orphan them: {fix}"
    )


def check_ledger_file(s: Settings, ledger: Ledger) -> None:
    """The ledger's path must keep naming the file the daemon has open (`Ledger.check_file`);
    deleted or replaced, the daemon saves what it has and stops (`LedgerLost`)."""
    try:
        ledger.check_file()
    except LedgerLost as e:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            saved = ledger.rescue(s.state_dir / f"{s.ledger_path.name}.rescued-{stamp}")
        except (OSError, sqlite3.Error) as err:
            raise LedgerLost(f"{e}; could not save a copy of it ({err}); stopping") from None
        raise LedgerLost(
            f"{e}; stopped without writing more. Its content is saved as {saved}; to go on from "
            f"there: mv {saved} {s.ledger_path}, then start the daemon again"
        ) from None


def choose_model(s: Settings) -> tuple[Path, bool]:
    """The weights folder the workers load, and whether it is the tiny random-weight model."""
    folder, tiny = choose_weights(
        s.weights_dir, allow_tiny=s.allow_tiny_model, tiny_dir=s.tiny_weights_dir, loras=s.lora
    )
    if folder == s.weights_dir:
        return folder, tiny
    logger.warning(
        "weights_dir %s holds no weights: using a TINY RANDOM-WEIGHT model in %s (its videos are "
        "noise; put the released weights in %s for real renders)",
        s.weights_dir,
        s.tiny_weights_dir,
        s.weights_dir,
    )
    return s.tiny_weights_dir, True


def worker_config(s: Settings, weights_dir: Path, *, tiny: bool, factory: str) -> WorkerConfig:
    """The render workers' config (`LocalPool` sets each one's device)."""
    return WorkerConfig(
        weights_dir=weights_dir,
        device=s.device,
        dtype=s.dtype,
        quant=s.quant,
        lora=s.lora,
        lora_scale=s.lora_scale,
        attention=s.attention,
        perf=tuple(dataclasses.asdict(s.performance).items()),
        warmup=s.performance.warmup,
        max_running=s.max_running,
        factory=factory,
        log_level=s.log_level,
        write_tiny=tiny,
        heartbeat_s=min(2.0, s.worker_stall_s / 4),
    )


class RetryTimer:
    """When each `retry_wait` job is due, on the monotonic clock (a wall clock set back a day must
    not make a retry wait a day). A retry this daemon did not time itself (set before a restart,
    by the `retry` command, or by a requeue into a full queue) is due at its ledger time
    `next_attempt_at`, but never later than one backoff from now."""

    def __init__(self) -> None:
        #: retry_wait job id -> monotonic time its retry is due
        self.due: dict[str, float] = {}

    def start(self, job_id: str, delay_s: float) -> None:
        self.due[job_id] = time.monotonic() + delay_s

    def requeue_due(self, ledger: Ledger, policy: RetryPolicy, max_queued: int) -> None:
        """`retry_wait -> queued` for the jobs whose backoff has run out."""
        waiting = ledger.jobs(["retry_wait"])
        if not waiting and not self.due:
            return
        now, wall = time.monotonic(), time.time()
        known = {row.id for row in waiting}
        for job_id in [j for j in self.due if j not in known]:
            del self.due[job_id]
        due: list[str] = []
        for row in waiting:
            at = self.due.get(row.id)
            if at is None:
                left = (row.next_attempt_at or 0.0) - wall
                at = self.due[row.id] = now + min(max(0.0, left), policy.delay_s(row.attempts))
            if at <= now:
                due.append(row.id)
        if due:
            for row in ledger.requeue_due_retries(max_queued=max_queued, job_ids=due):
                self.due.pop(row.id, None)


@dataclass(slots=True)
class Running:
    job_id: str
    name: str
    order: RunOrder
    worker: int = 0
    last_write: float = 0.0
    progress: Progress | None = None


def run_order(settings: Settings, outbox: Outbox, row: JobRow) -> RunOrder:
    """What the worker needs to render a claimed job: its request and where to write."""
    job_dir = Path(row.job_dir or settings.jobs_dir / row.id)
    spec = JobSpec.from_dict(row.spec)
    staging = outbox.staging_dir(row.id)
    return RunOrder(
        job_id=row.id,
        request=spec.to_request(job_dir / "input"),
        out_path=staging / f"{row.id}.mp4",
        poster_path=staging / f"{row.id}.jpg",
        checkpoint_dir=job_dir / "checkpoint",
        attempt=row.attempts,
        inputs=claimed_inputs(row.input_hashes_json, job_dir / "input"),
    )


def status_text(c: dict[str, int], s: Settings, running: list[Running], *, loading: bool) -> str:
    """The daemon's one-line status (systemd STATUS=): counts, caps, the first renders' places."""
    text = (
        f"{c['running']} running, {c['queued']} queued, {c['waiting']} waiting, {c['done']} done, "
        f"{c['failed']} failed (caps {s.max_queued} queued / {s.max_running} running)"
    )
    if loading:
        text = "loading the model; " + text
    for run in running[:3]:
        p = run.progress
        if p is not None:
            text += f"; {run.name} chunk {p.chunk}/{p.num_chunks} step {p.step}/{p.num_steps}"
    return text


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        notifier: Notifier | None = None,
        config_path: Path | None = None,
        once: bool = False,
        pipeline_factory: str = "",
        pool: WorkerPool | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notifier = notifier or Notifier.from_env()
        self.once = once
        self.pipeline_factory = pipeline_factory
        self.stop = threading.Event()
        self.force = threading.Event()
        self.reload = threading.Event()
        self.wake = threading.Event()
        self.running: dict[str, Running] = {}
        self.retries = RetryTimer()
        self.policy = RetryPolicy.from_settings(settings)
        self.lock_fd: int | None = None
        self.ledger: Ledger | None = None
        self.outbox = Outbox(settings.outbox)
        #: the render workers; None: a `LocalPool` over `worker_devices`, made at start
        self.pool: WorkerPool | None = pool
        self.endings: Endings | None = None
        self.last_status = ""
        self.space = SpaceWait(settings, self.notifier, self.stop, self.force)
        self.weights_dir = settings.weights_dir
        self.tiny = False
        self.intake: Intake | None = None
        self.watcher: Watcher | None = None
        #: monotonic time of the last `_check_ledger_file`
        self.ledger_checked = 0.0
        #: the ledger's `heartbeat` row, rewritten every couple of seconds (daemon/heartbeat.py)
        self.heartbeat = heartbeat.Heartbeat()
        #: POSTs to [notify] webhook_urls when a job ends, from threads of its own (daemon/webhooks.py)
        self.webhooks: webhooks.Webhooks | None = None
        #: the first READY=1 was sent
        self.ready_sent = False
        #: monotonic times of the last inbox scan and the last retention pass
        self.last_scan = 0.0
        self.last_housekeeping = 0.0

    # ------------------------------------------------------------------ signals

    def install_signals(self) -> None:
        def on_stop(signum: int, frame: Any) -> None:
            if self.stop.is_set():
                self.force.set()
            self.stop.set()
            self.wake.set()

        def on_hup(signum: int, frame: Any) -> None:
            self.reload.set()
            self.wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    # ------------------------------------------------------------------ start-up

    def start(self) -> None:
        s = self.settings
        # no weights and no allow_tiny_model: WeightsMissing (exit 78) before anything is touched
        self.weights_dir, self.tiny = choose_model(s)
        self.lock_fd = acquire_lock(s.state_dir)
        check_writable("state dir", s.state_dir)
        check_writable("state dir", s.jobs_dir)
        check_writable("outbox", s.outbox)
        try:
            s.inbox.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FolderUnusable("inbox", s.inbox, e.strerror or str(e)) from e
        self.ledger = open_ledger(s, self.space.wait_for_space)
        self.webhooks = webhooks.Webhooks(s.notify, self.ledger)  # before anything can end a job
        self.outbox.ensure()
        self.endings = Endings(s, self.ledger, self.outbox, weights_dir=self.weights_dir, tiny=self.tiny)
        self.endings.recover()
        self.outbox.clean_staging()
        self.endings.fail_exhausted()
        # a kill of the daemon (kill -9, power cut, watchdog) is not the job's fault: the attempt
        # it interrupted is given back; only a render worker dying under the job counts
        recovered = self.ledger.recover_running(
            max_queued=s.max_queued, give_back_attempt=True, exclude=self.endings.failing
        )
        for row in recovered:
            logger.info(
                "job %s (%s) was running when the daemon stopped; queued again (resumes from its "
                "last finished chunk)",
                row.id,
                row.name,
            )
        self.ledger.daemon_event("started", pid=os.getpid(), recovered=[r.id for r in recovered])
        self.intake = Intake(s, self.ledger, self.outbox, endings=self.endings)
        self.intake.wake_later = self.wake.set
        self.watcher = Watcher(s.inbox, self.wake)
        self.watcher.start()
        if self.pool is None:
            config = worker_config(s, self.weights_dir, tiny=self.tiny, factory=self.pipeline_factory)
            self.pool = make_pool(s, worker_devices(s), config, self.wake)
        self.pool.start()

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        self.started_wall = time.time()
        self.start()
        self.wake.set()
        try:
            while (code := self._turn()) is None:
                pass
            return code
        except StateDirFull as e:
            logger.error("%s; jobs still running are queued again at the next start", e)
            return 0
        finally:
            self._close()

    def _turn(self) -> int | None:
        """One pass of the main loop; the exit status once the daemon stops, else None."""
        assert self.ledger is not None and self.intake is not None and self.pool is not None
        self.space.returned()
        if (now := time.monotonic()) - self.ledger_checked >= LEDGER_CHECK_S:
            self.ledger_checked = now
            check_ledger_file(self.settings, self.ledger)
        if self.force.is_set():
            self._force_stop()
            return 0
        if self.stop.is_set():
            code = self._drain()
            return self._once_status() if self.once else code
        if self.reload.is_set():
            self.reload.clear()
            self._reload()
        self._scan_if_due()
        control.consume_requests(self.settings, self._apply_request)
        self.retries.requeue_due(self.ledger, self.policy, self.settings.max_queued)
        self.intake.admit_claimed()
        if self.pool.any_ready():
            self._announce_ready()
            self._dispatch()
        self._housekeeping()
        if self.once and self._once_done():
            self.stop.set()
            return None
        for event in self.pool.wait(self.settings.tick_s):
            if (status := self._route(event)) is not None:
                return status
        return None

    def _scan_if_due(self) -> None:
        assert self.watcher is not None and self.endings is not None
        if self.watcher.overflowed.is_set():
            self.watcher.overflowed.clear()
            logger.warning("inotify queue overflowed: rescanning the inbox")
        if not self.watcher.alive() and self.settings.inbox.is_dir():
            self.watcher.restart()
        now = time.monotonic()
        if self.wake.is_set() or now - self.last_scan >= self._scan_period():
            self.wake.clear()
            self.last_scan = now
            assert self.intake is not None and self.ledger is not None
            self.space.scan(self.intake, self.ledger)
            self.endings.retry_failures()

    def _announce_ready(self) -> None:
        """The first time a worker is ready: log it and tell systemd (READY=1)."""
        assert self.pool is not None
        if self.ready_sent:
            return
        self.ready_sent = True
        index = self.pool.free_worker()
        info = self.pool.info(index) if index is not None else {}
        self.wake.set()
        logger.info("model ready (%s, load %.1f s); rendering", info.get("device"), info.get("load_s", 0.0))
        self.notifier.ready(self.status_text())

    def _housekeeping(self) -> None:
        assert self.ledger is not None and self.webhooks is not None
        now = time.monotonic()
        if now - self.last_housekeeping >= self.settings.rescan_s:
            self.last_housekeeping = now
            retention.notice_removed_outputs(self.ledger)
            retention.apply_retention(self.settings, self.ledger)
        self._status()
        self.heartbeat.beat_if_due(self)
        self.webhooks.tick()
        self.notifier.ping_if_due()

    def _route(self, event: Event) -> int | None:
        """One event of the pool; an exit status when the daemon must give up."""
        assert self.ledger is not None and self.endings is not None and self.pool is not None
        match event:
            case Progressed(job_id, progress):
                self._progress(job_id, progress)
            case Finished(job_id, result, render_s):
                self._finished(job_id, result, render_s)
            case Stopped(job_id, reason):
                self.running.pop(job_id, None)
                self.endings.stopped(self.ledger.get(job_id), reason)
            case Failed(job_id):
                run = self.running.get(job_id)
                info = self.pool.info(run.worker) if run is not None else None
                self.endings.keep_failure_detail(event, info)
                self._failed(event)
            case WorkerDied(worker, job_ids, _, fatal, code, why):
                for job_id in job_ids:
                    self._failed(Failed(job_id, Failure(code=code, transient=True), why))
                if fatal:
                    logger.error("giving up: %s (%s)", fatal, self.pool.device(worker))
                    return 1
            case Ready():
                self.wake.set()
        return None

    def _scan_period(self) -> float:
        assert self.ledger is not None
        if self.ledger.counts()["waiting"]:
            return min(self.settings.rescan_s, max(0.2, self.settings.settle_s / 2))
        return self.settings.rescan_s

    def _once_status(self) -> int:
        """`--once` exit status: 1 if a job of this run failed or was rejected, else 0."""
        assert self.ledger is not None
        bad = [
            j for j in self.ledger.jobs(["failed", "rejected"]) if (j.finished_at or 0) >= self.started_wall
        ]
        for job in bad:
            logger.error("job %s (%s) %s: %s", job.id, job.name, job.state, job.error_message)
        return 1 if bad else 0

    def _once_done(self) -> bool:
        """`--once`: exit when something was rendered and nothing is left to do."""
        assert self.ledger is not None
        counts = self.ledger.counts()
        busy = counts["waiting"] + counts["queued"] + counts["running"] + counts["retry_wait"]
        return busy == 0 and counts["done"] + counts["failed"] + counts["rejected"] > 0 and not self.running

    # ------------------------------------------------------------------ dispatch and results

    def _dispatch(self) -> None:
        """Start queued jobs while there is room. A job that was running when the worker died
        alongside others runs alone next time, so an innocent job is not failed by a poison one."""
        assert self.ledger is not None and self.pool is not None and self.endings is not None
        isolated = self._isolated()
        while (index := self.pool.free_worker()) is not None:
            if isolated & set(self.running):
                return
            upcoming = self.ledger.next_queued()
            if upcoming is None or (upcoming.id in isolated and self.running):
                return
            row = self.ledger.claim_next(max_running=self.settings.max_running, job_id=upcoming.id)
            if row is None:
                return
            try:
                order = run_order(self.settings, self.outbox, row)
            except Exception as e:  # noqa: BLE001 - a stored job that cannot be rebuilt fails, the daemon goes on
                self.endings.fail(row, "bad_input", f"cannot prepare the job: {type(e).__name__}: {e}")
                continue
            self.running[row.id] = Running(job_id=row.id, name=row.name, order=order, worker=index)
            self.pool.run(index, order)
            logger.info(
                "job %s (%s) started on %s, attempt %d",
                row.id,
                row.name,
                self.pool.device(index),
                row.attempts,
            )

    def _isolated(self) -> set[str]:
        """The pool's isolation set, less the jobs that ended meanwhile."""
        assert self.ledger is not None and self.pool is not None
        for job_id in list(self.pool.isolated):
            row = self.ledger.find(job_id)
            if row is None or row.state in ("done", "failed", "rejected", "cancelled"):
                self.pool.isolated.discard(job_id)
        return self.pool.isolated

    def _progress(self, job_id: str, p: Progress) -> None:
        assert self.ledger is not None
        run = self.running.get(job_id)
        if run is None:
            return
        run.progress = p
        now = time.monotonic()
        if now - run.last_write < 1.0 and p.stage != "done":
            return
        run.last_write = now
        try:
            self.ledger.update_progress(
                job_id,
                progress=p.fraction,
                chunk=p.chunk,
                num_chunks=p.num_chunks,
                step=p.step,
                num_steps=p.num_steps,
                stage=p.stage,
            )
        except (sqlite3.OperationalError, OSError) as e:
            if not _is_disk_full(e):
                raise
            # progress is best effort: a full state dir must not stop a render that is under way
            logger.warning(
                "job %s: progress not recorded, state dir %s is full", job_id, self.settings.state_dir
            )

    def _finished(self, job_id: str, result: RenderResult, render_s: float) -> None:
        assert self.ledger is not None and self.endings is not None and self.pool is not None
        run = self.running.pop(job_id, None)
        row = self.ledger.get(job_id)
        info = self.pool.info(run.worker) if run is not None else {}
        order = run.order if run else run_order(self.settings, self.outbox, row)
        failed = self.endings.publish(row, order, result, render_s, info)
        if failed is not None:
            self._failed(failed)
        else:
            self.wake.set()

    def _failed(self, failed: Failed) -> None:
        """A failed attempt: retried after a backoff, or failed for good (`RetryPolicy`)."""
        assert self.ledger is not None and self.endings is not None
        self.running.pop(failed.job_id, None)
        row = self.ledger.get(failed.job_id)
        if row.state != "running":
            return
        code = failed.failure.code
        match self.policy.decide(failed.failure, row.attempts, failed.message):
            case Retry(delay_s):
                self.endings.retry(row, code, failed.message, delay_s, failed.traceback)
                self.retries.start(row.id, delay_s)
            case GiveUp(message):
                self.endings.fail(row, code, message, traceback=failed.traceback)

    # ------------------------------------------------------------------ requests, reload, status

    def _apply_request(self, action: str, job_id: str) -> control.Outcome:
        assert self.ledger is not None and self.pool is not None
        pool = self.pool

        def stop_running(jid: str) -> None:
            pool.stop(jid, "cancel")

        outcome = control.apply_request(
            self.settings, self.ledger, self.outbox, action, job_id, stop_running=stop_running
        )
        logger.info("request %s %s: %s", action, job_id, outcome.message)
        return outcome

    def _reload(self) -> None:
        self.notifier.reloading("reloading the config")
        try:
            new = load_settings(self.config_path)
        except ConfigError as e:
            logger.error("SIGHUP: config not reloaded, the config in effect stays: %s", e)
            self.notifier.ready(self.status_text())
            return
        restart_keys = [k for k in RESTART_KEYS if getattr(new, k) != getattr(self.settings, k)]
        if restart_keys:
            logger.warning("SIGHUP: %s changed; these take effect after a restart", ", ".join(restart_keys))
            new = dataclasses.replace(new, **{k: getattr(self.settings, k) for k in restart_keys})
        self.settings = new
        self.policy = RetryPolicy.from_settings(new)
        assert self.intake is not None and self.endings is not None and self.pool is not None
        self.intake.reconfigure(new)
        self.endings.settings = new
        self.space.settings = new
        self.pool.reconfigure(new)
        logger.info(
            "SIGHUP: config reloaded (max_queued %d, max_running %d)", new.max_queued, new.max_running
        )
        assert self.ledger is not None
        self.ledger.daemon_event("config reloaded", max_queued=new.max_queued, max_running=new.max_running)
        self.notifier.ready(self.status_text())

    def status_text(self) -> str:
        assert self.ledger is not None
        loading = self.pool is None or not self.pool.any_ready()
        return status_text(self.ledger.counts(), self.settings, list(self.running.values()), loading=loading)

    def _status(self) -> None:
        text = self.status_text()
        if text != self.last_status:
            self.last_status = text
            self.notifier.status(text)

    # ------------------------------------------------------------------ stopping

    def _drain(self) -> int:
        """SIGTERM: running jobs stop at a step boundary and go back to queued; exit 0."""
        assert self.ledger is not None and self.pool is not None and self.webhooks is not None
        s = self.settings
        logger.info("stopping: %d running job(s) stop at the next step boundary", len(self.running))
        self.notifier.stopping(f"stopping; {len(self.running)} job(s) finishing their current step")
        self.notifier.extend_timeout(s.stop_timeout_s + 30)
        for job_id in list(self.running):
            self.pool.stop(job_id, "shutdown")
        deadline = time.monotonic() + s.stop_timeout_s
        while self.running and time.monotonic() < deadline and not self.force.is_set():
            if not self.pool.busy():
                break
            for event in self.pool.wait(0.2, restart=False):
                if not isinstance(event, WorkerDied):  # the jobs of a worker gone are requeued below
                    self._route(event)
            self.notifier.ping_if_due()
            self.heartbeat.beat_if_due(self)
            self.webhooks.tick()
        self._force_stop()
        return 0

    def _force_stop(self) -> None:
        assert self.ledger is not None and self.endings is not None
        if self.pool is not None:
            self.pool.shutdown(timeout_s=2.0 if not self.force.is_set() else 0.1)
        for job_id in list(self.running):
            self.running.pop(job_id)
            try:
                self.endings.requeue(self.ledger.get(job_id), "stopped (daemon shutting down)")
            except LedgerConflict:
                pass
        self.heartbeat.beat(self, state="stopped")
        self.ledger.daemon_event("stopped", pid=os.getpid())
        logger.info("daemon stopped")

    def _close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.intake is not None:
            self.intake.close()
        if self.pool is not None:
            self.pool.kill()
        if self.webhooks is not None and self.ledger is not None:
            try:
                self.webhooks.tick()  # the endings of the drain, and attempts that came back
                self.webhooks.close()
            except sqlite3.Error as e:
                logger.warning("webhooks: %s", e)
        if self.ledger is not None:
            self.ledger.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
