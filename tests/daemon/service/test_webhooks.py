"""Webhooks when a job ends, through the real daemon process and a real HTTP receiver on
127.0.0.1: a signed JSON body for done, failed, rejected and cancelled; an endpoint that answers
500 is retried with backoff and given up; one that never answers times out without slowing
intake or renders; every attempt is in the ledger and in `status --json`."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle

pytestmark = pytest.mark.timeout(180)

SECRET = "s3cret-key"
TIMEOUT_S = 8.0
RETRY_S = 10.0


class Receiver:
    """/good answers 204, /fail answers 500, /slow holds the request until released (or 30 s)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.slow_started: list[float] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(
                    {"path": self.path, "body": body, "sig": self.headers.get("X-InfiniteTalk-Signature")}
                )
                if self.path == "/slow":
                    outer.slow_started.append(time.monotonic())
                    outer.release.wait(30)
                    code = 200
                else:
                    code = 204 if self.path == "/good" else 500
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the daemon gave up on /slow already

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.received if r["path"] == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _daemon(root: Path, receiver: Receiver) -> Daemon:
    d = Daemon(root)
    urls = [receiver.url(p) for p in ("/good", "/fail", "/slow")]
    d.config.write_text(
        d.config.read_text()
        + "\n[notify]\n"
        + f"webhook_urls = {json.dumps(urls)}\n"
        + f'webhook_secret = "{SECRET}"\n'
        + f"webhook_timeout_s = {TIMEOUT_S}\n"
        + f"webhook_retry_s = {RETRY_S}\n"
    )
    return d


def _bundle(d: Daemon, name: str, **settings: Any) -> None:
    staging = d.inbox / f".{name}.tmp"
    make_job_bundle(staging, duration_s=1.0, seed=settings.pop("seed", 0), **settings)
    os.rename(staging, d.inbox / name)


def _by_name(bodies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {b["job"]["name"]: b["job"] for b in bodies}


def test_webhooks_for_every_ending_signed_retried_and_never_blocking(
    tmp_path: Path, receiver: Receiver
) -> None:
    d = _daemon(tmp_path, receiver)
    _bundle(d, "alice", seed=1)
    d.start()
    d.wait_state("alice", "done")
    d.wait_for(lambda: "alice" in _by_name(receiver.bodies("/good")), 20, "alice's webhook")

    # /slow now holds alice's POST for TIMEOUT_S: intake and renders go on meanwhile
    d.wait_for(lambda: receiver.slow_started, 10, "the POST to /slow")
    dropped = time.monotonic()
    _bundle(d, "bob", seed=2)
    _bundle(d, "broken", seed=3, prompt="BROKEN on purpose")
    (d.inbox / "bad").mkdir()
    (d.inbox / "bad" / "job.json").write_text("{not json")
    d.wait_state("bob", "done")
    d.wait_state("broken", "failed")
    d.wait_state("bad", "rejected")
    # all three were taken, rendered and ended while the first POST to /slow still hung
    assert time.monotonic() < receiver.slow_started[0] + TIMEOUT_S, "a hanging endpoint slowed the daemon"
    assert len(receiver.slow_started) == 1 and time.monotonic() - dropped < TIMEOUT_S

    # a job that stays waiting (its checksums never match) is cancelled
    _bundle(d, "carol", seed=4, checksums={"face.png": "0" * 64, "voice.WAV": "0" * 64})
    carol = d.wait_state("carol", "waiting")
    out = d.cli("cancel", carol["id"])
    assert out.returncode == 0, out.stderr
    d.wait_state("carol", "cancelled")

    good = d.wait_for(
        lambda: len(b := _by_name(receiver.bodies("/good"))) == 5 and b, 20, "five webhooks on /good"
    )
    assert {n: j["state"] for n, j in good.items()} == {
        "alice": "done",
        "bob": "done",
        "broken": "failed",
        "bad": "rejected",
        "carol": "cancelled",
    }
    alice = good["alice"]
    assert alice["id"] == d.job("alice")["id"]  # type: ignore[index]
    assert alice["outputs"]["video"] == str(d.outbox / "alice.mp4") and alice["error"] is None
    # the sidecar records the service's version (and the checkout's commit: tests run from one)
    from daemon import version

    service = json.loads((d.outbox / "alice.json").read_text())["service"]
    assert service == {"version": version.version(), "git_commit": version.git_commit()}
    assert service["version"] and service["version"] != "unknown"
    assert set(alice["timings"]) == {"created_at", "queued_at", "started_at", "finished_at", "render_s"}
    assert alice["timings"]["finished_at"] >= alice["timings"]["started_at"] > 0
    assert good["bad"]["error"]["code"] and good["broken"]["error"]["message"]
    assert good["bob"]["outputs"] and not good["broken"]["outputs"]
    for r in receiver.received:  # every POST, on every URL and attempt, carries a valid signature
        expected = "sha256=" + hmac.new(SECRET.encode(), r["body"], hashlib.sha256).hexdigest()
        assert r["sig"] == expected

    # /fail: retried with backoff (1 s, 2 s, ...) until RETRY_S after the ending, then given up
    def attempts(url_path: str, job: str) -> list[dict[str, Any]]:
        job_id = d.job(job)["id"]  # type: ignore[index]
        return d.query(
            "SELECT * FROM webhook_deliveries WHERE url = ? AND job_id = ? ORDER BY id",
            (receiver.url(url_path), job_id),
        )

    fails = d.wait_for(
        lambda: (a := attempts("/fail", "alice")) and a[-1]["outcome"] == "given_up" and a,
        30,
        "alice's /fail delivery given up",
    )
    assert [a["attempt"] for a in fails] == list(range(1, len(fails) + 1)) and len(fails) >= 3
    assert all(a["status"] == 500 and a["error"].startswith("HTTP 500") for a in fails), fails
    assert [a["next_retry_s"] for a in fails] == [2.0 ** (n - 1) for n in range(1, len(fails))] + [None]
    gaps = [b["at"] - a["at"] for a, b in zip(fails, fails[1:], strict=False)]
    assert all(g >= 0.9 for g in gaps), gaps
    assert fails[-1]["at"] - fails[0]["at"] <= RETRY_S + 1.0
    assert [a["outcome"] for a in attempts("/good", "alice")] == ["delivered"]
    slow = d.wait_for(lambda: attempts("/slow", "alice"), 20, "alice's /slow attempt recorded")
    assert slow[0]["error"] == f"timed out after {TIMEOUT_S:g} s" and slow[0]["status"] is None

    # status --json shows the attempts
    out = d.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    hooks = json.loads(out.stdout)["webhooks"]
    assert hooks["counts"]["delivered"] >= 5 and hooks["counts"]["retrying"] >= 2
    assert hooks["recent"] and {"url", "outcome", "status", "error", "attempt", "job_id"} <= set(
        hooks["recent"][0]
    )
    assert d.stop() == 0
