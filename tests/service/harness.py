"""Run the real `infinitetalk daemon` as a subprocess on a temporary tree and watch its ledger."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.service.fake_pipeline:make"

BASE_CONFIG: dict[str, Any] = {
    "settle_s": 0.3,
    "rescan_s": 0.5,
    "tick_s": 0.05,
    "retry_backoff_s": 0.2,
    "retry_backoff_max_s": 1.0,
    "incomplete_timeout_s": 30,
    "stop_timeout_s": 20,
}
DEFAULTS_TABLE = "[defaults]\nsample_steps = 2\n"


def _toml(values: dict[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


class Daemon:
    """One daemon tree: inbox/, outbox/, var/, a config file; start/stop/kill the process."""

    def __init__(
        self,
        root: Path,
        *,
        fake: bool = True,
        config: dict[str, Any] | None = None,
        weights_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.state = root / "var"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.config = root / "infinitetalk.toml"
        values = {**BASE_CONFIG, **(config or {})}
        if weights_dir is None and fake:
            # the fake pipeline needs no weights; this marker tells the daemon the chunk length
            weights_dir = root / "weights"
            weights_dir.mkdir(exist_ok=True)
            (weights_dir / "tiny.json").write_text('{"generation": {"frame_num": 5, "motion_frame": 1}}')
        if weights_dir is not None:
            values["weights_dir"] = str(weights_dir)
        self.config.write_text(_toml(values) + DEFAULTS_TABLE)
        self.fake = fake
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "daemon.log"

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "daemon", "daemon", "--config", str(self.config), *extra]
        if self.fake:
            args += ["--pipeline-factory", FAKE]
        log = open(self.log, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(args, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon", *args, "--config", str(self.config)],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    # ---------------------------------------------------------------- ledger (read-only)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        path = self.state / "ledger.sqlite3"
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, args)]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def jobs(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM jobs ORDER BY seq")

    def job(self, name: str) -> dict[str, Any] | None:
        rows = [j for j in self.jobs() if j["name"] == name]
        return rows[-1] if rows else None

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]:
        if job_id is None:
            return self._query("SELECT * FROM events ORDER BY id")
        return self._query("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            out[row["state"]] = row["n"]
        return out

    def wait_for(
        self,
        predicate: Callable[[], Any],
        timeout: float = 60.0,
        what: str = "condition",
        every: Callable[[], None] | None = None,
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if every is not None:
                every()
            if self.proc is not None and self.proc.poll() is not None and self.proc.returncode not in (None,):
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) while waiting for {what}:\n"
                    + self.log.read_text()[-4000:]
                )
            time.sleep(0.05)
        raise AssertionError(
            f"timed out waiting for {what}; jobs: {json.dumps(self.jobs(), default=str)[:3000]}\n"
            + self.log.read_text()[-4000:]
        )

    def wait_state(self, name: str, states: str | tuple[str, ...], timeout: float = 60.0) -> dict[str, Any]:
        wanted = (states,) if isinstance(states, str) else states
        return self.wait_for(
            lambda: (j := self.job(name)) is not None and j["state"] in wanted and j,
            timeout,
            f"{name} in {wanted}",
        )
