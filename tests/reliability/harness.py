"""Test-only helpers for the reliability suite: a real daemon subprocess, a real OpenSSH server,
ledger reads, the end-of-run invariants, and the figures written to the summary JSON.

Nothing here fakes the daemon: `DaemonProc` runs `python -m daemon daemon --config <toml>` with
the tiny random-weight model, exactly as a user would, and reads its SQLite ledger read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
SUMMARY_PATH = Path(os.environ.get("RELIABILITY_SUMMARY", REPO / "build" / "reliability-summary.json"))

#: figures of this test run (written to SUMMARY_PATH at the end of the session)
FIGURES: Counter[str] = Counter()
#: the exact client commands run, by recipe name (docs/uploading.md is checked against these)
RECIPES_RUN: dict[str, list[str]] = {}

FINAL = ("done", "failed", "rejected", "cancelled")
#: the tiny model renders chunks of 33 frames; its shortest accepted speech is (33 + 1) / 25 s
MIN_AUDIO_S = 1.5


def count(key: str, n: int = 1) -> None:
    FIGURES[key] += n


def write_summary() -> None:
    if not FIGURES:
        return
    SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    figures = dict(FIGURES)
    payload = {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{os.uname().nodename} ({os.cpu_count()} CPUs, {os.uname().machine}, Linux {os.uname().release})",
        "figures": figures,
        "recipes_run": {k: v for k, v in sorted(RECIPES_RUN.items())},
    }
    SUMMARY_PATH.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


T = TypeVar("T")


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- job bundles


def make_bundle(
    directory: Path, *, seed: int, audio_s: float = MIN_AUDIO_S, checksums: bool = True, **settings: Any
) -> Path:
    """A job bundle from tests/helpers/media.py (RGBA PNG + WAV), one chunk, with sha256 checksums."""
    from tests.helpers.media import make_job_bundle

    make_job_bundle(
        directory,
        kind="image",
        duration_s=audio_s,
        seed=seed,
        image_size=(48, 40),
        max_frame_num=33,
        **settings,
    )
    if checksums:
        doc = json.loads((directory / "job.json").read_text())
        doc["checksums"] = {
            doc["cond_video"]: sha256(directory / doc["cond_video"]),
            **{p: sha256(directory / p) for p in doc["cond_audio"].values()},
        }
        (directory / "job.json").write_text(json.dumps(doc, indent=2))
    return directory


# ---------------------------------------------------------------------------- the daemon


@dataclass
class DaemonProc:
    """One daemon instance: its folders, config, process and ledger."""

    root: Path
    weights_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    #: a command prefix for the next start, e.g. strace with a fault-injection rule
    wrapper: list[str] = field(default_factory=list)
    #: extra environment of the next start (PYTHONPATH entries go before the repository's)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.inbox = self.root / "inbox"
        self.outbox = self.root / "outbox"
        self.state = self.root / "var"
        self.inbox.mkdir(exist_ok=True)
        self.config = self.root / "infinitetalk.toml"
        self.log = self.root / "daemon.log"
        self.write_config()

    def write_config(self) -> None:
        base = {
            "inbox": str(self.inbox),
            "outbox": str(self.outbox),
            "state_dir": str(self.state),
            "weights_dir": str(self.weights_dir),
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
        }
        base.update({k: v for k, v in self.settings.items() if k != "defaults"})
        lines = [f"{k} = {_toml(v)}" for k, v in base.items()]
        defaults = {"sample_steps": 1, **self.settings.get("defaults", {})}
        lines += ["", "[defaults]", *(f"{k} = {_toml(v)}" for k, v in defaults.items())]
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def ledger_path(self) -> Path:
        return self.state / "ledger.sqlite3"

    # -------------------------------------------------------------- process control

    def start(self, *, wait_ready: bool = True, timeout_s: float = 90.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TQDM_DISABLE": "1",
        }
        env.pop("NOTIFY_SOCKET", None)
        extra = dict(self.env)
        if "PYTHONPATH" in extra:
            extra["PYTHONPATH"] += os.pathsep + str(REPO)
        env.update(extra)
        self.starts += 1
        with open(self.log, "ab") as log:
            log.write(f"\n===== start {self.starts} at {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "daemon", "daemon", "--config", str(self.config)],
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        marker = f"===== start {self.starts} at"

        def ready() -> bool:
            self.assert_alive()
            text = self.log.read_text(errors="replace")
            return "model ready" in text[text.rfind(marker) :]

        wait_for(ready, timeout_s, "the daemon to load the model")

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
        wait_for(lambda: not any(_exists(p) for p in children), 10, "the daemon's children to exit")

    def stop(self, timeout_s: float = 60.0) -> int:
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
        being created; `empty` when there is no ledger yet."""
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
            except sqlite3.OperationalError:
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

        return self._read(read, ([], {}))

    def event_kinds(self, job_id: str) -> list[str]:
        return [
            r["kind"] for r in self.query("SELECT kind FROM events WHERE job_id = ? ORDER BY id", (job_id,))
        ]

    def admitted(self, name: str) -> list[dict[str, Any]]:
        """Jobs of this name that ever reached `queued` (admitted)."""
        return [j for j in self.jobs(name) if "queued" in self.event_kinds(j["id"])]

    def wait_state(
        self, name: str, states: Iterable[str], timeout_s: float = 90.0, *, ignore: Iterable[str] = ()
    ) -> dict[str, Any]:
        """The newest job of this name in one of `states`; rows whose id is in `ignore` don't count."""
        wanted = set(states)
        skip = set(ignore)

        def found() -> dict[str, Any] | None:
            self.assert_alive()
            rows = [j for j in self.jobs(name) if j["id"] not in skip]
            hits = [j for j in rows if j["state"] in wanted]
            if hits:
                return hits[-1]
            if rows and all(j["state"] in FINAL for j in rows):  # it can never get there: fail now
                raise AssertionError(f"job {name!r} ended {[j['state'] for j in rows]}, not {sorted(wanted)}")
            return None

        try:
            return wait_for(found, timeout_s, f"job {name!r} to reach {sorted(wanted)}", 0.2)
        except AssertionError as e:  # with the rows and the log, to see why
            raise AssertionError(
                f"{e}; its rows: {[(j['id'], j['state'], j['waiting_reason'], j['error_code'], j['error_message']) for j in self.jobs(name)]}\nlog:\n{self.log_tail(30)}"
            ) from None

    def wait_idle(self, timeout_s: float = 180.0) -> None:
        """Until no job is queued, running or in retry (waiting jobs may stay: incomplete uploads)."""

        def idle() -> bool:
            self.assert_alive()
            rows = self.query(
                "SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running', 'retry_wait')"
            )
            return rows[0]["n"] == 0 if rows else False

        wait_for(idle, timeout_s, "the queue to drain", 0.3)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
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


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------- invariants


