"""Read-only and safe: methods, Host header, CSP and headers, token, files only by job id."""

from __future__ import annotations

import re
import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from daemon.ledger import Ledger
from dashboard import reader
from dashboard.app import STATIC_DIR, create_app
from dashboard.config import DashboardConfig, allowed_hosts_for
from dashboard.security import CSP
from tests.helpers.ledger import finish_job, queue_job, run_job

ROUTES = ["/", "/api/jobs", "/healthz", "/metrics", "/jobs/abc", "/jobs/abc/video", "/nowhere"]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_only_get_and_head(client: TestClient, ledger: Ledger, method: str) -> None:
    for path in ROUTES:
        response = client.request(method, path)
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == "GET, HEAD"
        assert response.headers["content-security-policy"] == CSP


def test_head_works_without_a_body(client: TestClient, ledger: Ledger) -> None:
    for path in ("/", "/api/jobs", "/healthz", "/static/app.css", "/static/common.js", "/events"):
        response = client.head(path)
        assert response.status_code == 200, path
        assert response.content == b""


def test_security_headers_on_every_response(client: TestClient, ledger: Ledger) -> None:
    for path in ROUTES + ["/static/index.js"]:
        headers = client.get(path).headers
        assert headers["content-security-policy"] == CSP, path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cross-origin-resource-policy"] == "same-origin"
        assert "access-control-allow-origin" not in headers
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP


class _PageAudit(HTMLParser):
    """Collects what a strict CSP would block: inline scripts, inline styles, event attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {k for k, _ in attrs}
        if tag == "script" and "src" not in names:
            self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("inline <style>")
        self.problems += [f"{tag} {k}=" for k in names if k == "style" or k.startswith("on")]
        for key, value in attrs:
            if key in ("src", "href") and value and re.match(r"(https?:)?//", value):
                self.problems.append(f"external {key}={value}")


@pytest.mark.parametrize("page", ["index.html", "job.html"])
def test_pages_have_no_inline_code_and_no_cdn(page: str) -> None:
    audit = _PageAudit()
    audit.feed((STATIC_DIR / page).read_text())
    assert audit.problems == []


def test_scripts_never_write_html_strings() -> None:
    for script in STATIC_DIR.glob("*.js"):
        text = script.read_text()
        for needle in (
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            'setAttribute("style',
        ):
            assert needle not in text, f"{script.name} uses {needle}"


def test_host_header_checked_against_dns_rebinding(client: TestClient, ledger: Ledger) -> None:
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "attacker.localhost.example"):
        response = client.get("/api/jobs", headers={"host": host})
        assert response.status_code == 400, host
        assert response.headers["content-security-policy"] == CSP


def test_allowed_hosts_follow_the_bind() -> None:
    assert allowed_hosts_for("127.0.0.1") == ("localhost", "127.0.0.1", "[::1]")
    assert allowed_hosts_for("::1") == ("localhost", "127.0.0.1", "[::1]")
    assert allowed_hosts_for("192.168.7.20") == ("localhost", "127.0.0.1", "[::1]", "192.168.7.20")
    assert "[fd00::5]" in allowed_hosts_for("fd00::5")
    wildcard = allowed_hosts_for("0.0.0.0")
    import socket

    assert socket.gethostname().lower() in wildcard and "localhost" in wildcard
    cfg = DashboardConfig(
        ledger_path=Path("x"), outbox=Path("y"), host="10.0.0.2", extra_hosts=("Render.Example.org",)
    )
    assert cfg.allowed_hosts[-2:] == ("10.0.0.2", "render.example.org")
    assert not cfg.is_local
    with pytest.raises(ValueError, match="70000"):
        DashboardConfig(ledger_path=Path("x"), outbox=Path("y"), port=70000)


def test_token_protects_everything_but_healthz(cfg: DashboardConfig, ledger: Ledger) -> None:
    from dataclasses import replace

    app = create_app(replace(cfg, token="s3cret-token"))
    with TestClient(app, base_url="http://127.0.0.1:8000", follow_redirects=False) as c:
        for path in ("/", "/api/jobs", "/events", "/metrics", "/static/common.js", "/jobs/abc/video"):
            response = c.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/healthz").status_code == 200
        assert c.get("/api/jobs", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/jobs", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
        assert c.get("/api/jobs?token=wrong").status_code == 401
        # opening the page once with ?token= sets an HttpOnly cookie and drops the token from the URL
        response = c.get("/jobs/abc?token=s3cret-token&x=1")
        assert response.status_code == 303 and response.headers["location"] == "/jobs/abc?x=1"
        cookie = response.headers["set-cookie"]
        assert "infinitetalk_token=s3cret-token" in cookie and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        assert c.get("/api/jobs").status_code == 200  # the client now sends the cookie
        c.cookies.clear()
        assert c.get("/api/jobs", headers={"cookie": "infinitetalk_token=nope"}).status_code == 401
        assert (
            c.get("/api/jobs", headers={"cookie": "a=1; infinitetalk_token=s3cret-token"}).status_code == 200
        )


def test_files_only_from_the_ledger_and_inside_the_outbox(
    client: TestClient, ledger: Ledger, outbox: Path, tmp_path: Path
) -> None:
    job = queue_job(ledger, "alice")
    run_job(ledger, job.id)
    finish_job(ledger, outbox, job.id, "alice")
    # a row pointing outside the outbox (a tampered or misconfigured ledger) is not served
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"not for the web")
    other = queue_job(ledger, "mallory")
    run_job(ledger, other.id)
    ledger.transition(
        other.id,
        "running",
        "done",
        output_video=str(outbox / ".." / "secret.mp4"),
        output_poster="/etc/passwd",
    )
    assert client.get(f"/jobs/{other.id}/video").status_code == 404
    assert client.get(f"/jobs/{other.id}/poster").status_code == 404
    # a symlink inside the outbox that leads out is not served either
    (outbox / "link.mp4").symlink_to(secret)
    ledger.set_columns(other.id, output_video=str(outbox / "link.mp4"))
    assert client.get(f"/jobs/{other.id}/video").status_code == 404
    # no path from the URL reaches the disk
    for path in (
        "/jobs/../secret.mp4/video",
        "/jobs/%2e%2e/video",
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/jobs/alice.mp4/video",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert b"not for the web" not in response.content
    assert client.get(f"/jobs/{job.id}/video").status_code == 200


def test_ledger_connection_is_read_only(ledger: Ledger, cfg: DashboardConfig) -> None:
    queue_job(ledger, "a")
    conn = reader.connect(cfg.ledger_path)
    try:
        assert conn.execute("PRAGMA query_only").fetchone()[0] == 1
        with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only"):
            conn.execute("UPDATE jobs SET state = 'done'")
        conn.execute("PRAGMA query_only=0")  # even without query_only the file is opened mode=ro
        with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only"):
            conn.execute("DELETE FROM events")
    finally:
        conn.close()
    assert ledger.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2
