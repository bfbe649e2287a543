"""The faces page: a paged, filtered grid of crops; label, reject, accept the suggestion, undo (one face
or a selection), all through labels.manual, the functions `waifu faces` uses."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from core.errors import Refused
from db.engine import session_scope
from db.ids import MAX_INTEGER_ID
from db.models import pk
from labels import manual as labels
from waifu.web.pictures import NotFound, crop_path, source_png
from waifu.web.queries import COUNT_CAP, SOURCES, STATES, BadInput, face_cards, faces_page, parse_filter, parse_id
from waifu.web.rendering import done, refuse, render, same_site_only

ACTIONS = ("accept", "label", "reject")
MAX_IDS_TEXT = 20_000  # characters of the `ids` field: far above 1000 ids


async def faces(request: Request) -> Response:
    try:
        face_filter = parse_filter(request.query_params)
    except BadInput as exc:
        raise refuse(400, str(exc)) from exc

    def load():
        with session_scope(readonly=True) as session:
            return faces_page(session, face_filter)

    page = await run_in_threadpool(load)
    return render(
        request,
        "faces.html",
        page=page,
        sources=SOURCES,
        states=STATES,
        count_cap=COUNT_CAP,
        back=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
    )


def _face_id(request: Request) -> int:
    try:
        return parse_id(request.path_params["face_id"], "face id", MAX_INTEGER_ID)
    except BadInput as exc:
        raise refuse(404, str(exc)) from exc


def crop(request: Request) -> Response:
    face_id = _face_id(request)
    settings = request.app.state.settings
    try:
        with session_scope(readonly=True) as session:
            path = crop_path(session, settings, face_id)
    except NotFound as exc:
        raise refuse(404, str(exc)) from exc
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def source(request: Request) -> Response:
    same_site_only(request)
    face_id = _face_id(request)
    settings = request.app.state.settings
    try:
        with session_scope(readonly=True) as session:
            draw = source_png(session, settings, face_id)
        data = draw()  # no transaction open while the illustration is decoded
    except NotFound as exc:
        raise refuse(404, str(exc)) from exc
    except Refused as exc:
        raise refuse(422, f"face {face_id}: the illustration cannot be shown: {exc}") from exc
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


def parse_ids(form) -> list[int]:
    """Face ids from `ids` ("1,2,3") and/or repeated `id` fields."""
    text = ",".join([str(form.get("ids") or ""), *[str(v) for v in form.getlist("id")]])
    if len(text) > MAX_IDS_TEXT:
        raise BadInput(f"too many face ids: at most {labels.MAX_FACES_PER_ACTION} per action")
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if not parts:
        raise BadInput("no face selected")
    ids = list(dict.fromkeys(parse_id(p, "face id", MAX_INTEGER_ID) for p in parts))
    if len(ids) > labels.MAX_FACES_PER_ACTION:
        raise BadInput(f"{len(ids)} faces selected: at most {labels.MAX_FACES_PER_ACTION} per action")
    return ids


async def action(request: Request) -> Response:
    """accept / label TAG / reject on one face or a selection: one undoable action."""
    form = await request.form()
    kind = str(form.get("action") or "")
    back = str(form.get("back") or "/faces")
    try:
        if kind not in ACTIONS:
            raise BadInput(f"action must be one of {', '.join(ACTIONS)}, not {kind[:40]!r}")
        ids = parse_ids(form)
        tag = str(form.get("tag") or "").strip()
        if kind == "label" and not tag:
            raise BadInput("choose a character to label the faces with")
        result = await run_in_threadpool(_apply, kind, ids, tag)
    except BadInput as exc:
        raise refuse(400, str(exc)) from exc
    except LookupError as exc:
        raise refuse(404, str(exc)) from exc
    except ValueError as exc:  # e.g. a face without a suggestion
        raise refuse(409, str(exc)) from exc
    count = len(result.faces)
    faces_text = f"{count} face{'s' if count != 1 else ''}"
    message = {
        "accept": f"accepted the suggestion for {faces_text}",
        "label": f"labelled {faces_text} as {tag}",
        "reject": f"rejected {faces_text}",
    }[kind]
    return done(request, message, back, {"action": result.action, "faces": await run_in_threadpool(_cards, result)})


def _apply(kind: str, ids: list[int], tag: str) -> labels.Action:
    if kind == "accept":
        return labels.accept_suggestions(ids)
    return labels.label_faces(ids, tag if kind == "label" else None)


def _cards(result: labels.Action) -> list[dict]:
    with session_scope(readonly=True) as session:
        return face_cards(session, [pk(face) for face in result.faces])


async def undo(request: Request) -> Response:
    form = await request.form()
    back = str(form.get("back") or "/faces")
    try:
        result = await run_in_threadpool(labels.undo)
    except LookupError as exc:
        raise refuse(409, str(exc)) from exc
    count = len(result.faces)
    message = f"undone: {count} face{'s' if count != 1 else ''} as before"
    if result.kept:
        message += "; kept: " + "; ".join(result.kept[:5])
    return done(request, message, back, {"action": result.action, "faces": await run_in_threadpool(_cards, result)})


def routes() -> list[Route]:
    return [
        Route("/faces", faces, methods=["GET"]),
        Route("/faces/action", action, methods=["POST"]),
        Route("/faces/undo", undo, methods=["POST"]),
        Route("/faces/{face_id}/crop.png", crop, methods=["GET"]),
        Route("/faces/{face_id}/source.png", source, methods=["GET"]),
    ]
