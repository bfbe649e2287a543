"""The outermost layer of the web page, a plain ASGI wrapper around the whole Starlette application (outside
its error handling, so a 500 gets the same headers as a 200):

Design notes: docs/architecture.md, `waifu/web/shield.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from starlette.datastructures import MutableHeaders
from starlette.responses import PlainTextResponse

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

MAX_BODY = 1024 * 1024  # the largest legitimate form (1000 face ids) is about 20 KB
MAX_LOGIN_BODY = 64 * 1024
UPLOAD_PATHS = ("/who", "/api/predict")  # where a picture is sent: up to WAIFU_MAX_DOWNLOAD_BYTES
UPLOAD_SLACK = 64 * 1024  # multipart boundaries, headers, the CSRF token and a URL field around the file
BODY_S = 30.0  # a body that takes longer to arrive is cut off (a drip holds a connection open)
# no inline script or style, nothing from elsewhere, never inside another site's frame (keyboard actions)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


def body_cap(path: str, upload_cap: int = MAX_BODY) -> int:
    if path in UPLOAD_PATHS:
        return upload_cap + UPLOAD_SLACK
    return MAX_LOGIN_BODY if path == "/login" or path.startswith("/login/") else MAX_BODY


class Shield:
    def __init__(
        self,
        app: ASGIApp,
        body_seconds: float = BODY_S,
        upload_cap: int = MAX_BODY,
        may_upload: Callable[[MutableMapping[str, Any]], bool] | None = None,
    ) -> None:
        self.app = app
        self.body_seconds = body_seconds
        self.upload_cap = upload_cap  # the picture's own cap (WAIFU_MAX_DOWNLOAD_BYTES)
        # whether a request may send a picture past MAX_BODY (a logged-in client): nobody else makes this
        # process hold a 50 MB body in memory before the login check
        self.may_upload = may_upload or (lambda _scope: True)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._with_headers(scope, send)
        cap = body_cap(scope.get("path", ""), self.upload_cap)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        small = declared is not None and declared.strip().isdigit() and int(declared) <= MAX_BODY
        if cap > MAX_BODY and not small and not self.may_upload(scope):
            cap = MAX_BODY
        if declared is not None and (not declared.strip().isdigit() or int(declared) > cap):
            await self._refuse(scope, send, cap, declared)
            return
        try:
            with anyio.fail_after(self.body_seconds):
                body = await _read_body(receive, cap)
        except _TooLarge:
            await self._refuse(scope, send, cap, None)
            return
        except TimeoutError:
            message = f"the request body did not arrive within {self.body_seconds:.0f} s"
            await PlainTextResponse(message, 408, headers={"Connection": "close"})(scope, receive, send)
            return
        except _Gone:
            return  # the client left before sending its body: nobody to answer
        # a picture's bytes hold NULs: the upload routes check their few text fields themselves
        binary = scope.get("path", "") in UPLOAD_PATHS
        if _holds_nul(scope.get("query_string", b"")) or (not binary and _holds_nul(body)):
            response = PlainTextResponse("values must not contain NUL characters (%00)", 400)
            await response(scope, _nothing, send)
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _refuse(scope: MutableMapping[str, Any], send: Send, cap: int, declared: bytes | None) -> None:
        if declared is not None and not declared.strip().isdigit():
            status, message = 400, "Content-Length must be a whole number of bytes"
        elif scope.get("path", "") in UPLOAD_PATHS and cap == MAX_BODY:
            status = 413
            message = f"request body too large: at most {cap} bytes before a login (log in, or send the API token)"
        else:
            status, message = 413, f"request body too large: this address accepts at most {cap} bytes"
        # the rest of the body is never read: the connection closes after the answer
        response = PlainTextResponse(message, status, headers={"Connection": "close"})
        await response(scope, _nothing, send)

    @staticmethod
    def _with_headers(scope: MutableMapping[str, Any], send: Send) -> Send:
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if "cache-control" not in headers and not static:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        return send_with_headers


def _holds_nul(raw: bytes) -> bool:
    """A NUL as sent (a raw byte in a body) or percent-encoded (a query string, a form body)."""
    return b"\x00" in raw or b"%00" in raw


async def _read_body(receive: Receive, cap: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read here, handed on as if it arrived in one piece; then the client's own messages
    (a disconnect) as they come."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


async def _nothing() -> Message:
    return {"type": "http.disconnect"}
