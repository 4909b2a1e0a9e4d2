"""Test-only helpers for the reliability suite: job bundles with checksums, a real OpenSSH server,
interrupted clients, the end-of-run invariants, and the figures written to the summary JSON.

Nothing here fakes the daemon: the daemons are `tests.helpers.daemon.Daemon` processes with the
tiny random-weight model (preset `STEADY`), run exactly as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.proc import ROOT, free_port

SUMMARY_PATH = Path(os.environ.get("RELIABILITY_SUMMARY", ROOT / "build" / "reliability-summary.json"))

#: figures of this test run (written to SUMMARY_PATH at the end of the session)
FIGURES: Counter[str] = Counter()
#: the exact client commands run, by recipe name (docs/uploading.md is checked against these)
RECIPES_RUN: dict[str, list[str]] = {}

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


def drop(d: Daemon, name: str, seed: int, **settings: Any) -> Path:
    """A complete bundle (`make_bundle`), placed in the inbox by one rename (as the staged recipes do)."""
    staged = d.inbox / f".{name}.staging"
    make_bundle(staged, seed=seed, **settings)
    os.rename(staged, d.inbox / name)
    return d.inbox / name


def visible(d: Daemon) -> list[str]:
    """The names of the files a client sees in the outbox (no dot-files, no folders)."""
    return sorted(p.name for p in d.outbox.iterdir() if p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------------------- disk full


#: the `tmpfs` fixture: mount a size-limited tmpfs at a folder
Mount = Callable[[Path, str], Path]


def mount_tmpfs(folder: Path, size: str) -> None:
    """A `size` tmpfs at `folder` (created); the test is skipped where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip()}); disk-full tests need root or CAP_SYS_ADMIN"
        )


def umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def fill(folder: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about `leave_bytes` free on folder's filesystem."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    ballast = folder / ".ballast"
    with open(ballast, "wb") as f:
        remaining = max(0, free - leave_bytes)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            n = min(remaining, len(block))
            try:
                f.write(block[:n])
            except OSError:
                break
            remaining -= n
    return ballast


def start_then_fill(d: Daemon, folder: Path, leave_bytes: int) -> Path:
    """Start the daemon (it needs room to start), then fill `folder`'s filesystem to about
    `leave_bytes` free; the ballast file, to remove when space should return."""
    d.start()
    ballast = fill(folder, leave_bytes)
    count("faults injected")
    return ballast


# ---------------------------------------------------------------------------- invariants


def check_invariants(d: Daemon, *, idle: bool = True) -> dict[str, int]:
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


def tally(d: Daemon) -> dict[str, int]:
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