def check_invariants(d: DaemonProc, *, idle: bool = True) -> dict[str, int]:
    """What must hold after any run, crash or fault; returns counts per state.

    - every job is in one known state, and its last state event agrees with it;
    - no two `done` jobs have the same inputs and settings (no duplicate renders), and every
      bundle name is done at most once unless it was uploaded more than once;
    - every `done` job's video, poster and sidecar exist, the sidecar names the job;
    - every top-level outbox file belongs to exactly one ledger row (no stray or partial result);
    - with the queue idle, `outbox/.partial/` holds nothing and every claimed input folder under
      `<state_dir>/jobs/` belongs to a ledger row.
    """
    # the outbox is listed before the ledger is read: a file is named in its row before it is moved
    # into the outbox, so every file seen here must be referenced by the (later) ledger snapshot
    outbox_files = sorted(c for c in d.outbox.iterdir() if c.is_file()) if d.outbox.is_dir() else []
    jobs, events = d.snapshot()
    states = Counter(j["state"] for j in jobs)
    state_event = {
        "waiting": "waiting",
        "queued": "queued",
        "running": "started",
        "retry_wait": "retry",
        "done": "done",
        "failed": "failed",
        "rejected": "rejected",
        "cancelled": "cancelled",
    }
    problems: list[str] = []
    referenced: set[str] = set()
    done_keys: Counter[str] = Counter()
    for j in jobs:
        if j["state"] not in state_event:
            problems.append(f"job {j['id']} has unknown state {j['state']!r}")
            continue
        kinds = [k for k in events.get(j["id"], []) if k in state_event.values()]
        if not kinds or kinds[-1] != state_event[j["state"]]:
            problems.append(
                f"job {j['id']} ({j['name']}) is {j['state']} but its last state event is "
                f"{kinds[-1] if kinds else None}"
            )
        for col in ("output_video", "output_poster", "output_json"):
            if j[col]:
                referenced.add(os.path.realpath(j[col]))
        if j["state"] == "done":
            done_keys[j["dedupe_key"] or j["id"]] += 1
            for col in ("output_video", "output_json"):
                if not j[col] or not Path(j[col]).is_file():
                    problems.append(f"done job {j['id']} ({j['name']}) lacks its {col}: {j[col]}")
            if j["output_json"] and Path(j["output_json"]).is_file():
                sidecar = json.loads(Path(j["output_json"]).read_text())
                if sidecar.get("job_id") != j["id"]:
                    problems.append(f"{j['output_json']} names job {sidecar.get('job_id')}, not {j['id']}")
        if j["state"] in ("failed", "rejected") and not (
            j["output_json"] and Path(j["output_json"]).is_file()
        ):
            problems.append(
                f"{j['state']} job {j['id']} ({j['name']}) has no error JSON ({j['output_json']})"
            )
    for key, n in done_keys.items():
        if n > 1:
            problems.append(f"{n} done jobs share the same inputs and settings (dedupe key {key[:12]})")
    for child in outbox_files:
        if os.path.realpath(child) not in referenced and child.exists():
            problems.append(f"outbox file {child.name} belongs to no job in the ledger")
    if idle:
        partial = d.outbox / ".partial"
        if partial.is_dir() and any(partial.iterdir()):
            problems.append(f"outbox/.partial is not empty: {sorted(p.name for p in partial.iterdir())}")
        ids = {j["id"] for j in jobs}
        jobs_dir = d.state / "jobs"
        if jobs_dir.is_dir():
            for child in jobs_dir.iterdir():
                if child.name not in ids:
                    problems.append(f"claimed inputs {child} belong to no ledger row")
        for j in jobs:
            if j["state"] in ("queued", "running", "retry_wait") and not (
                j["job_dir"] and Path(j["job_dir"], "input").is_dir()
            ):
                problems.append(f"{j['state']} job {j['id']} has no claimed inputs ({j['job_dir']})")
    if problems:
        raise AssertionError("invariants broken:\n  " + "\n  ".join(problems) + "\nlog:\n" + d.log_tail(40))
    return dict(states)


