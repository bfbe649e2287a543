"""The application factory: routes of the pages (faces, collection, models, "Who is this?"), the web API,
login, templates, static files, error pages.

Routes are thin: they parse (waifu.web.queries.parse_*), call a plain function, and render. Every
refusal is a 4xx with a sentence a person can act on; images are served by id only.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from core.settings import Settings, get_settings
from waifu.web import api, collection_page, faces_page, models_page, who_page
from waifu.web.api_auth import may_upload
from waifu.web.naming import Namer
from waifu.web.rendering import error_page, render
from waifu.web.security import SESSION_COOKIE, SESSION_S, Guard, Login, local_target
from waifu.web.shield import Shield
from waifu.web.shown import Shown
from waifu.web.throttle import Throttled

HERE = Path(__file__).parent


# ------------------------------------------------------------------------------------ login ----
async def login_form(request: Request) -> Response:
    if not request.app.state.login.required:
        return RedirectResponse("/", status_code=303)
    return render(request, "login.html", next=local_target(request.query_params.get("next")))


async def login_submit(request: Request) -> Response:
    login: Login = request.app.state.login
    form = await request.form()
    target = local_target(str(form.get("next") or "/"))
    if not login.required:
        return RedirectResponse(target, status_code=303)
    try:
        ok = login.attempt(request, str(form.get("username") or ""), str(form.get("password") or ""), "login form")
    except Throttled as exc:
        response = render(request, "login.html", status_code=429, next=target, error=str(exc))
        response.headers["Retry-After"] = str(max(1, round(exc.wait)))
        return response
    if not ok:
        return render(request, "login.html", status_code=401, next=target, error="wrong user name or password")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        login.open_session(),
        max_age=SESSION_S,
        httponly=True,
        samesite="strict",
        path="/",
        secure=login.secure(request),
    )
    return response


async def logout(request: Request) -> Response:
    request.app.state.login.close_session(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def home(_request: Request) -> Response:
    return RedirectResponse("/faces", status_code=303)


class WebApp(Starlette):
    """Starlette with waifu.web.shield around everything, its error handling included."""

    def build_middleware_stack(self):
        login = self.state.login
        return Shield(
            super().build_middleware_stack(),
            upload_cap=self.state.settings.max_download_bytes,
            may_upload=lambda scope: may_upload(login, scope),
        )


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()
    routes = [
        Route("/", home),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        *faces_page.routes(),
        *collection_page.routes(),
        *models_page.routes(),
        *who_page.routes(),
        *api.routes(),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    login = Login.from_settings(settings)
    app = WebApp(
        routes=routes,
        exception_handlers={HTTPException: error_page, Exception: error_page},
        middleware=[Middleware(Guard, login=login)],
    )
    app.state.settings, app.state.login = settings, login
    # the model is loaded by the first prediction, once per process; boxed pictures stay in memory
    app.state.namer, app.state.shown = Namer(settings), Shown()
    return app
