"""The models page: the characters as the next retrain sees them (train.characters), every model version
with its metrics, counts, status and pictures; the retrain button and its progress."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from db.engine import session_scope
from db.ids import MAX_INTEGER_ID
from train.characters import character_report
from waifu.web.pictures import NotFound, model_picture
from waifu.web.queries import BadInput, parse_id
from waifu.web.rendering import done, refuse, render
from waifu.web.retraining import BrokerUnreachable, retrain_status, start_retrain
from waifu.web.versions import model_versions


async def models(request: Request) -> Response:
    settings = request.app.state.settings

    def load():
        with session_scope(readonly=True) as session:
            return model_versions(session, settings.data_dir), character_report(session, settings)

    versions, characters = await run_in_threadpool(load)
    status = await run_in_threadpool(retrain_status)
    return render(request, "models.html", versions=versions, retrain=status, characters=characters)


def picture(request: Request) -> Response:
    try:
        version_id = parse_id(request.path_params["version_id"], "model version", MAX_INTEGER_ID)
        with session_scope(readonly=True) as session:
            path = model_picture(session, request.app.state.settings, version_id, request.path_params["name"])
    except (BadInput, NotFound) as exc:
        raise refuse(404, str(exc)) from exc
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


async def retrain(request: Request) -> Response:
    try:
        started, message = await run_in_threadpool(start_retrain)
    except BrokerUnreachable as exc:
        raise refuse(503, str(exc)) from exc
    if not started and "application/json" in request.headers.get("accept", ""):
        raise refuse(409, message)
    return done(request, message, "/models", {"started": started})


async def progress(_request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(retrain_status), headers={"Cache-Control": "no-store"})


def routes() -> list[Route]:
    return [
        Route("/models", models, methods=["GET"]),
        Route("/models/retrain", retrain, methods=["POST"]),
        Route("/models/retrain/status", progress, methods=["GET"]),
        Route("/models/{version_id}/{name}", picture, methods=["GET"]),
    ]
