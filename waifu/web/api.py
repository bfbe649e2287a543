"""The web API for scripts and tools: name the faces of a picture (POST /api/predict), read the faces and
the model versions (GET /api/faces, GET /api/models, paged, with the pages' filters), and the OpenAPI
description of all this (GET /api/openapi.json, public). Same login as the pages (a session or HTTP basic
auth), or `Authorization: Bearer WAIFU_WEB_API_TOKEN` (waifu.web.api_auth). Every answer is JSON; a refusal
is `{"ok": false, "message": "..."}` with a 4xx."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.errors import Refused
from db.engine import session_scope
from db.models import ModelStatus, ModelVersion
from waifu.web import openapi
from waifu.web.naming import Busy, Namer, NoModel
from waifu.web.queries import COUNT_CAP, MAX_INTEGER_ID, BadInput, faces_page, parse_filter, parse_id
from waifu.web.uploads import BadUpload, picture_bytes
from waifu.web.versions import MODEL_PICTURES, json_object

MAX_K = 10
MODELS_PAGE = 20
MAX_MODELS_PAGE = 100


def problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"ok": False, "message": message}, status_code=status, headers=headers)


def parse_k(text: str | None) -> int:
    if not (text or "").strip():
        return 3
    k = parse_id(text, "k")
    if k > MAX_K:
        raise BadInput(f"k must be at most {MAX_K}")
    return k


async def predict(request: Request) -> Response:
    namer: Namer = request.app.state.namer
    try:
        k = parse_k(request.query_params.get("k"))
        data = await picture_bytes(request, request.app.state.settings)
        named = await run_in_threadpool(namer.name, data, k)
    except BadInput as exc:
        return problem(400, str(exc))
    except BadUpload as exc:
        return problem(exc.status, str(exc))
    except Refused as exc:
        return problem(422, f"this file cannot be named: {exc}")
    except NoModel as exc:
        return problem(409, str(exc))
    except Busy as exc:
        return problem(503, str(exc), {"Retry-After": str(round(exc.retry_after))})
    return JSONResponse({"ok": True, **named.to_json()})


async def faces(request: Request) -> Response:
    try:
        face_filter = parse_filter(request.query_params)
    except BadInput as exc:
        return problem(400, str(exc))

    def load():
        with session_scope(readonly=True) as session:
            return faces_page(session, face_filter)

    page = await run_in_threadpool(load)
    return JSONResponse(
        {
            "ok": True,
            "faces": [
                {
                    **card.to_json(),
                    "post_id": card.post_id,
                    "post_characters": card.post_tags,
                    "doubt": card.doubt,
                    **({"usefulness": card.usefulness} if card.usefulness is not None else {}),
                    "crop_url": f"/faces/{card.id}/crop.png",
                }
                for card in page.cards
            ],
            "total": min(page.total, COUNT_CAP),
            "total_capped": page.total > COUNT_CAP,
            "next": f"/api/faces?{urlencode(page.next)}" if page.next else None,
            "previous": f"/api/faces?{urlencode(page.previous)}" if page.previous else None,
        }
    )


def _version(v: ModelVersion, data_dir) -> dict[str, Any]:
    metrics = json_object(v.metrics)
    pictures = [n for n in MODEL_PICTURES if v.artifact_dir and (data_dir / v.artifact_dir / n).is_file()]
    return {
        "id": v.id,
        "name": f"v{v.id}",
        "status": v.status,
        "reason": v.reason,
        "created_at": v.created_at.isoformat(),
        "accuracy": v.accuracy,
        "macro_f1": v.macro_f1,
        "current_accuracy": v.current_accuracy,
        "test_faces": metrics.get("n"),
        "per_class": metrics.get("per_class", {}),
        "unknown_threshold": (metrics.get("unknown") or {}).get("threshold"),
        "train_faces": json_object(v.counts),
        "labelled_faces": v.labelled_faces,
        "duration_s": v.duration_s,
        "code_version": v.code_version,
        "pictures": [f"/models/{v.id}/{n}" for n in pictures],
    }


async def models(request: Request) -> Response:
    params = request.query_params
    try:
        status = (params.get("status") or "").strip() or None
        if status is not None and status not in {s.value for s in ModelStatus}:
            raise BadInput(f"status must be one of {', '.join(s.value for s in ModelStatus)}, not {status[:40]!r}")
        before = parse_id(params["before"], "before", MAX_INTEGER_ID) if (params.get("before") or "").strip() else None
        size = parse_id(params["size"], "size") if (params.get("size") or "").strip() else MODELS_PAGE
        if size > MAX_MODELS_PAGE:
            raise BadInput(f"size must be at most {MAX_MODELS_PAGE}")
    except BadInput as exc:
        return problem(400, str(exc))
    data_dir = request.app.state.settings.data_dir

    def load() -> tuple[list[dict[str, Any]], bool]:
        query = select(ModelVersion).order_by(col(ModelVersion.id).desc()).limit(size + 1)
        if status:
            query = query.where(ModelVersion.status == status)
        if before is not None:
            query = query.where(col(ModelVersion.id) < before)
        with session_scope(readonly=True) as session:
            rows = list(session.exec(query).all())
            return [_version(v, data_dir) for v in rows[:size]], len(rows) > size

    versions, more = await run_in_threadpool(load)
    last = versions[-1]["id"] if versions else None
    following = {k: v for k, v in {"status": status, "size": size, "before": last}.items() if v}
    return JSONResponse(
        {"ok": True, "models": versions, "next": f"/api/models?{urlencode(following)}" if more else None}
    )


def description(request: Request) -> Response:
    return JSONResponse(openapi.description(request.app.state.settings), headers={"Cache-Control": "no-cache"})


def routes() -> list[Route]:
    return [
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/faces", faces, methods=["GET"]),
        Route("/api/models", models, methods=["GET"]),
        Route("/api/openapi.json", description, methods=["GET"]),
    ]
