"""Who may use the web page, and from where.

- Off loopback the server refuses to start without credentials (`check_bind`).
- With credentials, every page but the login form and the static files needs a session (a random id in an
  HttpOnly cookie, kept in this process's memory: a restart logs everyone out) or HTTP basic auth.
- Without credentials (loopback only) the Host header must name a loopback address: a web site that
  rebinds its own name to 127.0.0.1 cannot read or drive the page.
- Every POST must carry the per-session CSRF token of its cookie, as the `csrf_token` form field or the
  `X-CSRF-Token` header, and a cross-origin `Origin` is refused.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from core.settings import Settings

CSRF_COOKIE = "waifu_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_COOKIE = "waifu_session"
SESSION_SECONDS = 12 * 3600
PUBLIC_PREFIXES = ("/static/", "/login")
# no inline script or style, nothing from elsewhere, never inside another site's frame (keyboard actions)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class StartRefused(RuntimeError):
    """The server must not start with this configuration; the message says what to set."""


def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other name may resolve anywhere


def check_bind(host: str, settings: Settings) -> None:
    """Raises StartRefused for half-set credentials, or a non-loopback address without credentials."""
    user = settings.web_user or ""
    password = settings.web_password.get_secret_value() if settings.web_password else ""
    if bool(user) != bool(password):
        raise StartRefused("set both WAIFU_WEB_USER and WAIFU_WEB_PASSWORD, or neither")
    if not is_loopback(host) and not user:
        raise StartRefused(
            f"refusing to serve on {host}: not a loopback address and no credentials "
            "(set WAIFU_WEB_USER and WAIFU_WEB_PASSWORD, or use --host 127.0.0.1)"
        )


@dataclass
class Login:
    """The configured credentials and the sessions opened with them (in memory)."""

    user: str = ""
    password: str = ""
    sessions: dict[str, float] = field(default_factory=dict)  # session id -> expiry (monotonic)

    @classmethod
    def from_settings(cls, settings: Settings) -> Login:
        password = settings.web_password.get_secret_value() if settings.web_password else ""
        return cls(settings.web_user or "", password)

    @property
    def required(self) -> bool:
        return bool(self.user and self.password)

    def matches(self, user: str, password: str) -> bool:
        # both compared every time: the answer takes as long whichever was wrong
        ok_user = secrets.compare_digest(user.encode(), self.user.encode())
        ok_password = secrets.compare_digest(password.encode(), self.password.encode())
        return ok_user and ok_password

    def open_session(self) -> str:
        now = time.monotonic()
        self.sessions = {k: v for k, v in self.sessions.items() if v > now}
        session_id = secrets.token_urlsafe(32)
        self.sessions[session_id] = now + SESSION_SECONDS
        return session_id

    def close_session(self, session_id: str | None) -> None:
        self.sessions.pop(session_id or "", None)

    def allows(self, request: Request) -> bool:
        if not self.required:
            return True
        expiry = self.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if expiry is not None and expiry > time.monotonic():
            return True
        return self._basic_auth(request.headers.get("authorization", ""))

    def _basic_auth(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return self.matches(user, password)


def local_target(target: str | None) -> str:
    """Where to go after logging in: a path on this site only (never `//host` or a full URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/"


def _csrf_token_format(value: str | None) -> bool:
    return bool(value) and 20 <= len(value) <= 100 and value.replace("-", "").replace("_", "").isalnum()


class Guard(BaseHTTPMiddleware):
    """Host check, login, CSRF cookie and CSRF check on every POST, before any route runs."""

    def __init__(self, app, login: Login) -> None:
        super().__init__(app)
        self.login = login

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if not self.login.required and not is_loopback(request.url.hostname or ""):
            return PlainTextResponse("this server answers to loopback names only (it has no login)", 400)
        cookie = request.cookies.get(CSRF_COOKIE)
        fresh = None if _csrf_token_format(cookie) else secrets.token_urlsafe(32)
        request.state.csrf = cookie if fresh is None else fresh
        response = await self._guarded(request, call_next, None if fresh else cookie)
        if fresh:
            response.set_cookie(CSRF_COOKIE, fresh, httponly=True, samesite="strict", path="/")
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _guarded(self, request: Request, call_next: RequestResponseEndpoint, cookie: str | None) -> Response:
        public = request.url.path.startswith(PUBLIC_PREFIXES)
        if not public and not self.login.allows(request):
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
            return PlainTextResponse(
                "log in first (or use HTTP basic auth)", 401, headers={"WWW-Authenticate": 'Basic realm="waifu"'}
            )
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            refusal = await self._csrf_refusal(request, cookie)
            if refusal:
                return PlainTextResponse(refusal, 403)
        return await call_next(request)

    @staticmethod
    async def _csrf_refusal(request: Request, cookie: str | None) -> str | None:
        origin = request.headers.get("origin")
        if origin and origin != "null":
            parts = urlsplit(origin)
            if parts.netloc != request.headers.get("host", ""):
                return f"cross-origin request from {origin} refused"
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            # the body stays readable for the route (Starlette replays it)
            values = parse_qs((await request.body()).decode("utf-8", "replace")).get(CSRF_FIELD, [])
            sent = values[0] if values else None
        if not cookie or not sent or not secrets.compare_digest(cookie.encode(), sent.encode()):
            return "missing or wrong CSRF token: reload the page and try again"
        return None
