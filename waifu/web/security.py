"""Who may use the web page, and from where.

Design notes: docs/architecture.md, `waifu/web/security.py`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass, field
from typing import TypeGuard
from urllib.parse import parse_qs, quote, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from core.settings import Settings
from waifu.web.api_auth import bearer_refusal, is_bearer, multipart_token
from waifu.web.throttle import Throttle, Throttled

VISITOR_COOKIE = "waifu_visitor"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_COOKIE = "waifu_session"
SESSION_S = 12 * 3600
MIN_PASSWORD = 12  # off loopback
MAX_NEXT = 2000  # characters of the page to return to after the login
PUBLIC_PREFIXES = ("/static/", "/login", "/api/openapi.json")
MIN_API_TOKEN = 16


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
    token = settings.web_api_token.get_secret_value() if settings.web_api_token else None
    if token is not None and len(token) < MIN_API_TOKEN:
        raise StartRefused(f"WAIFU_WEB_API_TOKEN has {len(token)} characters: it needs at least {MIN_API_TOKEN}")
    if not is_loopback(host) and len(password) < MIN_PASSWORD:
        raise StartRefused(
            f"refusing to serve on {host}: WAIFU_WEB_PASSWORD has {len(password)} characters, "
            f"off loopback it needs at least {MIN_PASSWORD}"
        )


@dataclass
class Login:
    """The configured credentials, the sessions opened with them (in memory), the guess throttle and the
    secret the CSRF tokens are made with."""

    user: str = ""
    password: str = ""
    sessions: dict[str, float] = field(default_factory=dict)  # session id -> expiry (monotonic)
    throttle: Throttle = field(default_factory=Throttle)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    secure_cookies: bool = False
    trust_proxy: bool = False
    api_token: str = field(default="", repr=False)  # WAIFU_WEB_API_TOKEN; empty: no Bearer access

    @classmethod
    def from_settings(cls, settings: Settings) -> Login:
        password = settings.web_password.get_secret_value() if settings.web_password else ""
        return cls(
            settings.web_user or "",
            password,
            secure_cookies=settings.web_secure_cookies,
            trust_proxy=settings.web_trust_proxy,
            api_token=settings.web_api_token.get_secret_value() if settings.web_api_token else "",
        )

    @property
    def required(self) -> bool:
        return bool(self.user and self.password)

    def matches(self, user: str, password: str) -> bool:
        # both compared every time: the answer takes as long whichever was wrong
        ok_user = secrets.compare_digest(user.encode(), self.user.encode())
        ok_password = secrets.compare_digest(password.encode(), self.password.encode())
        return ok_user and ok_password

    def attempt(self, request: Request, user: str, password: str, where: str) -> bool:
        """A throttled password check; raises Throttled while this client must wait."""
        client = self.client(request)
        self.throttle.check(client)
        if self.matches(user, password):
            self.throttle.succeeded(client)
            return True
        self.throttle.failed(client, where)
        return False

    def client(self, request: Request) -> str:
        """The address guesses are counted by: the peer, or the last hop a trusted proxy forwarded."""
        forwarded = request.headers.get("x-forwarded-for", "") if self.trust_proxy else ""
        last = forwarded.rsplit(",", 1)[-1].strip()[:64]
        return last or (request.client.host if request.client else "?")

    def secure(self, request: Request) -> bool:
        if self.secure_cookies or request.url.scheme == "https":
            return True
        return self.trust_proxy and request.headers.get("x-forwarded-proto", "").strip().lower() == "https"

    def open_session(self) -> str:
        now = time.monotonic()
        self.sessions = {k: v for k, v in self.sessions.items() if v > now}
        session_id = secrets.token_urlsafe(32)
        self.sessions[session_id] = now + SESSION_S
        return session_id

    def close_session(self, session_id: str | None) -> None:
        self.sessions.pop(session_id or "", None)

    def session(self, request: Request) -> str | None:
        """The request's open session id, if any."""
        session_id = request.cookies.get(SESSION_COOKIE, "")
        expiry = self.sessions.get(session_id)
        return session_id if expiry is not None and expiry > time.monotonic() else None

    def csrf_token(self, binding: str) -> str:
        digest = hmac.new(self.secret, binding.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def allows(self, request: Request) -> bool:
        """Raises Throttled for basic auth while this client must wait."""
        if not self.required or self.session(request):
            return True
        return self._basic_auth(request)

    def _basic_auth(self, request: Request) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""  # unreadable credentials are a failed guess too
        return self.attempt(request, user, password, "basic auth")


def local_target(target: str | None) -> str:
    """Where to go after logging in: a path on this site only (never `//host` or a full URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/"


def _visitor_format(value: str | None) -> TypeGuard[str]:
    return value is not None and 20 <= len(value) <= 100 and value.replace("-", "").replace("_", "").isalnum()


class Guard(BaseHTTPMiddleware):
    """Host check, login, the CSRF token and its check on every POST, before any route runs."""

    def __init__(self, app, login: Login) -> None:
        super().__init__(app)
        self.login = login

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if not self.login.required and not is_loopback(request.url.hostname or ""):
            return PlainTextResponse("this server answers to loopback names only (it has no login)", 400)
        cookie = request.cookies.get(VISITOR_COOKIE)
        fresh: str | None = None  # a new visitor id, set as a cookie on the response
        if _visitor_format(cookie):
            visitor = cookie
        else:
            visitor = fresh = secrets.token_urlsafe(32)
        try:
            response = await self._guarded(request, call_next, visitor)
        except Throttled as exc:
            response = PlainTextResponse(str(exc), 429, headers={"Retry-After": str(max(1, round(exc.wait)))})
        if fresh:
            secure = self.login.secure(request)
            response.set_cookie(VISITOR_COOKIE, fresh, httponly=True, samesite="strict", path="/", secure=secure)
        return response

    async def _guarded(self, request: Request, call_next: RequestResponseEndpoint, visitor: str) -> Response:
        if is_bearer(request):
            refusal = bearer_refusal(self.login, request)
            if refusal:
                return PlainTextResponse(refusal, 401, headers={"WWW-Authenticate": 'Bearer realm="waifu"'})
            request.state.csrf = ""  # no page is rendered for a script
            return await call_next(request)
        public = request.url.path.startswith(PUBLIC_PREFIXES)
        allowed = self.login.allows(request) if not public else True
        session = self.login.session(request)
        # bound to the session once logged in (a new token at every login), to the visitor before
        expected = self.login.csrf_token(f"session:{session}" if session else f"visitor:{visitor}")
        request.state.csrf = expected
        if not allowed:
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                if len(target) > MAX_NEXT:  # a Location header that long is refused by clients: the page alone
                    target = request.url.path[:MAX_NEXT]
                return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
            return PlainTextResponse(
                "log in first (or use HTTP basic auth)", 401, headers={"WWW-Authenticate": 'Basic realm="waifu"'}
            )
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            refusal = await self._csrf_refusal(request, expected)
            if refusal:
                return PlainTextResponse(refusal, 403)
        return await call_next(request)

    @staticmethod
    async def _csrf_refusal(request: Request, expected: str) -> str | None:
        origin = request.headers.get("origin")
        if origin and origin != "null":
            parts = urlsplit(origin)
            if parts.netloc != request.headers.get("host", ""):
                return f"cross-origin request from {origin[:200]} refused"
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            # the body (capped by waifu.web.shield) stays readable for the route (Starlette replays it)
            values = parse_qs((await request.body()).decode("utf-8", "replace")).get(CSRF_FIELD, [])
            sent = values[0] if values else None
        elif sent is None and request.headers.get("content-type", "").startswith("multipart/form-data"):
            sent = await multipart_token(request, CSRF_FIELD)
        if not sent or not secrets.compare_digest(expected.encode(), sent.encode("utf-8", "replace")):
            return "missing or wrong CSRF token: reload the page and try again"
        return None
