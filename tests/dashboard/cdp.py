"""Headless Chromium driven over the Chrome DevTools Protocol (websocket-client), for tests.

`Browser.start(tmp)` launches Debian's `chromium` with a throw-away profile and
`--remote-debugging-port=0`, reads the port Chromium chose from `DevToolsActivePort`, and attaches
to its first page. `Page` methods are synchronous: `goto`, `evaluate`, `wait_for`, `screenshot`.
Console errors, uncaught exceptions (CSP violations among them) and network responses are kept.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=1280,900",
)


class CDPError(RuntimeError):
    pass


#: what Chromium answers an evaluation that races a navigation
_NAVIGATING = ("navigated or closed", "Execution context was destroyed", "Cannot find context")


@dataclass
class Page:
    ws: websocket.WebSocket
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    errors: list[str] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            if message.get("id") == msg_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self._on_event(message)
        raise TimeoutError(f"no answer to {method} in {timeout_s} s")

    def _on_event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(
                f"{params['entry'].get('source')}: {params['entry']['text']} {params['entry'].get('url', '')}"
            )
        elif method == "Network.responseReceived":
            self.responses.append(
                {
                    "url": params["response"]["url"],
                    "status": params["response"]["status"],
                    "headers": params["response"].get("headers", {}),
                }
            )

    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 20.0, interval_s: float = 0.1) -> Any:
        """Poll `expression` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        value: Any = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except CDPError as e:
                # a page in the middle of a navigation (a form submit, a link) has no context to
                # evaluate in yet: that is "not yet", not a failure
                if not any(m in str(e) for m in _NAVIGATING):
                    raise
                value = None
            if value:
                return value
            self.pump(interval_s)
        raise TimeoutError(f"{expression!r} still {value!r} after {timeout_s} s; page errors: {self.errors}")

    def pump(self, seconds: float) -> None:
        """Read events for `seconds` (keeps console errors and responses flowing in)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                self._on_event(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                return

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@dataclass
class Browser:
    proc: subprocess.Popen[bytes]
    page: Page

    @classmethod
    def start(cls, profile: Path, *, width: int = 1280, height: int = 900) -> Browser:
        exe = shutil.which("chromium")
        if exe is None:
            raise RuntimeError(
                "Debian's chromium is needed for the browser tests (scripts/system-deps installs it)"
            )
        profile.mkdir(parents=True, exist_ok=True)
        log = (profile / "chromium.log").open("wb")
        proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            port = _devtools_port(profile, proc)
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            target = next(t for t in targets if t["type"] == "page")
            ws = websocket.create_connection(target["webSocketDebuggerUrl"], suppress_origin=True, timeout=30)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        page = Page(ws=ws)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.call(f"{domain}.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return cls(proc=proc, page=page)

    def close(self) -> None:
        try:
            self.page.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"chromium exited with {proc.returncode}: {(profile / 'chromium.log').read_text()}"
            )
        if marker.exists():
            lines = marker.read_text().splitlines()
            if lines and lines[0].isdigit():
                return int(lines[0])
        time.sleep(0.1)
    raise TimeoutError(f"chromium wrote no {marker} in {timeout_s} s")


def text_of(selector: str) -> str:
    """A JavaScript expression: the text of the first element matching `selector` ('' if none)."""
    return f"(document.querySelector({selector!r})?.textContent || '')"


def shot(page: Page, folder: Path, name: str) -> Path:
    """A screenshot of `page` as `folder/name`; also kept (256 colours, small enough for git) in
    $INFINITETALK_SCREENSHOT_DIR when that is set."""
    from PIL import Image

    path = page.screenshot(folder / name)
    target = os.environ.get("INFINITETALK_SCREENSHOT_DIR")
    if target:
        with Image.open(path) as img:
            img.convert("RGB").quantize(colors=256).save(Path(target) / name, optimize=True)
    return path
