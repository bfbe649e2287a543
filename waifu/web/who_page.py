"""The "Who is this?" page: a person uploads a picture (or pastes its address on an allowed site) and sees
it with every face boxed and numbered, each face's three likeliest names with their probabilities (or
`unknown` under the model's threshold), and the model version that answered. The naming is
waifu.web.naming (predict/, as `waifu predict`); the boxed picture is kept in memory only (waifu.web.shown)."""

from __future__ import annotations

import io

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import Refused
from waifu.web.naming import Busy, Named, Namer, NoModel
from waifu.web.rendering import refuse, render
from waifu.web.shown import Shown
from waifu.web.uploads import MAX_URL, PICTURE_FIELD, URL_FIELD, BadUpload, allowed_hosts, picture_bytes

SHOWN_MAX_SIDE = 720  # the boxed picture fits a laptop screen beside its table of names


def boxed_picture(named: Named) -> bytes:
    """The picture scaled for the browser, each face boxed and numbered as in the table, as a JPEG."""
    from detect.annotate import annotate
    from detect.detectors import Detection

    image = named.image
    factor = min(1.0, SHOWN_MAX_SIDE / max(image.size))
    if factor < 1:
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))))
    boxes = [Detection.from_box([round(v * factor) for v in face["box"]], face["detector"]) for face in named.faces]
    labels = [f"{n} {face['name']}" for n, face in enumerate(named.faces, start=1)]
    buffer = io.BytesIO()
    annotate(image, boxes, labels).save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def _page(request: Request, status_code: int = 200, **context) -> Response:
    settings = request.app.state.settings
    return render(
        request,
        "who.html",
        status_code=status_code,
        picture_field=PICTURE_FIELD,
        url_field=URL_FIELD,
        max_url=MAX_URL,
        max_mb=settings.max_download_bytes / 1024 / 1024,
        hosts=sorted(allowed_hosts(settings)),
        **context,
    )


async def who_form(request: Request) -> Response:
    return _page(request)


async def who_submit(request: Request) -> Response:
    namer: Namer = request.app.state.namer
    try:
        data = await picture_bytes(request, request.app.state.settings)
        named = await run_in_threadpool(namer.name, data)
    except BadUpload as exc:
        return _page(request, exc.status, error=str(exc))
    except Refused as exc:
        return _page(request, 422, error=f"this file cannot be named: {exc}")
    except NoModel as exc:
        return _page(request, 409, error=str(exc))
    except Busy as exc:
        response = _page(request, 503, error=str(exc))
        response.headers["Retry-After"] = str(round(exc.retry_after))
        return response
    shown: Shown = request.app.state.shown
    key = shown.put(await run_in_threadpool(boxed_picture, named))
    return _page(request, result=named, picture_url=f"/who/pictures/{key}.jpg")


def picture(request: Request) -> Response:
    key = request.path_params["key"]
    data = request.app.state.shown.get(key) if len(key) <= 64 else None
    if data is None:
        raise refuse(404, "this picture is no longer kept (pictures are kept for 15 minutes): name it again")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=600"})


def routes() -> list[Route]:
    return [
        Route("/who", who_form, methods=["GET"]),
        Route("/who", who_submit, methods=["POST"]),
        Route("/who/pictures/{key}.jpg", picture, methods=["GET"]),
    ]
