"""The dashboard's guards, as plain ASGI middleware (they wrap streaming responses untouched).

- `ReadOnlyMiddleware`: GET and HEAD only; anything else is 405 with `Allow: GET, HEAD`, before
  routing, so no path accepts a write.
- `TokenMiddleware`: when a token is configured, every path but `/healthz` needs it, given as
  `Authorization: Bearer <token>`, as the `infinitetalk_token` cookie, or once as `?token=` (the
  page then sets the cookie and redirects to the same URL without it). That redirect never leaves
  this origin: its Location is built from the request's path alone (`same_origin_location`).
- `SecurityHeadersMiddleware`: a strict Content-Security-Policy (scripts and styles only from
  /static, no inline code), nosniff, no referrer, same-origin resources, no framing.

The Host header check against DNS rebinding is Starlette's `TrustedHostMiddleware`.
"""

from __future__ import annotations

import hmac
import urllib.parse
from http.cookies import CookieError, SimpleCookie

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SAFE_METHODS = ("GET", "HEAD")
TOKEN_COOKIE = "infinitetalk_token"
PUBLIC_PATHS = ("/healthz",)

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "media-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "x-frame-options": "DENY",
}


class ReadOnlyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            response = PlainTextResponse(
                f"method {scope['method']} not allowed: this dashboard is read-only",
                status_code=405,
                headers={"Allow": ", ".join(SAFE_METHODS)},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _presented_token(scope: Scope) -> str | None:
    headers = Headers(scope=scope)
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    cookies = SimpleCookie()
    try:
        cookies.load(headers.get("cookie", ""))
    except CookieError:  # a malformed cookie header is just no cookie
        return None
    morsel = cookies.get(TOKEN_COOKIE)
    return morsel.value if morsel else None


#: path characters kept as they are in a Location; everything else (backslash, controls, spaces,
#: `%`, `?`, `#`, non-ASCII) is percent-encoded, so a browser cannot read a host out of it
_PATH_SAFE = "/!$&'()*+,;=:@-._~"


def same_origin_location(path: str, query: str = "") -> str:
    """A Location header for `path` (decoded, as in the ASGI scope) that stays on this origin.

    It is always an absolute path: it starts with exactly one `/` followed by something other
    than `/` or `\\`, so no browser takes it for `//host/...` (protocol-relative) or `/\\host`
    (which browsers read as `//host`); a tab or newline (which browsers drop from URLs) and a
    scheme (`http:`) cannot come first either. The path means the same to this server: a second
    leading slash becomes `%2F`, which decodes back to it.
    """
    quoted = urllib.parse.quote(path, safe=_PATH_SAFE)
    if not quoted.startswith("/"):
        quoted = "/" + quoted
    if quoted.startswith("//"):
        quoted = "/%2F" + quoted[2:]
    return quoted + (f"?{query}" if query else "")


class TokenMiddleware:
    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("TokenMiddleware needs a non-empty token")
        self.app = app
        self.token = token.encode()

    def _matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if self._matches(_presented_token(scope)):
            await self.app(scope, receive, send)
            return
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if self._matches((query.get("token") or [None])[0]):
            rest = urllib.parse.urlencode([(k, v) for k, vs in query.items() if k != "token" for v in vs])
            redirect = RedirectResponse(same_origin_location(scope["path"], rest), status_code=303)
            redirect.set_cookie(TOKEN_COOKIE, self.token.decode(), httponly=True, samesite="strict", path="/")
            await redirect(scope, receive, send)
            return
        response = PlainTextResponse(
            "this dashboard needs its access token: open it once as /?token=<token> or send "
            "'Authorization: Bearer <token>'",
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="infinitetalk"'},
        )
        await response(scope, receive, send)
