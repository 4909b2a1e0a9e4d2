"""Waiting out a full disk: the state dir full pauses intake and makes ledger writes wait (renders
under way go on); the outbox full is the endings' business (daemon/endings.py `retry_failures`).

`SpaceWait` is owned by the main loop (daemon/supervisor.py): `wait_for_space` is the ledger's
`on_full` hook, `scan` runs one intake scan that a full state dir pauses instead of stopping
the daemon, and `returned` logs once that writes go on.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from daemon.config import Settings
from daemon.errors import StateDirFull, is_disk_full
from daemon.intake import Intake
from daemon.ledger import Ledger
from daemon.sdnotify import Notifier

logger = logging.getLogger(__name__)


class SpaceWait:
    def __init__(
        self, settings: Settings, notifier: Notifier, stop: threading.Event, force: threading.Event
    ) -> None:
        self.settings = settings
        self.notifier = notifier
        self.stop = stop
        self.force = force
        #: monotonic time intake was last reported paused because the state dir is full (0: not paused)
        self.intake_paused_logged = 0.0
        #: monotonic time a ledger write started waiting for space in the state dir (0: not waiting)
        self.full_since = 0.0

    def scan(self, intake: Intake, ledger: Ledger) -> None:
        """One intake scan; a full state dir (ledger or claimed inputs) pauses intake, not the daemon."""
        try:
            with ledger.fail_fast():
                intake.scan_once()
        except (sqlite3.OperationalError, OSError) as e:
            if not is_disk_full(e):
                raise
            now = time.monotonic()
            if now - self.intake_paused_logged >= 60:
                self.intake_paused_logged = now
                logger.error("%s is full (%s): intake paused until space returns", self.full_folder(e), e)
            self.notifier.status(f"intake paused: {self.full_folder(e)} is full")
            return
        if self.intake_paused_logged:
            self.intake_paused_logged = 0.0
            logger.info("state dir has room again: intake resumed")

    def full_folder(self, error: BaseException) -> str:
        """Which of the daemon's folders a disk-full error is about (for the log), by its text."""
        text = str(error)
        s = self.settings
        for what, folder in (("outbox", s.outbox), ("state dir", s.state_dir), ("inbox", s.inbox)):
            if str(folder) in text:
                return f"{what} {folder}"
        if isinstance(error, sqlite3.Error):
            return f"state dir {s.state_dir}"
        return f"state dir {s.state_dir} or outbox {s.outbox}"

    def wait_for_space(self, error: BaseException, attempt: int) -> None:
        """`Ledger.on_full`: a state change (job started, done, failed, requeued...) cannot be
        written because the state dir is full. Wait for space, keep the watchdog fed and try again;
        renders under way go on. Told to stop meanwhile, give up (`StateDirFull`): the jobs left
        running are queued again at the next start."""
        now = time.monotonic()
        state_dir = self.settings.state_dir
        if attempt == 1:
            if not self.full_since:
                self.full_since = now
                logger.error(
                    "state dir %s is full (%s): ledger writes wait until space returns", state_dir, error
                )
            self.notifier.status(f"waiting for space: state dir {state_dir} is full")
        elif attempt % 60 == 0:
            logger.error("state dir %s still full after %.0f s", state_dir, now - self.full_since)
        if self.stop.is_set() or self.force.is_set():
            raise StateDirFull(
                f"state dir {state_dir} is full and the daemon is stopping: {error}"
            ) from error
        self.notifier.ping_if_due()
        self.stop.wait(min(1.0, 0.1 * attempt))

    def returned(self) -> None:
        """The main loop got past a write that waited for space: say so once."""
        if self.full_since:
            logger.info(
                "state dir has room again after %.0f s: ledger writes go on",
                time.monotonic() - self.full_since,
            )
            self.full_since = 0.0
