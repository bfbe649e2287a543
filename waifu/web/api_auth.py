"""How a script is let into the web API: `Authorization: Bearer <WAIFU_WEB_API_TOKEN>` on /api/... only.
And how the CSRF token of a multipart form (the "Who is this?" upload, which a plain HTML form must send as
multipart) is found. Used by waifu.web.security's Guard; kept apart so the login code stays as it was."""

from __future__ import annotations

import secrets
from typing import Protocol

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from waifu.web.throttle import Throttle

API_PREFIX = "/api/"


class HasToken(Protocol):
    api_token: str
    throttle: Throttle

    def client(self, request: Request) -> str: ...


def is_bearer(request: Request) -> bool:
    scheme, _, _ = request.headers.get("authorization", "").partition(" ")
    return scheme.strip().lower() == "bearer"


def bearer_refusal(login: HasToken, request: Request) -> str | None:
    """None when the request's Bearer token is the configured one, else why it is refused. Failed guesses are
    throttled with the passwords' throttle (raises waifu.web.throttle.Throttled while this client waits)."""
    if not request.url.path.startswith(API_PREFIX):
        return "an API token opens the web API (/api/...) only: log in to use the pages"
    if not login.api_token:
        return "this server has no API token (set WAIFU_WEB_API_TOKEN), so Bearer requests are refused"
    client = login.client(request)
    login.throttle.check(client)
    sent = request.headers.get("authorization", "").strip().partition(" ")[2].strip()
    # constant time whatever was sent; the token itself is never logged or repeated
    if secrets.compare_digest(sent.encode("utf-8", "replace"), login.api_token.encode()):
        login.throttle.succeeded(client)
        return None
    login.throttle.failed(client, "API token")
    return "wrong API token in the Authorization header"


async def multipart_token(request: Request, field: str) -> str | None:
    """The `field` of a multipart body (capped by waifu.web.shield), or None. The body stays readable for
    the route: read whole first, Starlette hands it on."""
    await request.body()
    try:
        async with request.form() as form:
            value = form.get(field)
    except (HTTPException, MultiPartException):
        return None  # an unreadable form carries no token: refused as missing
    return value if isinstance(value, str) else None


def may_upload(login, scope) -> bool:
    """Whether a request to an upload route may send more than the usual body cap: the page is open (no
    login configured), or the request has a session, the API token or good basic auth. Asked by
    waifu.web.shield before the body is read, for large bodies only; a wrong token or password counts as a
    failed guess here (the request ends here then)."""
    from waifu.web.throttle import Throttled

    request = Request(scope)
    if not login.required or login.session(request):
        return True
    try:
        if is_bearer(request):
            return bearer_refusal(login, request) is None
        return login.allows(request)
    except Throttled:
        return False
