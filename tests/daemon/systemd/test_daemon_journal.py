"""Under journald (`$JOURNAL_STREAM` names stderr) every line the daemon and its worker write
carries an sd-daemon priority prefix, so `journalctl -p warning` filters them by level."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PREFIX = re.compile(r"<[0-7]>")
#: the daemon unit's Environment= lines that keep library output to log lines
UNIT_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def test_every_daemon_line_has_a_priority(tmp_path: Path, tiny_weights_dir: Path) -> None:
    config = tmp_path / "infinitetalk.toml"
    config.write_text(
        f'inbox = "inbox"\noutbox = "outbox"\nstate_dir = "var"\nweights_dir = "{tiny_weights_dir}"\n'
        "tick_s = 0.1\nsettle_s = 0.3\n"
    )
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "broken.json").write_text("{not json")  # a rejection: one warning line
    journal = tmp_path / "journal"
    with open(journal, "wb") as err:
        st = os.fstat(err.fileno())
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env.update(UNIT_ENV, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "daemon", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=err,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all(
                word in journal.read_text(errors="replace") for word in ("model ready", "rejected")
            ):
                assert proc.poll() is None, journal.read_text(errors="replace")
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = journal.read_text().splitlines()
    assert any("model ready" in line for line in lines), lines
    unprefixed = [line for line in lines if not PREFIX.match(line)]
    assert not unprefixed, unprefixed
    assert any(line.startswith("<4>") and "broken" in line for line in lines), lines
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), "journald adds the time itself"
