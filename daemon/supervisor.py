"""The daemon's main loop: intake, admission, dispatch to the worker, progress, results, recovery.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import control, failures, heartbeat, retention, version, webhooks
from daemon.config import ConfigError, Settings, load_settings
from daemon.errors import DaemonLocked, FolderUnusable, LedgerConflict, LedgerLost, StateDirFull
from daemon.inbox import Watcher
from daemon.intake import Intake, claimed_inputs, error_payload
from daemon.jobs import JobSpec
from daemon.ledger import JobRow, Ledger
from daemon.ledger import is_disk_full as _is_disk_full
from daemon.outbox import Outbox, Published, remove_if_same, restore_loose_job_name
from daemon.runner import RunOrder, WorkerConfig
from daemon.sdnotify import Notifier
from daemon.weights_guard import choose_weights, has_weights
from daemon.worker import WorkerHandle

logger = logging.getLogger(__name__)

#: a worker that dies this many times in a row before it is ready makes the daemon give up
MAX_START_FAILURES = 3
#: how often the main loop checks that the ledger's path still names the open ledger file
LEDGER_CHECK_S = 1.0


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


def backoff_s(settings: Settings, attempts: int) -> float:
    return float(min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2 ** max(0, attempts - 1)))


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


@dataclass(slots=True)
class Running:
    job_id: str
    name: str
    order: RunOrder
    worker: int = 0
    last_write: float = 0.0
    progress: dict[str, Any] = field(default_factory=dict)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        notifier: Notifier | None = None,
        config_path: Path | None = None,
        once: bool = False,
        pipeline_factory: str = "",
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
        #: jobs that were running together when the worker died: each runs alone until it ends
        self.isolate: set[str] = set()
        #: retry_wait job id -> monotonic time its retry is due (backoff never follows the wall clock)
        self.retry_due: dict[str, float] = {}
        self.lock_fd: int | None = None
        self.ledger: Ledger | None = None
        self.outbox = Outbox(settings.outbox)
        self.devices: list[str] = worker_devices(settings)
        self.workers: list[WorkerHandle | None] = [None] * len(self.devices)
        self.fatal: dict[int, str] = {}
        self.start_failures = 0
        self.last_status = ""
        #: monotonic time intake was last reported paused because the state dir is full (0: not paused)
        self.intake_paused_logged = 0.0
        #: monotonic time a ledger write started waiting for space in the state dir (0: not waiting)
        self.full_since = 0.0
        self.weights_dir = settings.weights_dir
        self.tiny = False
        self.intake: Intake | None = None
        self.watcher: Watcher | None = None
        #: monotonic time of the last `_check_ledger_file`
        self.ledger_checked = 0.0
        #: failures waiting for room in the outbox: job id -> (code, message, traceback)
        self.failing: dict[str, tuple[str, str, str | None]] = {}
        #: the ledger's `heartbeat` row, rewritten every couple of seconds (daemon/heartbeat.py)
        self.heartbeat = heartbeat.Heartbeat()
        #: POSTs to [notify] webhook_urls when a job ends, from threads of its own (daemon/webhooks.py)
        self.webhooks: webhooks.Webhooks | None = None

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
        self.weights_dir, self.tiny = self._choose_weights()
        self.lock_fd = acquire_lock(s.state_dir)
        check_writable("state dir", s.state_dir)
        check_writable("state dir", s.jobs_dir)
        check_writable("outbox", s.outbox)
        try:
            s.inbox.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FolderUnusable("inbox", s.inbox, e.strerror or str(e)) from e
        self._check_ledger_present()
        try:
            self.ledger = Ledger(s.ledger_path)
            self.ledger.probe_write()
        except sqlite3.OperationalError as e:
            if _is_disk_full(e) or "readonly" not in str(e) and "unable to open" not in str(e):
                raise
            raise FolderUnusable("ledger", s.ledger_path, str(e)) from e
        self.ledger.on_full = self._wait_for_space
        self.webhooks = webhooks.Webhooks(s.notify, self.ledger)  # before anything can end a job
        self.outbox.ensure()
        self._recover_interrupted_endings()
        self.outbox.clean_staging()
        self._fail_exhausted_running()
        # a kill of the daemon (kill -9, power cut, watchdog) is not the job's fault: the attempt
        # it interrupted is given back; only a render worker dying under the job counts
        recovered = self.ledger.recover_running(
            max_queued=s.max_queued, give_back_attempt=True, exclude=self.failing
        )
        for row in recovered:
            logger.info(
                "job %s (%s) was running when the daemon stopped; queued again (resumes from its "
                "last finished chunk)",
                row.id,
                row.name,
            )
        self.ledger.daemon_event("started", pid=os.getpid(), recovered=[r.id for r in recovered])
        self.intake = Intake(s, self.ledger, self.outbox)
        self.intake.wake_later = self.wake.set
        self.watcher = Watcher(s.inbox, self.wake)
        self.watcher.start()
        self._start_worker(0)  # the others start once weights exist (the first may write tiny ones)
        self._start_more_workers()

    def _check_ledger_present(self) -> None:
        """A missing ledger is created afresh, unless the state dir still holds claimed jobs: a new
        ledger would not know them (their inputs and publications would be orphaned)."""
        s = self.settings
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

    def _check_ledger_file(self) -> None:
        """The ledger's path must keep naming the file the daemon has open (`Ledger.check_file`);
        deleted or replaced, the daemon saves what it has and stops (`LedgerLost`)."""
        assert self.ledger is not None
        now = time.monotonic()
        if now - self.ledger_checked < LEDGER_CHECK_S:
            return
        self.ledger_checked = now
        try:
            self.ledger.check_file()
        except LedgerLost as e:
            s = self.settings
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            try:
                saved = self.ledger.rescue(s.state_dir / f"{s.ledger_path.name}.rescued-{stamp}")
            except (OSError, sqlite3.Error) as err:
                raise LedgerLost(f"{e}; could not save a copy of it ({err}); stopping") from None
            raise LedgerLost(
                f"{e}; stopped without writing more. Its content is saved as {saved}; to go on from "
                f"there: mv {saved} {s.ledger_path}, then start the daemon again"
            ) from None

    def _choose_weights(self) -> tuple[Path, bool]:
        s = self.settings
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

    def _start_more_workers(self) -> None:
        if not has_weights(self.weights_dir):
            return
        for index, worker in enumerate(self.workers):
            if worker is None:
                self._start_worker(index)

    def _start_worker(self, index: int) -> None:
        s = self.settings
        config = WorkerConfig(
            weights_dir=self.weights_dir,
            device=self.devices[index],
            dtype=s.dtype,
            quant=s.quant,
            lora=s.lora,
            lora_scale=s.lora_scale,
            attention=s.attention,
            perf=tuple(dataclasses.asdict(s.performance).items()),
            warmup=s.performance.warmup,
            max_running=s.max_running,
            factory=self.pipeline_factory,
            log_level=s.log_level,
            write_tiny=self.tiny and not has_weights(self.weights_dir),
            heartbeat_s=min(2.0, s.worker_stall_s / 4),
        )
        worker = WorkerHandle(config)
        worker.start()
        self.workers[index] = worker

    def _live_workers(self) -> list[tuple[int, WorkerHandle]]:
        return [(i, w) for i, w in enumerate(self.workers) if w is not None]

    def _ready_worker(self) -> tuple[int, WorkerHandle] | None:
        """The ready worker with the fewest jobs (jobs spread across GPUs)."""
        ready = [(len(w.jobs), i, w) for i, w in self._live_workers() if w.ready and w.alive()]
        if not ready:
            return None
        _, index, worker = min(ready, key=lambda t: (t[0], t[1]))
        return index, worker

    def _wait_workers(self, timeout_s: float) -> None:
        from multiprocessing.connection import wait

        conns = [w.conn for _, w in self._live_workers() if w.conn is not None]
        if conns:
            try:
                wait(conns, timeout_s)
            except OSError:
                time.sleep(timeout_s)
        else:
            self.wake.wait(timeout_s)

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        self.started_wall = time.time()
        self.start()
        assert self.ledger is not None and self.intake is not None and self.watcher is not None
        last_scan = 0.0
        last_housekeeping = 0.0
        ready_sent = False
        self.wake.set()
        try:
            while True:
                self._space_returned()
                self._check_ledger_file()
                if self.force.is_set():
                    self._force_stop()
                    return 0
                if self.stop.is_set():
                    code = self._drain()
                    return self._once_status() if self.once else code
                if self.reload.is_set():
                    self.reload.clear()
                    self._reload()
                now = time.monotonic()
                if self.watcher.overflowed.is_set():
                    self.watcher.overflowed.clear()
                    logger.warning("inotify queue overflowed: rescanning the inbox")
                if not self.watcher.alive() and self.settings.inbox.is_dir():
                    self.watcher.restart()
                if self.wake.is_set() or now - last_scan >= self._scan_period():
                    self.wake.clear()
                    last_scan = now
                    self._scan_inbox()
                    self._retry_failures()
                control.consume_requests(self.settings, self._apply_request)
                self._requeue_due_retries()
                self.intake.admit_claimed()
                if not self._check_worker():
                    return 1
                self._start_more_workers()
                first_ready = self._ready_worker()
                if first_ready is not None:
                    if not ready_sent:
                        ready_sent = True
                        info = first_ready[1].info
                        self.wake.set()
                        logger.info(
                            "model ready (%s, load %.1f s); rendering",
                            info.get("device"),
                            info.get("load_s", 0.0),
                        )
                        self.notifier.ready(self._status_text())
                    self._dispatch()
                if now - last_housekeeping >= self.settings.rescan_s:
                    last_housekeeping = now
                    retention.notice_removed_outputs(self.ledger)
                    retention.apply_retention(self.settings, self.ledger)
                self._status()
                self.heartbeat.beat_if_due(self)
                self.webhooks.tick()  # type: ignore[union-attr]
                self.notifier.ping_if_due()
                if self.once and self._once_done():
                    self.stop.set()
                    continue
                self._wait_workers(self.settings.tick_s)
                self._handle_messages()
        except StateDirFull as e:
            logger.error("%s; jobs still running are queued again at the next start", e)
            return 0
        finally:
            self._close()

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
        assert self.ledger is not None
        while True:
            target = self._ready_worker()
            if target is None:
                return
            if self.isolate & set(self.running):
                return
            upcoming = self.ledger.next_queued()
            if upcoming is None or (upcoming.id in self.isolate and self.running):
                return
            row = self.ledger.claim_next(max_running=self.settings.max_running, job_id=upcoming.id)
            if row is None:
                return
            try:
                order = self._order(row)
            except Exception as e:  # noqa: BLE001 - a stored job that cannot be rebuilt fails, the daemon goes on
                self._fail(row, "bad_input", f"cannot prepare the job: {type(e).__name__}: {e}")
                continue
            index, worker = target
            self.running[row.id] = Running(job_id=row.id, name=row.name, order=order, worker=index)
            worker.run(order)
            logger.info(
                "job %s (%s) started on %s, attempt %d", row.id, row.name, self.devices[index], row.attempts
            )

    def _order(self, row: JobRow) -> RunOrder:
        job_dir = Path(row.job_dir or self.settings.jobs_dir / row.id)
        spec = JobSpec.from_dict(row.spec)
        staging = self.outbox.staging_dir(row.id)
        return RunOrder(
            job_id=row.id,
            request=spec.to_request(job_dir / "input"),
            out_path=staging / f"{row.id}.mp4",
            poster_path=staging / f"{row.id}.jpg",
            checkpoint_dir=job_dir / "checkpoint",
            attempt=row.attempts,
            inputs=claimed_inputs(row.input_hashes_json, job_dir / "input"),
        )

    def _handle_messages(self) -> None:
        for index, worker in self._live_workers():
            for message in worker.poll():
                self._handle_message(index, message)

    def _handle_message(self, index: int, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "progress":
            self._progress(message[1], message[2])
        elif kind == "done":
            self._done(message[1], message[2])
        elif kind == "stopped":
            self._stopped(message[1], message[2])
        elif kind == "failed":
            info = message[2]
            self._keep_failure_detail(message[1], info, index)
            self._failed(
                message[1],
                info["code"],
                info["message"],
                transient=info["transient"],
                traceback=info.get("traceback"),
            )
        elif kind == "fatal":
            logger.error("render worker on %s could not start: %s", self.devices[index], message[1])
            self.fatal[index] = str(message[1])

    def _keep_failure_detail(self, job_id: str, info: dict[str, Any], index: int) -> None:
        """The traceback and the worker's last log lines of a failed attempt, bounded, on the
        job's row (daemon/failures.py): shown by the dashboard, copied into the error JSON."""
        assert self.ledger is not None
        row = self.ledger.find(job_id)
        if row is None or row.state != "running":
            return
        found = failures.detail(
            traceback=info.get("traceback"),
            log_lines=info.get("log_tail"),
            attempt=row.attempts,
            at=time.time(),
            worker=self.workers[index].info if self.workers[index] is not None else None,  # type: ignore[union-attr]
        )
        self.ledger.set_columns(job_id, failure_detail=failures.encode(found))

    def _progress(self, job_id: str, data: dict[str, Any]) -> None:
        assert self.ledger is not None
        run = self.running.get(job_id)
        if run is None:
            return
        run.progress = data
        now = time.monotonic()
        if now - run.last_write < 1.0 and data.get("stage") != "done":
            return
        run.last_write = now
        try:
            self.ledger.update_progress(
                job_id,
                progress=float(data.get("progress", 0.0)),
                chunk=data["chunk"],
                num_chunks=data["num_chunks"],
                step=data["step"],
                num_steps=data["num_steps"],
                stage=data["stage"],
            )
        except (sqlite3.OperationalError, OSError) as e:
            if not _is_disk_full(e):
                raise
            # progress is best effort: a full state dir must not stop a render that is under way
            logger.warning(
                "job %s: progress not recorded, state dir %s is full", job_id, self.settings.state_dir
            )

    def _done(self, job_id: str, result: dict[str, Any]) -> None:
        assert self.ledger is not None
        run = self.running.pop(job_id, None)
        row = self.ledger.get(job_id)
        worker = self.workers[run.worker] if run is not None else None
        worker_info = worker.info if worker is not None else {}
        order = run.order if run else self._order(row)
        poster = order.poster_path if order.poster_path.exists() else None
        if poster is None:
            poster = make_poster(order.out_path, order.poster_path)
        finished = time.time()
        sidecar = {
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
            "frames": result.get("num_frames"),
            "fps": result.get("fps"),
            "duration_s": result.get("duration_s"),
            "width": result.get("width"),
            "height": result.get("height"),
            "seed": result.get("seed"),
            "attempts": row.attempts,
            "resumed_from_chunk": result.get("resumed_from_chunk", 0),
            "timings_s": {
                **(result.get("timings_s") or {}),
                "render": result.get("render_s"),
                "queue_wait": round((row.started_at or finished) - (row.queued_at or row.created_at), 3),
                "total": round(finished - row.created_at, 3),
            },
            "created_at": row.created_at,
            "finished_at": finished,
        }
        try:
            published = self._publish(row, order, poster, sidecar)
        except OSError as e:  # nothing of it is in the outbox (`commit_publication` undid it)
            self.ledger.set_columns(
                row.id, output_video=None, output_poster=None, output_json=None, outputs_identity=None
            )
            full = _is_disk_full(e)
            self._failed(
                job_id,
                "disk_full" if full else "publish_error",
                f"publishing failed: {e}",
                transient=full,
                row=self.ledger.get(job_id),
            )
            return
        self._mark_done(row.id, sidecar)
        shutil.rmtree(order.checkpoint_dir, ignore_errors=True)
        logger.info("job %s (%s) done: %s", row.id, row.name, published.video)
        self.wake.set()

    def _publish(
        self, row: JobRow, order: RunOrder, poster: Path | None, sidecar: dict[str, Any]
    ) -> Published:
        """Stage, record the intent (names and identities), commit: all of it or none of it.

        A name taken meanwhile by a file that is not ours (FileExistsError) moves on to the next
        free name; any other error propagates with nothing of the job left in the outbox."""
        assert self.ledger is not None
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
        assert self.ledger is not None
        self.isolate.discard(job_id)
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
        )
        self.outbox.finish_publication(job_id)

    def _recover_interrupted_endings(self) -> None:
        """Start-up: finish publications and failures a killed daemon left between file and ledger."""
        assert self.ledger is not None
        for row in self.ledger.jobs(["running"]):
            if row.error_code and row.output_json:  # failing was under way
                self._finish_failure(row)
                continue
            if not row.output_json:
                continue
            sidecar = self.outbox.staged_sidecar(row.id)
            staging = self.outbox.partial / row.id
            if sidecar is not None and (staging / f"{row.id}.mp4").exists():
                published = Published(
                    base=Path(row.output_json).stem,
                    video=Path(str(row.output_video)),
                    poster=Path(row.output_poster) if row.output_poster else None,
                    sidecar=Path(row.output_json),
                )
                try:
                    self.outbox.commit_publication(published, staging=staging, job_id=row.id)
                except OSError as e:  # undone by commit_publication: the job renders again
                    logger.error("job %s: cannot finish its publication (%s); rendering it again", row.id, e)
                    self._forget_publication(row)
                    continue
                self._mark_done(row.id, sidecar)
                logger.info("job %s (%s): finished a publication interrupted by a restart", row.id, row.name)
            else:
                self._forget_publication(row)

    def _forget_publication(self, row: JobRow) -> None:
        """Undo a publication that cannot be finished: unlink whatever of it reached the outbox
        (only files proven to be its own, by the identity recorded with the intent), then clear
        the intent; the job renders again."""
        assert self.ledger is not None
        paths = {"video": row.output_video, "poster": row.output_poster, "sidecar": row.output_json}
        for role, identity in row.identities.items():
            path = paths.get(role)
            if path and remove_if_same(Path(path), identity):
                logger.info("job %s: took back %s of a publication that was not finished", row.id, path)
        self.ledger.set_columns(
            row.id, output_video=None, output_poster=None, output_json=None, outputs_identity=None
        )

    def _stopped(self, job_id: str, reason: str) -> None:
        assert self.ledger is not None
        self.running.pop(job_id, None)
        row = self.ledger.get(job_id)
        if reason == "cancel" or row.cancel_requested:
            self.ledger.transition(
                job_id,
                "running",
                "cancelled",
                finished_at=time.time(),
                error_code="cancelled",
                error_message="cancelled by the user",
            )
            logger.info("job %s (%s) cancelled", job_id, row.name)
        else:
            self._requeue(row, f"stopped ({reason})")

    def _requeue(self, row: JobRow, why: str) -> None:
        """Running -> queued without counting the attempt (shutdown, not the job's fault)."""
        assert self.ledger is not None
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

    def _requeue_due_retries(self) -> None:
        """`retry_wait -> queued` for jobs whose backoff has run out, timed on the monotonic clock
        (a wall clock set back a day must not make a retry wait a day). A retry this daemon did
        not time itself (set before a restart, by the `retry` command, or by a requeue into a
        full queue) is due at its ledger time `next_attempt_at`, but never later than one
        backoff from now."""
        assert self.ledger is not None
        waiting = self.ledger.jobs(["retry_wait"])
        if not waiting and not self.retry_due:
            return
        now, wall = time.monotonic(), time.time()
        known = {row.id for row in waiting}
        for job_id in [j for j in self.retry_due if j not in known]:
            del self.retry_due[job_id]
        due: list[str] = []
        for row in waiting:
            at = self.retry_due.get(row.id)
            if at is None:
                left = (row.next_attempt_at or 0.0) - wall
                at = self.retry_due[row.id] = now + min(
                    max(0.0, left), backoff_s(self.settings, row.attempts)
                )
            if at <= now:
                due.append(row.id)
        if due:
            for row in self.ledger.requeue_due_retries(max_queued=self.settings.max_queued, job_ids=due):
                self.retry_due.pop(row.id, None)

    def _fail_exhausted_running(self) -> None:
        """Start-up, before the requeue: a job left running whose counted attempts (those before
        the interrupted one) already reach `max_attempts` (the cap was lowered meanwhile) fails
        instead of running once more."""
        assert self.ledger is not None
        cap = self.settings.max_attempts
        for row in self.ledger.jobs(["running"]):
            if row.attempts - 1 >= cap and row.id not in self.failing:
                self._fail(
                    row,
                    "attempts_exhausted",
                    f"gave up after {row.attempts - 1} failed attempts (max_attempts = {cap})",
                )

    def _failed(
        self,
        job_id: str,
        code: str,
        message: str,
        *,
        transient: bool,
        traceback: str | None = None,
        row: JobRow | None = None,
    ) -> None:
        assert self.ledger is not None
        self.running.pop(job_id, None)
        row = row or self.ledger.get(job_id)
        if row.state != "running":
            return
        if transient and row.attempts < self.settings.max_attempts:
            delay = backoff_s(self.settings, row.attempts)
            self.ledger.transition(
                job_id,
                "running",
                "retry_wait",
                next_attempt_at=time.time() + delay,  # shown to users; the daemon times it below
                error_code=code,
                error_message=message,
                event_data={"delay_s": delay, "traceback": traceback},
            )
            self.retry_due[job_id] = time.monotonic() + delay
            logger.warning(
                "job %s (%s) attempt %d failed (%s: %s); retry in %.0f s",
                job_id,
                row.name,
                row.attempts,
                code,
                message,
                delay,
            )
            return
        if transient:
            message = f"{message} (gave up after {row.attempts} attempts)"
        self._fail(row, code, message, traceback=traceback)

    def _fail(self, row: JobRow, code: str, message: str, traceback: str | None = None) -> None:
        """A permanent failure: error JSON, a copy of the inputs under failed/, state failed."""
        assert self.ledger is not None
        try:
            kept = self.outbox.keep_originals(row.name, [])  # reserves failed/<name>[-n]/
        except OSError as e:
            self._fail_later(row, code, message, traceback, e)
            return
        error_path = self.outbox.root / f"{self.outbox.reserve_base(row.name)}.error.json"
        self.ledger.set_columns(
            row.id, error_code=code, error_message=message, output_json=str(error_path), originals=str(kept)
        )
        self._finish_failure(self.ledger.get(row.id), traceback=traceback)

    def _fail_later(
        self, row: JobRow, code: str, message: str, traceback: str | None, error: OSError
    ) -> None:
        """The outbox is full (or over quota) while a failure is written: the job stays `running`
        with its intent, and `_retry_failures` finishes it once there is room again."""
        if not _is_disk_full(error):
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

    def _retry_failures(self) -> None:
        """Finish failures that waited for room in the outbox (`_fail_later`)."""
        assert self.ledger is not None
        for job_id, (code, message, traceback) in list(self.failing.items()):
            row = self.ledger.get(job_id)
            if row.state != "running":
                self.failing.pop(job_id, None)
                continue
            if row.error_code and row.output_json and row.originals:
                self._finish_failure(row, traceback=traceback)
            else:
                self._fail(row, code, message, traceback)

    def _finish_failure(self, row: JobRow, traceback: str | None = None) -> None:
        try:
            self._write_failure(row)
        except OSError as e:
            self._fail_later(row, str(row.error_code), str(row.error_message), traceback, e)
            return
        self._record_failure(row, traceback)

    def _write_failure(self, row: JobRow) -> None:
        """The files of a failure: the originals under failed/<name>/, then the error JSON."""
        kept = Path(str(row.originals))
        job_dir = Path(row.job_dir or self.settings.jobs_dir / row.id)
        if (job_dir / "input").is_dir():
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copytree(job_dir / "input", kept, symlinks=True, dirs_exist_ok=True)
            restore_loose_job_name(kept, row.name, row.source)
        error_path = Path(str(row.output_json))
        if not error_path.exists():
            self.outbox.write_error_at(
                error_path,
                error_payload(
                    job_id=row.id,
                    name=row.name,
                    state="failed",
                    code=str(row.error_code),
                    message=str(row.error_message),
                    field=None,
                    originals=kept,
                    attempts=row.attempts,
                    failure=failures.decode(row.failure_detail),
                ),
            )

    def _record_failure(self, row: JobRow, traceback: str | None) -> None:
        assert self.ledger is not None
        self.isolate.discard(row.id)
        self.failing.pop(row.id, None)
        self.ledger.transition(
            row.id,
            "running",
            "failed",
            finished_at=time.time(),
            event_data={"traceback": traceback} if traceback else None,
        )
        shutil.rmtree(self.outbox.partial / row.id, ignore_errors=True)
        logger.error("job %s (%s) failed: %s: %s", row.id, row.name, row.error_code, row.error_message)

    def _check_worker(self) -> bool:
        """Notice dead workers, and workers that stopped sending heartbeats (SIGSTOP, a hang):
        those are killed. Their jobs retry (or fail after max_attempts); start new ones."""
        for index, worker in self._live_workers():
            stall = self._stall(index, worker) if worker.alive() else None
            if worker.alive() and stall is None:
                continue
            for message in worker.poll():  # whatever it said before dying
                self._handle_message(index, message)
            fatal = self.fatal.pop(index, None)
            was_ready = worker.ready
            worker.kill()
            mine = [job_id for job_id, run in self.running.items() if run.worker == index]
            if len(mine) > 1:
                self.isolate |= set(mine)
            code, why = (
                ("worker_stall", stall)
                if stall
                else ("worker_crash", "the render worker process died during this job")
            )
            for job_id in mine:
                self._failed(job_id, code, why, transient=True)
            if fatal and not was_ready:
                logger.error("giving up: the model cannot be loaded on %s", self.devices[index])
                return False
            self.start_failures = 0 if was_ready else self.start_failures + 1
            if self.start_failures >= MAX_START_FAILURES:
                logger.error(
                    "the render worker died %d times before it was ready; giving up", self.start_failures
                )
                return False
            logger.warning("render worker on %s died; starting a new one", self.devices[index])
            self._start_worker(index)
        return True

    def _stall(self, index: int, worker: WorkerHandle) -> str | None:
        """Why a live worker counts as stalled (no message, heartbeats included, for
        `worker_stall_s`), or None. Messages already waiting are read first: a main loop that
        was busy itself does not make a worker look stalled."""
        for message in worker.poll():
            self._handle_message(index, message)
        silent_s = time.monotonic() - worker.last_seen
        limit_s = self.settings.worker_stall_s
        if worker.conn is None or silent_s < limit_s:
            return None
        logger.error(
            "render worker on %s (pid %s) sent no heartbeat for %.0f s (worker_stall_s = %g): it is "
            "stopped or hung; killing it",
            self.devices[index],
            worker.pid,
            silent_s,
            limit_s,
        )
        return f"the render worker stopped responding for {silent_s:.0f} s (stopped or hung) and was killed"

    # ------------------------------------------------------------------ requests, reload, status

    def _stop_job(self, job_id: str, reason: str) -> None:
        run = self.running.get(job_id)
        worker = self.workers[run.worker] if run is not None else None
        if worker is not None:
            worker.stop_job(job_id, reason)

    def _apply_request(self, action: str, job_id: str) -> control.Outcome:
        assert self.ledger is not None

        def stop_running(jid: str) -> None:
            self._stop_job(jid, "cancel")

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
            self.notifier.ready(self._status_text())
            return
        restart_keys = [
            k
            for k in (
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
            )
            if getattr(new, k) != getattr(self.settings, k)
        ]
        if restart_keys:
            logger.warning("SIGHUP: %s changed; these take effect after a restart", ", ".join(restart_keys))
            import dataclasses

            new = dataclasses.replace(new, **{k: getattr(self.settings, k) for k in restart_keys})
        self.settings = new
        assert self.intake is not None
        self.intake.reconfigure(new)
        logger.info(
            "SIGHUP: config reloaded (max_queued %d, max_running %d)", new.max_queued, new.max_running
        )
        assert self.ledger is not None
        self.ledger.daemon_event("config reloaded", max_queued=new.max_queued, max_running=new.max_running)
        self.notifier.ready(self._status_text())

    def _scan_inbox(self) -> None:
        """One intake scan; a full state dir (ledger or claimed inputs) pauses intake, not the daemon."""
        assert self.intake is not None
        assert self.ledger is not None
        try:
            with self.ledger.fail_fast():
                self.intake.scan_once()
        except (sqlite3.OperationalError, OSError) as e:
            if not _is_disk_full(e):
                raise
            now = time.monotonic()
            if now - self.intake_paused_logged >= 60:
                self.intake_paused_logged = now
                logger.error("%s is full (%s): intake paused until space returns", self._full_folder(e), e)
            self.notifier.status(f"intake paused: {self._full_folder(e)} is full")
            return
        if self.intake_paused_logged:
            self.intake_paused_logged = 0.0
            logger.info("state dir has room again: intake resumed")

    def _full_folder(self, error: BaseException) -> str:
        """Which of the daemon's folders a disk-full error is about (for the log), by its text."""
        text = str(error)
        s = self.settings
        for what, folder in (("outbox", s.outbox), ("state dir", s.state_dir), ("inbox", s.inbox)):
            if str(folder) in text:
                return f"{what} {folder}"
        if isinstance(error, sqlite3.Error):
            return f"state dir {s.state_dir}"
        return f"state dir {s.state_dir} or outbox {s.outbox}"

    def _wait_for_space(self, error: BaseException, attempt: int) -> None:
        """`Ledger.on_full`: a state change (job started, done, failed, requeued...) cannot be
        written because the state dir is full. Wait for space, keep the watchdog fed and try again;
        renders under way go on. Told to stop meanwhile, give up (`StateDirFull`): the jobs left
        running are queued again at the next start."""
        now = time.monotonic()
        if attempt == 1:
            if not self.full_since:
                self.full_since = now
                logger.error(
                    "state dir %s is full (%s): ledger writes wait until space returns",
                    self.settings.state_dir,
                    error,
                )
            self.notifier.status(f"waiting for space: state dir {self.settings.state_dir} is full")
        elif attempt % 60 == 0:
            logger.error(
                "state dir %s still full after %.0f s", self.settings.state_dir, now - self.full_since
            )
        if self.stop.is_set() or self.force.is_set():
            raise StateDirFull(
                f"state dir {self.settings.state_dir} is full and the daemon is stopping: {error}"
            ) from error
        self.notifier.ping_if_due()
        self.stop.wait(min(1.0, 0.1 * attempt))

    def _space_returned(self) -> None:
        """The main loop got past a write that waited for space: say so once."""
        if self.full_since:
            logger.info(
                "state dir has room again after %.0f s: ledger writes go on",
                time.monotonic() - self.full_since,
            )
            self.full_since = 0.0

    def _status_text(self) -> str:
        assert self.ledger is not None
        c = self.ledger.counts()
        text = (
            f"{c['running']} running, {c['queued']} queued, {c['waiting']} waiting, {c['done']} done, "
            f"{c['failed']} failed (caps {self.settings.max_queued} queued / {self.settings.max_running} "
            "running)"
        )
        if self._ready_worker() is None:
            text = "loading the model; " + text
        for run in list(self.running.values())[:3]:
            p = run.progress
            if p:
                text += (
                    f"; {run.name} chunk {p.get('chunk')}/{p.get('num_chunks')} step {p.get('step')}/"
                    f"{p.get('num_steps')}"
                )
        return text

    def _status(self) -> None:
        text = self._status_text()
        if text != self.last_status:
            self.last_status = text
            self.notifier.status(text)

    # ------------------------------------------------------------------ stopping

    def _drain(self) -> int:
        """SIGTERM: running jobs stop at a step boundary and go back to queued; exit 0."""
        assert self.ledger is not None
        s = self.settings
        logger.info("stopping: %d running job(s) stop at the next step boundary", len(self.running))
        self.notifier.stopping(f"stopping; {len(self.running)} job(s) finishing their current step")
        self.notifier.extend_timeout(s.stop_timeout_s + 30)
        for job_id in list(self.running):
            self._stop_job(job_id, "shutdown")
        deadline = time.monotonic() + s.stop_timeout_s
        while self.running and time.monotonic() < deadline and not self.force.is_set():
            if not any(
                self.workers[run.worker] is not None and self.workers[run.worker].alive()  # type: ignore[union-attr]
                for run in self.running.values()
            ):
                break
            self._wait_workers(0.2)
            self._handle_messages()
            self.notifier.ping_if_due()
            self.heartbeat.beat_if_due(self)
            self.webhooks.tick()  # type: ignore[union-attr]
        self._force_stop()
        return 0

    def _force_stop(self) -> None:
        assert self.ledger is not None
        for _, worker in self._live_workers():
            worker.shutdown(timeout_s=2.0 if not self.force.is_set() else 0.1)
        for job_id in list(self.running):
            self.running.pop(job_id)
            try:
                self._requeue(self.ledger.get(job_id), "stopped (daemon shutting down)")
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
        for _, worker in self._live_workers():
            worker.kill()
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


def make_poster(video: Path, poster: Path) -> Path | None:
    """A JPEG of the first frame, when the pipeline wrote none."""
    try:
        import av

        with av.open(str(video)) as container:
            for frame in container.decode(video=0):
                frame.to_image().convert("RGB").save(poster, "JPEG", quality=90)
                return poster
    except Exception as e:  # noqa: BLE001 - a missing poster is not worth failing a job for
        logger.warning("could not make a poster from %s: %s", video, e)
    return None
