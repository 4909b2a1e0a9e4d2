"""The one daemon-process harness of the end-to-end tests (tests/daemon/service, tests/daemon/reliability, the
dashboard's and the GPU tests).

`Daemon` runs the real `python -m daemon daemon --config <toml>` on a temporary tree (inbox/,
outbox/, var/, infinitetalk.toml), exactly as a user would, with either the fake pipeline of
tests/daemon/service/fake_pipeline.py (steered by words in the prompt) or a real model (the tiny
random-weight one), and reads its SQLite ledger read-only.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tests.helpers.proc import ROOT, infinitetalk, wait_until

FAKE = "tests.daemon.service.fake_pipeline:make"
FINAL = ("done", "failed", "rejected", "cancelled")

#: timings for the fake pipeline: quick scans and retries, two steps a chunk
QUICK: Mapping[str, Any] = {
    "settle_s": 0.3,
    "rescan_s": 0.5,
    "tick_s": 0.05,
    "retry_backoff_s": 0.2,
    "retry_backoff_max_s": 1.0,
    "incomplete_timeout_s": 30,
    "stop_timeout_s": 20,
    "defaults": {"sample_steps": 2},
}
#: the tiny model on the CPU, two jobs at a time, under uploads and faults (tests/daemon/reliability)
STEADY: Mapping[str, Any] = {
    "device": "cpu",
    "settle_s": 1.0,
    "rescan_s": 2.0,
    "tick_s": 0.1,
    "incomplete_timeout_s": 600.0,
    "retry_backoff_s": 0.2,
    "retry_backoff_max_s": 1.0,
    "max_running": 2,
    "stop_timeout_s": 20.0,
    "log_level": "info",
    "defaults": {"sample_steps": 1},
}
#: the environment of every daemon started here (quiet, offline, unbuffered logs)
ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}

T = TypeVar("T")


class Daemon:
    """One daemon tree and its process: config, start/stop/kill, the ledger read-only, waits.

    `settings` (top-level keys, plus a `defaults` table) go over `preset`; edit them and call
    `write_config()` to change the next start. `wrapper` is a command prefix for the next start
    (e.g. strace with a fault-injection rule); `env` is extra environment of the next start
    (PYTHONPATH entries go before the repository's). With `ready_on_start`, `start()` waits for
    the model to be loaded."""

    def __init__(
        self,
        root: Path,
        *,
        fake: bool = True,
        config: Mapping[str, Any] | None = None,
        weights_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        preset: Mapping[str, Any] = QUICK,
        ready_on_start: bool = False,
    ) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.state = root / "var"
        self.config = root / "infinitetalk.toml"
        self.log = root / "daemon.log"
        self.inbox.mkdir(parents=True, exist_ok=True)
        if weights_dir is None and fake:
            # the fake pipeline needs no weights; this marker tells the daemon the chunk length
            weights_dir = root / "weights"
            weights_dir.mkdir(exist_ok=True)
            (weights_dir / "tiny.json").write_text('{"generation": {"frame_num": 5, "motion_frame": 1}}')
        self.weights_dir = weights_dir
        self.fake = fake
        self.preset = preset
        self.settings: dict[str, Any] = dict(config or {})
        self.env: dict[str, str] = dict(env or {})
        self.wrapper: list[str] = []
        self.ready_on_start = ready_on_start
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.write_config()

    def write_config(self) -> None:
        values: dict[str, Any] = {"inbox": self.inbox, "outbox": self.outbox, "state_dir": self.state}
        if self.weights_dir is not None:
            values["weights_dir"] = self.weights_dir
        values.update({k: v for k, v in self.preset.items() if k != "defaults"})
        values.update({k: v for k, v in self.settings.items() if k != "defaults"})
        defaults = {**self.preset.get("defaults", {}), **self.settings.get("defaults", {})}
        lines = [f"{k} = {_toml(v)}" for k, v in values.items()]
        lines += ["", "[defaults]", *(f"{k} = {_toml(v)}" for k, v in defaults.items())]
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def ledger_path(self) -> Path:
        return self.state / "ledger.sqlite3"

    # -------------------------------------------------------------- process control

    def environment(self) -> dict[str, str]:
        """The environment a daemon or CLI started from here runs with."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), **ENV}
        env.pop("NOTIFY_SOCKET", None)
        extra = dict(self.env)
        if "PYTHONPATH" in extra:
            extra["PYTHONPATH"] += os.pathsep + str(ROOT)
        return {**env, **extra}

    def start(
        self, *extra: str, wait_ready: bool | None = None, timeout_s: float = 90.0
    ) -> subprocess.Popen[bytes]:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        args = [*self.wrapper, sys.executable, "-m", "daemon", "daemon", "--config", str(self.config), *extra]
        if self.fake:
            args += ["--pipeline-factory", FAKE]
        self.starts += 1
        with open(self.log, "ab") as log:
            log.write(f"\n===== start {self.starts} at {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(
                args,
                cwd=self.root,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.ready_on_start if wait_ready is None else wait_ready:
            self.wait_ready(timeout_s)
        return self.proc

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        marker = f"===== start {self.starts} at"

        def ready() -> bool:
            self.assert_alive()
            text = self.log.read_text(errors="replace")
            return "model ready" in text[text.rfind(marker) :]

        wait_until(ready, timeout_s, "the daemon to load the model")

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """`infinitetalk <args> --config <this tree's config>`."""
        return infinitetalk(
            *args,
            "--config",
            str(self.config),
            cwd=self.root,
            env=self.environment(),
            timeout_s=120,
            check=check,
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(
                f"the daemon exited (status {self.proc and self.proc.returncode}); log:\n" + self.log_tail()
            )

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def main_pid(self) -> int | None:
        """The daemon's own process (the child of the wrapper, if there is one)."""
        if not self.alive():
            return None
        assert self.proc is not None
        if not self.wrapper:
            return self.proc.pid
        for pid in _children(self.proc.pid):
            if "-m daemon daemon" in _cmdline(pid):
                return pid
        return None

    def worker_pid(self) -> int | None:
        """The render worker: the daemon's child running multiprocessing's spawn_main."""
        main = self.main_pid()
        if main is None:
            return None
        for pid in _children(main):
            cmd = _cmdline(pid)
            if "spawn_main" in cmd and "resource_tracker" not in cmd:
                return pid
        return None

    def kill9(self) -> None:
        """kill -9 of the daemon; the worker dies with it (PR_SET_PDEATHSIG), as under a power cut."""
        if self.proc is None:
            return
        main = self.main_pid()
        children = _children(main) if main else []
        for pid in (main, self.proc.pid):  # the daemon first: a dying tracer would let it run on
            try:
                if pid:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        for pid in children:  # a power cut leaves nothing running either
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not any(pid_running(p) for p in children), 10, "the daemon's children to exit")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; a daemon that does not stop in time is killed and the test fails."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(
                f"the daemon did not stop within {timeout_s:g} s of SIGTERM; log:\n{self.log_tail()}"
            ) from None

    # -------------------------------------------------------------- the ledger, read-only

    def _read(self, read: Callable[[sqlite3.Connection], T], empty: T) -> T:
        """`read(conn)` on a read-only connection to the ledger, retried while it is locked or
        being created; `empty` when there is no ledger (or no such table) yet."""
        if not self.ledger_path.exists():
            return empty
        for attempt in range(20):
            try:
                conn = sqlite3.connect(f"file:{self.ledger_path}?mode=ro", uri=True, timeout=10)
                try:
                    conn.row_factory = sqlite3.Row
                    return read(conn)
                finally:
                    conn.close()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):  # the daemon has not created it yet
                    return empty
                if attempt == 19:
                    raise
                time.sleep(0.1)
        return empty

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return self._read(lambda conn: [dict(r) for r in conn.execute(sql, tuple(params))], [])

    def jobs(self, name: str | None = None) -> list[dict[str, Any]]:
        if name is None:
            return self.query("SELECT * FROM jobs ORDER BY seq")
        return self.query("SELECT * FROM jobs WHERE name = ? ORDER BY seq", (name,))

    def job(self, name: str) -> dict[str, Any] | None:
        """The newest job of this name."""
        rows = self.jobs(name)
        return rows[-1] if rows else None

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]:
        if job_id is None:
            return self.query("SELECT * FROM events ORDER BY id")
        return self.query("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))

    def event_kinds(self, job_id: str) -> list[str]:
        return [e["kind"] for e in self.events(job_id)]

    def counts(self) -> dict[str, int]:
        return {
            r["state"]: r["n"] for r in self.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        }

    def snapshot(self) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
        """All jobs and each job's event kinds, read in one transaction so they agree with each other
        even while the daemon keeps writing (WAL readers see one consistent moment)."""

        def read(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
            conn.execute("BEGIN")
            jobs = [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY seq")]
            kinds: dict[str, list[str]] = {}
            for r in conn.execute("SELECT job_id, kind FROM events ORDER BY id"):
                kinds.setdefault(r["job_id"], []).append(r["kind"])
            conn.execute("COMMIT")
            return jobs, kinds

        nothing: tuple[list[dict[str, Any]], dict[str, list[str]]] = ([], {})
        return self._read(read, nothing)

    def admitted(self, name: str) -> list[dict[str, Any]]:
        """Jobs of this name that ever reached `queued` (admitted)."""
        return [j for j in self.jobs(name) if "queued" in self.event_kinds(j["id"])]

    # -------------------------------------------------------------- waits

    def wait_for(
        self,
        predicate: Callable[[], Any],
        timeout_s: float = 60.0,
        what: str = "condition",
        *,
        every: Callable[[], None] | None = None,
        interval_s: float = 0.05,
    ) -> Any:
        """Poll `predicate` (then `every`) until it returns something truthy; fail at once, with
        the log, when the daemon exits meanwhile, and after `timeout_s` with the jobs and the log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if every is not None:
                every()
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) while waiting for {what}:\n" + self.log_tail()
                )
            time.sleep(interval_s)
        raise AssertionError(
            f"timed out after {timeout_s:g} s waiting for {what}; jobs: "
            f"{json.dumps(self.jobs(), default=str)[:3000]}\nlog:\n{self.log_tail()}"
        )

    def wait_state(
        self, name: str, states: str | Iterable[str], timeout_s: float = 90.0, *, ignore: Iterable[str] = ()
    ) -> dict[str, Any]:
        """The newest job of this name once it is in one of `states`; rows whose id is in `ignore`
        don't count. Fails at once when every such row has ended in another state."""
        wanted = {states} if isinstance(states, str) else set(states)
        skip = set(ignore)

        def found() -> dict[str, Any] | None:
            rows = [j for j in self.jobs(name) if j["id"] not in skip]
            if rows and rows[-1]["state"] in wanted:
                return rows[-1]
            if rows and all(j["state"] in FINAL for j in rows):  # it can never get there: fail now
                raise AssertionError(
                    f"job {name!r} ended {[j['state'] for j in rows]}, not {sorted(wanted)}; its rows: "
                    f"{[(j['id'], j['error_code'], j['error_message']) for j in rows]}\nlog:\n{self.log_tail(30)}"
                )
            return None

        return self.wait_for(found, timeout_s, f"job {name!r} to reach {sorted(wanted)}", interval_s=0.1)

    def wait_idle(self, timeout_s: float = 180.0) -> None:
        """Until no job is queued, running or in retry (waiting jobs may stay: incomplete uploads)."""

        def idle() -> bool:
            rows = self.query(
                "SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running', 'retry_wait')"
            )
            return rows[0]["n"] == 0 if rows else False

        self.wait_for(idle, timeout_s, "the queue to drain", interval_s=0.3)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False
