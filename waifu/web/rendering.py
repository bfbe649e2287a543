"""Rendering shared by the pages: templates with the CSRF token and a one-time message, the answer to a
POST (JSON for the page's script, a redirect for a plain form), error pages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from waifu.web.security import CSRF_FIELD, Login, local_target

HERE = Path(__file__).parent
FLASH_COOKIE = "waifu_flash"
templates = Jinja2Templates(directory=HERE / "templates")


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    """A page with what every page needs: the CSRF token, the login state, a one-time message."""
    login: Login = request.app.state.login
    flash = unquote(request.cookies.get(FLASH_COOKIE, ""))[:500]
    response = templates.TemplateResponse(
        request,
        name,
        {
            "csrf_token": request.state.csrf,
            "csrf_field": CSRF_FIELD,
            "login_required": login.required,
            "flash": flash,
            "path": request.url.path,
            **context,
        },
        status_code=status_code,
    )
    if flash:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def done(request: Request, message: str, back: str, payload: dict[str, Any] | None = None) -> Response:
    """After a POST: JSON for the page's script, or back to the page with a one-time message."""
    if wants_json(request):
        return JSONResponse({"ok": True, "message": message, **(payload or {})})
    response = RedirectResponse(local_target(back), status_code=303)
    response.set_cookie(FLASH_COOKIE, quote(message[:500]), httponly=True, samesite="strict", path="/")
    return response


def same_site_only(request: Request) -> None:
    """For the expensive pictures: another site's page must not make a visitor's browser fire them (the
    browser says so in Sec-Fetch-Site; older browsers send nothing and are let through)."""
    if request.headers.get("sec-fetch-site", "").strip().lower() == "cross-site":
        raise refuse(403, "this picture is served to this site's own pages only (Sec-Fetch-Site: cross-site)")


def refuse(status: int, message: str) -> HTTPException:
    """What a route raises for a bad id or form value: rendered by `error_page` with this message."""
    return HTTPException(status, message)


def plain_words(request: Request, status: int, detail: str | None) -> str:
    """Starlette's own refusals say only "Not Found" or "Method Not Allowed": a sentence instead."""
    path = request.url.path[:200]
    if status == 404 and detail in (None, "Not Found"):
        return f"there is no page at {path} (see /faces, /collection or /models)"
    if status == 405 and detail in (None, "Method Not Allowed"):
        return f"{request.method[:20]} is not accepted at {path}"
    return detail or "internal error: see the server's log"


async def error_page(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = plain_words(request, status, getattr(exc, "detail", None))
    if wants_json(request):
        return JSONResponse({"ok": False, "message": detail}, status_code=status)
    if "text/html" not in request.headers.get("accept", "") or not hasattr(request.state, "csrf"):
        return PlainTextResponse(detail, status_code=status)
    return render(request, "error.html", status_code=status, status=status, detail=detail)


def json_script(value: Any) -> str:
    """JSON safe inside an HTML attribute or <script> (no `</`)."""
    return json.dumps(value).replace("</", "<\\/")


templates.env.filters["json_script"] = json_script
