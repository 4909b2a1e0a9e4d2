"""Webhooks when a job ends: `[notify] webhook_urls`, `webhook_secret` (docs/daemon.md "Webhooks").

Every ending is an event in the ledger (`done`, `failed`, `rejected`, `cancelled`), written by
whatever path ended the job (a render, intake, a `cancel`, recovery). The daemon's main loop calls
`Webhooks.tick()`: it reads the final events written since the last tick, builds one JSON body per
ending and hands it to one sender thread per URL (a bounded queue; a full queue drops the delivery
and records that). The senders POST with `urllib.request`, never touch the ledger, and retry a
failure (no answer, a timeout, a status other than 2xx) with backoff (1 s, doubling, at most
60 s apart) until `webhook_retry_s` after the ending, then give up. Each attempt's result comes
back to the main loop through a queue, and `tick()` records it in the ledger's
`webhook_deliveries` table (the ledger keeps its one writer). A dead endpoint therefore costs
the main loop nothing: intake and renders never wait for a POST.

The body (UTF-8 JSON, the same bytes on every attempt): `{"event": "job.ended", "delivery":
EVENT_ID, "job": {"id", "name", "state", "outputs": {"video", "poster", "json"}, "error": {"code",
"message", "field"} | null, "timings": {"created_at", "queued_at", "started_at", "finished_at",
"render_s"}, "duration_s", "frames", "attempts", "duplicate_of"}}`. With a secret, the header
`X-InfiniteTalk-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>`; the receiver
computes the same over the raw body and compares in constant time (`hmac.compare_digest`).

Not sent: endings while no daemon runs (a `cancel` the command applied itself), and retries still
pending when the daemon stops (the attempts made are in the ledger).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import queue
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

FINAL_KINDS = ("done", "failed", "rejected", "cancelled")
SIGNATURE_HEADER = "X-InfiniteTalk-Signature"
#: deliveries waiting per URL; more are dropped (and recorded as such)
QUEUE_MAX = 1000
FIRST_RETRY_S = 1.0
MAX_RETRY_GAP_S = 60.0
#: attempts shown by `infinitetalk status --json`
RECENT = 20


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=<hex HMAC-SHA256 of body>`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def payload(job: Any, state: str, event_id: int) -> bytes:
    """The body for `job` (a `daemon.ledger.JobRow`) ending in `state` (the event's kind)."""
    error = None
    if job.error_code or job.error_message:
        error = {"code": job.error_code, "message": job.error_message, "field": job.error_field}
    outputs = {"video": job.output_video, "poster": job.output_poster, "json": job.output_json}
    doc = {
        "event": "job.ended",
        "delivery": event_id,
        "job": {
            "id": job.id,
            "name": job.name,
            "state": state,
            "outputs": {k: v for k, v in outputs.items() if v} if state == "done" else {},
            "error": error if state != "done" else None,
            "timings": {
                "created_at": job.created_at,
                "queued_at": job.queued_at,
                "started_at": job.started_at,
                "finished_at": job.finished_at,
                "render_s": job.render_s,
            },
            "duration_s": job.duration_s,
            "frames": job.frames,
            "attempts": job.attempts,
            "duplicate_of": job.duplicate_of,
        },
    }
    return json.dumps(doc, sort_keys=True).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: int
    job_id: str
    url: str
    body: bytes
    #: monotonic time after which no retry starts
    give_up_at: float


@dataclass(frozen=True, slots=True)
class Attempt:
    """One POST and what came of it (one `webhook_deliveries` row)."""

    event_id: int
    job_id: str
    url: str
    attempt: int
    at: float
    outcome: str  #: delivered, retrying, given_up, dropped
    status: int | None = None
    error: str | None = None
    duration_s: float = 0.0
    next_retry_s: float | None = None


def post(url: str, body: bytes, secret: str, timeout_s: float) -> tuple[int | None, str | None]:
    """POST once: (HTTP status or None, error text or None when it was a 2xx)."""
    headers = {"Content-Type": "application/json", "User-Agent": "infinitetalk-webhook"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as e:
        return e.code, f"HTTP {e.code} {e.reason}"
    except TimeoutError:
        return None, f"timed out after {timeout_s:g} s"
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            return None, f"timed out after {timeout_s:g} s"
        return None, f"cannot connect: {e.reason}"
    except (OSError, ValueError) as e:  # a reset connection, a malformed answer
        return None, f"{type(e).__name__}: {e}"
    if 200 <= status < 300:
        return status, None
    return status, f"HTTP {status}"


class Sender(threading.Thread):
    """POSTs to one URL, one delivery at a time; retries wait in a heap (due time, delivery)."""

    def __init__(self, url: str, secret: str, timeout_s: float, results: queue.Queue[Attempt]) -> None:
        super().__init__(name=f"webhook {url}", daemon=True)
        self.url = url
        self.secret = secret
        self.timeout_s = timeout_s
        self.results = results
        self.inbox: queue.Queue[Delivery] = queue.Queue(maxsize=QUEUE_MAX)
        self.stopping = threading.Event()
        self._retries: list[tuple[float, int, Delivery, int]] = []  # (due, tie, delivery, attempts made)
        self._tie = 0

    def idle(self) -> bool:
        """Nothing queued and no POST in flight (retries waiting in the heap do not count)."""
        return self.inbox.unfinished_tasks == 0

    def run(self) -> None:
        while not self.stopping.is_set():
            wait = 0.5
            if self._retries:
                wait = max(0.0, min(wait, self._retries[0][0] - time.monotonic()))
            try:
                delivery = self.inbox.get(timeout=wait)
            except queue.Empty:
                pass
            else:
                self._send(delivery, 0)
                self.inbox.task_done()
            while self._retries and self._retries[0][0] <= time.monotonic() and not self.stopping.is_set():
                _, _, delivery, made = heapq.heappop(self._retries)
                self._send(delivery, made)

    def _send(self, delivery: Delivery, made: int) -> None:
        started = time.monotonic()
        status, error = post(self.url, delivery.body, self.secret, self.timeout_s)
        now = time.monotonic()
        attempt = made + 1
        outcome, next_retry = "delivered", None
        if error is not None:
            gap = min(MAX_RETRY_GAP_S, FIRST_RETRY_S * 2 ** (attempt - 1))
            if now + gap <= delivery.give_up_at:
                outcome, next_retry = "retrying", gap
                self._tie += 1
                heapq.heappush(self._retries, (now + gap, self._tie, delivery, attempt))
            else:
                outcome = "given_up"
        self.results.put(
            Attempt(
                delivery.event_id,
                delivery.job_id,
                self.url,
                attempt,
                time.time(),
                outcome,
                status,
                error,
                round(now - started, 3),
                next_retry,
            )
        )


class Webhooks:
    """The main loop's side: find endings, hand them to the senders, record the attempts."""

    def __init__(self, settings: Any, ledger: Any) -> None:
        self.settings = settings
        self.ledger = ledger
        self.results: queue.Queue[Attempt] = queue.Queue()
        self.senders = [
            Sender(url, settings.webhook_secret, settings.webhook_timeout_s, self.results)
            for url in settings.webhook_urls
        ]
        #: the newest event already looked at; endings before this daemon started are not sent
        self.cursor = int(ledger.conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])
        for sender in self.senders:
            sender.start()
        if self.senders:
            logger.info("webhooks: %d URL(s) are told when a job ends", len(self.senders))

    def tick(self) -> None:
        """Queue the endings written since the last call; record the attempts that came back."""
        if not self.senders:
            return
        rows = self.ledger.conn.execute(
            f"SELECT id, job_id, kind FROM events WHERE id > ? AND kind IN ({', '.join('?' * len(FINAL_KINDS))})"
            " ORDER BY id LIMIT 500",
            (self.cursor, *FINAL_KINDS),
        ).fetchall()
        for event_id, job_id, kind in rows:
            self.cursor = max(self.cursor, int(event_id))
            job = self.ledger.find(job_id) if job_id else None
            if job is None:
                continue
            body = payload(job, kind, int(event_id))
            give_up_at = time.monotonic() + self.settings.webhook_retry_s
            for sender in self.senders:
                try:
                    sender.inbox.put_nowait(Delivery(int(event_id), job_id, sender.url, body, give_up_at))
                except queue.Full:
                    error = f"more than {QUEUE_MAX} deliveries waiting for this URL"
                    self.results.put(
                        Attempt(int(event_id), job_id, sender.url, 0, time.time(), "dropped", error=error)
                    )
        self._record()

    def _record(self) -> None:
        while True:
            try:
                attempt = self.results.get_nowait()
            except queue.Empty:
                return
            log = logger.info if attempt.outcome == "delivered" else logger.warning
            log(
                "webhook for job %s to %s: attempt %d %s%s",
                attempt.job_id,
                attempt.url,
                attempt.attempt,
                attempt.outcome,
                f" ({attempt.error})" if attempt.error else "",
            )
            try:
                with self.ledger.fail_fast():  # best effort, like progress: a full disk skips it
                    self.ledger.record_webhook_attempt(asdict(attempt))
            except sqlite3.OperationalError as e:
                logger.warning("webhook attempt not recorded in the ledger: %s", e)

    def close(self) -> None:
        """Stop the senders: deliveries already queued get their first attempt (at most
        `webhook_timeout_s` + 1 s, 10 s at most, in all: `--once` ends after the last job's
        webhook); retries still waiting are dropped."""
        timeout_s = min(10.0, self.settings.webhook_timeout_s + 1.0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(s.idle() for s in self.senders):
            time.sleep(0.05)
        for sender in self.senders:
            sender.stopping.set()
        deadline = time.monotonic() + timeout_s
        for sender in self.senders:
            sender.join(max(0.0, deadline - time.monotonic()))
        self._record()


def summary(conn: sqlite3.Connection, recent: int = RECENT) -> dict[str, Any]:
    """For `infinitetalk status --json`: attempts per outcome and the newest attempts (any
    connection; a ledger from before the table existed gives zeros)."""
    try:
        counts = dict(conn.execute("SELECT outcome, COUNT(*) FROM webhook_deliveries GROUP BY outcome"))
        rows = conn.execute(
            "SELECT event_id, job_id, url, attempt, at, outcome, status, error, duration_s, next_retry_s"
            " FROM webhook_deliveries ORDER BY id DESC LIMIT ?",
            (recent,),
        ).fetchall()
    except sqlite3.OperationalError:
        return {"counts": {}, "recent": []}
    keys = (
        "event_id",
        "job_id",
        "url",
        "attempt",
        "at",
        "outcome",
        "status",
        "error",
        "duration_s",
        "next_retry_s",
    )
    return {"counts": counts, "recent": [dict(zip(keys, tuple(r), strict=True)) for r in rows]}