def tally(d: DaemonProc) -> dict[str, int]:
    """Add this daemon's losses and duplicates, computed from its ledger, to the run's figures.

    lost: admitted (a `queued` event) but neither done nor still queued/running;
    duplicates: more than one `done` job with the same inputs and settings."""
    jobs = d.jobs()
    admitted = [j for j in jobs if "queued" in d.event_kinds(j["id"])]
    lost = [j for j in admitted if j["state"] not in ("done", "queued", "running", "retry_wait")]
    keys = Counter(j["dedupe_key"] for j in jobs if j["state"] == "done")
    duplicates = sum(n - 1 for n in keys.values() if n > 1)
    count("jobs admitted", len(admitted))
    count("jobs done", sum(1 for j in jobs if j["state"] == "done"))
    count("jobs lost", len(lost))
    count("duplicate renders", duplicates)
    return {"admitted": len(admitted), "lost": len(lost), "duplicates": duplicates}


# ---------------------------------------------------------------------------- OpenSSH server


@dataclass(frozen=True)
class SshServer:
    port: int
    key: Path
    user: str
    config: Path

    @property
    def host(self) -> str:
        return f"{self.user}@127.0.0.1"

    @property
    def options(self) -> list[str]:
        return [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.key),
        ]

    @property
    def ssh_e(self) -> str:
        """The `-e` argument of rsync."""
        return "ssh -p {} {}".format(self.port, " ".join(self.options))

    def ssh(self, *command: str) -> list[str]:
        return ["ssh", "-p", str(self.port), *self.options, self.host, *command]


def start_sshd(folder: Path) -> tuple[subprocess.Popen[bytes], SshServer]:
    """sshd -D on 127.0.0.1:<free port>, host and user keys made here, sftp = internal-sftp."""
    import getpass

    folder.mkdir(parents=True, exist_ok=True)
    host_key = folder / "host_ed25519"
    user_key = folder / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (folder / "authorized_keys").write_text((folder / "user_ed25519.pub").read_text())
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir sshd insists on
    last_error = ""
    for _ in range(5):
        port = free_port()
        config = folder / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress 127.0.0.1:{port}",
                    f"HostKey {host_key}",
                    f"AuthorizedKeysFile {folder / 'authorized_keys'}",
                    f"PidFile {folder / 'sshd.pid'}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "Subsystem sftp internal-sftp",
                    "MaxStartups 100:30:200",
                    "MaxSessions 50",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        with open(folder / "sshd.log", "ab") as log:
            proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        server = SshServer(port=port, key=user_key, user=getpass.getuser(), config=config)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            probe = subprocess.run(server.ssh("true"), capture_output=True, timeout=20, check=False)
            if probe.returncode == 0:
                return proc, server
            last_error = probe.stderr.decode(errors="replace")
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        last_error += (folder / "sshd.log").read_text(errors="replace")
    raise RuntimeError(f"sshd did not come up: {last_error}")


# ---------------------------------------------------------------------------- interrupting clients


def run_interrupted(
    cmd: list[str], watch: Callable[[], bool], *, env: dict[str, str] | None = None, timeout_s: float = 30.0
) -> None:
    """Start a client, SIGKILL its whole process group as soon as `watch()` says it is mid-transfer."""
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if watch():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                return
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(
                    f"the client finished (status {proc.returncode}) before it could be "
                    f"interrupted mid-transfer: {cmd}\n{err}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw a mid-transfer state for {cmd}")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def partial_file_in(folders: Iterable[Path], full_size: int) -> Callable[[], bool]:
    """True once a file under one of `folders` (temporary names included) holds 10..90 % of `full_size`."""
    folders = list(folders)

    def check() -> bool:
        for folder in folders:
            for root, _dirs, files in os.walk(folder):
                for name in files:
                    try:
                        size = os.lstat(os.path.join(root, name)).st_size
                    except FileNotFoundError:
                        continue
                    if 0.1 * full_size <= size <= 0.9 * full_size:
                        return True
        return False

    return check
