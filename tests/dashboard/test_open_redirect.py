"""The `?token=` redirect stays on this origin, against a real uvicorn process (raw HTTP requests,
so nothing on the client side normalises the request target)."""

from __future__ import annotations

import socket
import urllib.parse
from pathlib import Path

import pytest

from daemon.ledger import Ledger
from dashboard.security import same_origin_location
from tests.dashboard.server_proc import dashboard_server, write_config
from tests.helpers.proc import free_port

TOKEN = "s3cret-token"

#: request targets that tried to send the browser elsewhere once the token was valid
HOSTILE_TARGETS = [
    "//evil.example/x",
    "///evil.example/x",
    "//evil.example",
    "/\\evil.example/x",
    "/\\/evil.example",
    "/%5Cevil.example",
    "/%2F%2Fevil.example",
    "/%2Fevil.example/x",
    "/%09/evil.example",
    "/%0A/evil.example",
    "/%0d%0aLocation:%20http://evil.example/",
    "/%20//evil.example",
    "/http://evil.example/x",
    "/https:%2F%2Fevil.example",
    "/javascript:alert(1)",
]


def raw_get(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    return status, {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}


def assert_same_origin(location: str, base: str) -> None:
    assert location.startswith("/") and location[1:2] not in ("/", "\\"), location
    assert not any(c in location for c in "\\\t\r\n ") and location.isascii(), location
    for prefix in ("", " ", "\t"):  # browsers strip leading blanks, tabs and newlines
        joined = urllib.parse.urljoin(base + "/jobs/", prefix + location)
        assert urllib.parse.urlsplit(joined).netloc == urllib.parse.urlsplit(base).netloc, (location, joined)


@pytest.mark.timeout(120)
def test_token_redirect_never_leaves_the_origin(
    tmp_path: Path, ledger: Ledger, state_dir: Path, outbox: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path / "dash.toml", state_dir=state_dir, outbox=outbox, port=port, token=TOKEN)
    with dashboard_server(config, port, tmp_path / "dashboard.log") as (url, _proc):
        for target in HOSTILE_TARGETS:
            sep = "&" if "?" in target else "?"
            status, headers = raw_get(port, f"{target}{sep}token={TOKEN}&x=1")
            if status == 400:  # the HTTP parser refused the target itself: nothing redirected
                continue
            assert status == 303, (target, status, headers)
            location = headers["location"]
            assert_same_origin(location, url)
            assert location.endswith("?x=1") and TOKEN not in location
            # the Location names the same resource: with the cookie it answers as the original
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert raw_get(port, location, auth)[0] == raw_get(port, target, auth)[0], (target, location)
        # an ordinary page still comes back to itself
        status, headers = raw_get(port, f"/jobs/abc?token={TOKEN}&x=1")
        assert status == 303 and headers["location"] == "/jobs/abc?x=1"


@pytest.mark.parametrize(
    "path", [t for t in HOSTILE_TARGETS if "%" not in t] + ["/a b/ü", "\\\\evil", "evil"]
)
def test_same_origin_location_for_decoded_paths(path: str) -> None:
    """The same rule on decoded paths (what the ASGI scope holds), including the ones HTTP
    parsers refuse on the wire."""
    for decoded in (path, urllib.parse.unquote(path)):
        location = same_origin_location(decoded, "x=1")
        assert_same_origin(location, "http://127.0.0.1:8000")
        assert urllib.parse.unquote(location.split("?")[0]) == (
            decoded if decoded.startswith("/") else "/" + decoded
        )
