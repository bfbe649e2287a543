"""The OpenAPI 3.1 description of the web API, written out by hand (the app is Starlette, not FastAPI).
tests/test_web_api.py checks it names exactly the /api routes the app has, and tests/test_web_fuzz.py
fuzzes every parameter and body property it lists."""

from __future__ import annotations

from typing import Any

from core.settings import Settings
from db.models import TAG_CHARS, ModelStatus, Split
from waifu.web.queries import MAX_PAGE_SIZE, ORDERS, SOURCES, STATES


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _refusals(*codes: int) -> dict[str, Any]:
    words = {
        400: "a parameter or the form cannot be used",
        401: "not logged in, or a wrong API token",
        403: "a missing or wrong CSRF token (session requests only)",
        409: "no model has been trained yet",
        413: "the picture is over the size cap",
        415: "the body is not multipart/form-data",
        422: "not an image, a broken one, or an address that cannot be used",
        429: "too many wrong passwords or tokens: wait Retry-After seconds",
        502: "the site of a pasted address did not deliver the picture",
        503: "busy, or the prediction overran its time limit: retry after Retry-After seconds",
    }
    return {
        str(c): {
            "description": words[c],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for c in codes
    }


def description(settings: Settings) -> dict[str, Any]:
    ids = {"type": "integer", "minimum": 1}
    face_params = [
        _query("source", "label source (none: no label source yet)", {"type": "string", "enum": list(SOURCES)}),
        _query(
            "character",
            "a tag: faces labelled or suggested as this character",
            {"type": "string", "maxLength": TAG_CHARS},
        ),
        _query("split", "train or test", {"type": "string", "enum": [s.value for s in Split]}),
        _query("state", "ready (default), rejected or any", {"type": "string", "enum": [*STATES, "any"]}),
        _query(
            "suggested",
            "only faces with (yes) or without (no) a model suggestion",
            {"type": "string", "enum": ["yes", "no"]},
        ),
        _query("doubtful", "only tag labels doubted (yes) or not (no)", {"type": "string", "enum": ["yes", "no"]}),
        _query("below", "suggestion probability under this", {"type": "number", "minimum": 0, "maximum": 1}),
        _query("post", "faces of this post", ids),
        _query("after", "keyset paging: faces with a larger id (see `next`)", ids),
        _query("before", "keyset paging: faces with a smaller id (see `previous`)", ids),
        _query(
            "order",
            "id (default), or useful: most useful to label first (uncertain faces of characters with few "
            "labels, inferred labels with a low margin); each face then carries its `usefulness`",
            {"type": "string", "enum": list(ORDERS)},
        ),
        _query(
            "at",
            "order=useful keyset paging: the usefulness of the `after`/`before` face (see `next`)",
            {"type": "number", "minimum": 0, "maximum": 1},
        ),
        _query("size", "faces per page", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": 200}),
    ]
    secured: list[dict[str, list[str]]] = [{"bearer": []}, {"session": []}, {"basic": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "waifu web API",
            "version": "1",
            "description": "Name the characters in a picture, and read the collected faces and model versions. "
            "Authenticate with `Authorization: Bearer <WAIFU_WEB_API_TOKEN>`, or the web page's session "
            "(then a POST needs the page's CSRF token in `X-CSRF-Token`) or HTTP basic auth. "
            "Refusals are JSON `{ok: false, message}` with a sentence saying why.",
        },
        "paths": {
            "/api/predict": {
                "post": {
                    "summary": "Name every face of a picture",
                    "description": "Detects the faces (as `waifu predict`), names each with the current model: "
                    "`name` is the best guess, or `unknown` under the model's threshold; `top` the k likeliest. "
                    f"The picture: at most {settings.max_download_bytes} bytes, JPEG, PNG, GIF, WEBP or BMP; "
                    "or `url`, its address on an allowed site (fetched with the same checks as downloads).",
                    "security": secured,
                    "parameters": [
                        _query("k", "names per face", {"type": "integer", "minimum": 1, "maximum": 10, "default": 3})
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "picture": {"type": "string", "format": "binary"},
                                        "url": {"type": "string", "format": "uri", "maxLength": 2000},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "the faces",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Prediction"}}},
                        },
                        **_refusals(400, 401, 403, 409, 413, 415, 422, 429, 502, 503),
                    },
                }
            },
            "/api/faces": {
                "get": {
                    "summary": "Faces, paged and filtered as on the faces page",
                    "security": secured,
                    "parameters": face_params,
                    "responses": {
                        "200": {
                            "description": "one page of faces",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FacePage"}}},
                        },
                        **_refusals(400, 401, 429),
                    },
                }
            },
            "/api/models": {
                "get": {
                    "summary": "Model versions, newest first, with their metrics",
                    "security": secured,
                    "parameters": [
                        _query(
                            "status",
                            "only versions in this status",
                            {"type": "string", "enum": [s.value for s in ModelStatus]},
                        ),
                        _query("before", "keyset paging: versions with a smaller id (see `next`)", ids),
                        _query(
                            "size",
                            "versions per page",
                            {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                        ),
                    ],
                    "responses": {
                        "200": {
                            "description": "one page of versions",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelPage"}}},
                        },
                        **_refusals(400, 401, 429),
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "summary": "This description",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "WAIFU_WEB_API_TOKEN"},
                "session": {"type": "apiKey", "in": "cookie", "name": "waifu_session"},
                "basic": {"type": "http", "scheme": "basic", "description": "WAIFU_WEB_USER / WAIFU_WEB_PASSWORD"},
            },
            "schemas": SCHEMAS,
        },
    }


_nullable_number = {"type": ["number", "null"]}
_nullable_text = {"type": ["string", "null"]}
SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["ok", "message"],
        "properties": {"ok": {"const": False}, "message": {"type": "string"}},
    },
    "Face": {
        "type": "object",
        "required": ["box", "detector", "name", "threshold", "top"],
        "properties": {
            "box": {
                "type": "array",
                "items": {"type": "integer"},
                "minItems": 4,
                "maxItems": 4,
                "description": "x, y, width, height in pixels",
            },
            "detector": {"type": "string"},
            "name": {"type": "string", "description": "the best name, or `unknown` under the threshold"},
            "threshold": {"type": "number"},
            "top": {
                "type": "array",
                "items": {"type": "object", "properties": {"name": {"type": "string"}, "p": {"type": "number"}}},
            },
        },
    },
    "Prediction": {
        "type": "object",
        "required": ["ok", "model", "width", "height", "faces"],
        "properties": {
            "ok": {"const": True},
            "model": {"type": "string", "description": "the model version that answered, e.g. v3"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "faces": {"type": "array", "items": {"$ref": "#/components/schemas/Face"}},
        },
    },
    "FaceRow": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "post_id": {"type": "integer"},
            "state": {"type": "string"},
            "label": _nullable_text,
            "label_source": _nullable_text,
            "split": _nullable_text,
            "suggestion": _nullable_text,
            "suggestion_score": _nullable_number,
            "doubt": _nullable_text,
            "post_characters": {"type": "array", "items": {"type": "string"}},
            "crop_url": {"type": "string"},
        },
    },
    "FacePage": {
        "type": "object",
        "properties": {
            "ok": {"const": True},
            "faces": {"type": "array", "items": {"$ref": "#/components/schemas/FaceRow"}},
            "total": {"type": "integer"},
            "total_capped": {"type": "boolean", "description": "more faces match than `total` says"},
            "next": _nullable_text,
            "previous": _nullable_text,
        },
    },
    "ModelVersion": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "status": {"type": "string", "enum": [s.value for s in ModelStatus]},
            "reason": _nullable_text,
            "created_at": {"type": "string", "format": "date-time"},
            "accuracy": _nullable_number,
            "macro_f1": _nullable_number,
            "current_accuracy": _nullable_number,
            "test_faces": {"type": ["integer", "null"]},
            "per_class": {"type": "object"},
            "unknown_threshold": _nullable_number,
            "train_faces": {"type": "object", "additionalProperties": {"type": "integer"}},
            "labelled_faces": {"type": "integer"},
            "duration_s": _nullable_number,
            "code_version": {"type": "string"},
            "pictures": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ModelPage": {
        "type": "object",
        "properties": {
            "ok": {"const": True},
            "models": {"type": "array", "items": {"$ref": "#/components/schemas/ModelVersion"}},
            "next": _nullable_text,
        },
    },
}
