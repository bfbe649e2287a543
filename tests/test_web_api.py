"""The web API of issue 20 without a model (tests/test_web_who.py names real pictures with one), over real
HTTP on SQLite and PostgreSQL: GET /api/faces and /api/models with the pages' filters and paging, who may
call them (a session, HTTP basic auth, or `Authorization: Bearer WAIFU_WEB_API_TOKEN`, and CSRF for sessions
only), the OpenAPI description naming exactly the app's /api routes, the upload body cap, and TensorFlow
left unimported until a prediction runs."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from starlette.routing import Route

from core.settings import get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import ModelStatus, ModelVersion
from tests.support.env import PROJECT_ROOT
from tests.support.web import Web, make_collection
from waifu.web.app import create_app
from waifu.web.security import StartRefused, check_bind
from waifu.web.server import serving_in_thread
from waifu.web.shield import MAX_BODY, UPLOAD_SLACK

USER, PASSWORD = "curator", "a password long enough"
TOKEN = "script-token-0123456789abcdef"


@pytest.fixture
def served(service_env, redis_client, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("WAIFU_WEB_USER", USER)
    monkeypatch.setenv("WAIFU_WEB_PASSWORD", PASSWORD)
    monkeypatch.setenv("WAIFU_WEB_API_TOKEN", TOKEN)
    monkeypatch.setenv("WAIFU_MAX_DOWNLOAD_BYTES", str(3 * 1024 * 1024))
    reset_settings_cache()
    with serving_in_thread(get_settings()) as base:
        yield base


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def png(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 90)).save(buffer, "PNG")  # trailing bytes after a PNG are ignored
    return buffer.getvalue()


def add_versions() -> list[int]:
    """Three versions as retrains leave them: retired, current (with metrics), failed."""
    metrics = {"n": 12, "per_class": {"nishikino_maki": {"precision": 1.0}}, "unknown": {"threshold": 0.55}}
    with session_scope() as session:
        rows = [
            ModelVersion(status=ModelStatus.retired, reason="replaced by v2", accuracy=0.7),
            ModelVersion(
                status=ModelStatus.current,
                reason="beat v1",
                accuracy=0.9,
                metrics=json.dumps(metrics),
                counts=json.dumps({"nishikino_maki": 30}),
            ),
            ModelVersion(status=ModelStatus.failed, reason="NotEnoughData: need 2 characters"),
        ]
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows]


# --------------------------------------------------------------------------- read-only API ----
def test_api_faces_filters_and_pages_like_the_faces_page(served: str) -> None:
    ids = make_collection()
    with httpx.Client(base_url=served, headers=bearer()) as api:
        answer = api.get("/api/faces")
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        body = answer.json()
        assert [f["id"] for f in body["faces"]] == sorted(ids["ambiguous"] + ids["tag"])  # ready faces
        assert body["total"] == 6 and body["total_capped"] is False and body["next"] is None
        first = body["faces"][0]
        assert first["post_id"] == 101 and first["crop_url"] == f"/faces/{first['id']}/crop.png"
        assert first["post_characters"] == ["nishikino_maki", "sakurauchi_riko"]
        assert [f["id"] for f in api.get("/api/faces?source=tag&split=test").json()["faces"]] == [ids["tag"][0]]
        suggested = api.get("/api/faces?character=nishikino_maki&suggested=yes").json()["faces"]
        assert [(f["id"], f["suggestion"], f["suggestion_score"]) for f in suggested] == [
            (ids["ambiguous"][0], "nishikino_maki", 0.91)
        ]
        assert [f["id"] for f in api.get("/api/faces?state=rejected").json()["faces"]] == ids["rejected"]
        # keyset paging: `next` and `previous` walk every face once, in id order
        seen, url = [], "/api/faces?state=any&size=3"
        while url:
            page = api.get(url).json()
            seen += [f["id"] for f in page["faces"]]
            url = page["next"]
        assert seen == sorted(ids["ambiguous"] + ids["tag"] + ids["rejected"])
        back = api.get(f"/api/faces?state=any&size=3&before={seen[-1]}").json()
        assert [f["id"] for f in back["faces"]] == seen[-4:-1] and back["previous"]
        # a bad filter: 400 with the page's own sentence, as JSON
        refused = api.get("/api/faces?size=0")
        assert refused.status_code == 400
        assert refused.json() == {"ok": False, "message": "size must be a positive whole number, not '0'"}


def test_api_models_lists_versions_newest_first_with_status_filter_and_paging(served: str) -> None:
    retired, current, failed = add_versions()
    with httpx.Client(base_url=served, headers=bearer()) as api:
        body = api.get("/api/models").json()
        assert [m["id"] for m in body["models"]] == [failed, current, retired] and body["next"] is None
        now = api.get("/api/models?status=current").json()["models"]
        assert len(now) == 1 and now[0]["name"] == f"v{current}" and now[0]["accuracy"] == 0.9
        assert (now[0]["test_faces"], now[0]["unknown_threshold"]) == (12, 0.55)
        assert now[0]["train_faces"] == {"nishikino_maki": 30} and now[0]["per_class"]["nishikino_maki"]
        page = api.get("/api/models?size=2").json()
        assert [m["id"] for m in page["models"]] == [failed, current]
        assert [m["id"] for m in api.get(page["next"]).json()["models"]] == [retired]
        refused = api.get("/api/models?status=best")
        assert refused.status_code == 400 and "status must be one of current" in refused.json()["message"]


# ------------------------------------------------------------------------------ who may call ----
def test_api_takes_the_token_a_session_or_basic_auth_and_csrf_only_from_sessions(served: str) -> None:
    with httpx.Client(base_url=served) as anonymous:
        answer = anonymous.get("/api/faces")
        assert answer.status_code == 401 and "log in first" in answer.text
        wrong = anonymous.get("/api/faces", headers=bearer("not-the-token-at-all"))
        assert wrong.status_code == 401 and wrong.text == "wrong API token in the Authorization header"
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        # the token opens the API only, not the pages
        page = anonymous.get("/faces", headers=bearer())
        assert page.status_code == 401 and "/api/" in page.text
        basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        assert anonymous.get("/api/models", headers={"authorization": f"Basic {basic}"}).status_code == 200
        # a POST with the token needs no CSRF token (no model yet: 409, past every check)
        files = {"picture": ("a.png", png(), "image/png")}
        answer = anonymous.post("/api/predict", files=files, headers=bearer())
        assert answer.status_code == 409 and "no model has been trained yet" in answer.json()["message"]
    # a logged-in browser session: CSRF token required on the POST, as on every page
    web = Web(served)
    assert web.post("/login", {"username": USER, "password": PASSWORD}, json_answer=False).status_code == 303
    assert web.get("/api/faces").status_code == 200
    refused = web.client.post("/api/predict", files={"picture": ("a.png", png(), "image/png")})
    assert refused.status_code == 403 and "CSRF" in refused.text
    sent = web.client.post(
        "/api/predict", files={"picture": ("a.png", png(), "image/png")}, headers={"x-csrf-token": web.csrf}
    )
    assert sent.status_code == 409
    # the same token as a multipart form field (the "Who is this?" form sends it so)
    page = web.client.post("/who", files={"picture": ("a.png", png(), "image/png")}, data={"csrf_token": web.csrf})
    assert page.status_code == 409 and "no model has been trained yet" in page.text
    wrong_field = web.client.post("/who", files={"picture": ("a.png", png(), "image/png")}, data={"csrf_token": "x"})
    assert wrong_field.status_code == 403
    # a session may send a picture past the usual 1 MiB body cap
    big = web.client.post(
        "/who",
        files={"picture": ("a.png", png((1200, 1200)) + b"0" * MAX_BODY, "image/png")},
        data={"csrf_token": web.csrf},
    )
    assert big.status_code == 409


def test_wrong_tokens_are_throttled(served: str) -> None:
    with httpx.Client(base_url=served) as anonymous:
        statuses = [anonymous.get("/api/faces", headers=bearer(f"guess-{n:020d}")).status_code for n in range(8)]
        assert statuses[:5] == [401] * 5 and 429 in statuses[5:]


def test_bearer_is_refused_when_no_token_is_set(service_env, redis_client) -> None:
    with serving_in_thread(get_settings()) as base, httpx.Client(base_url=base) as client:
        answer = client.get("/api/faces", headers=bearer())
        assert answer.status_code == 401 and "set WAIFU_WEB_API_TOKEN" in answer.text
        assert client.get("/api/faces").status_code == 200  # loopback without a login: open, as the pages


def test_a_short_token_stops_the_server_from_starting(monkeypatch) -> None:
    monkeypatch.setenv("WAIFU_WEB_API_TOKEN", "short")
    reset_settings_cache()
    with pytest.raises(StartRefused, match="WAIFU_WEB_API_TOKEN has 5 characters"):
        check_bind("127.0.0.1", get_settings())
    reset_settings_cache()


# ----------------------------------------------------------------------------------- limits ----
def test_upload_routes_take_the_download_cap_and_the_rest_keep_theirs(served: str) -> None:
    cap = get_settings().max_download_bytes
    with httpx.Client(base_url=served, headers=bearer()) as api:
        # past the cap by a little: the whole body fits the shield, the file does not
        big = {"picture": ("big.bin", b"\x89PNG" + b"0" * cap, "image/png")}
        answer = api.post("/api/predict", files=big)
        assert answer.status_code == 413 and f"larger than {cap} bytes" in answer.json()["message"]
        # a body over the cap and the form's slack: refused before it is read
        huge = {"picture": ("huge.bin", b"0" * (cap + UPLOAD_SLACK + 1), "image/png")}
        answer = api.post("/api/predict", files=huge)
        assert answer.status_code == 413 and f"at most {cap + UPLOAD_SLACK} bytes" in answer.text
        # no login, no token: a picture past the usual 1 MiB is not even read (the big cap is for clients
        # that may upload); a wrong token counts as a guess
        for headers in ({}, {"authorization": "Bearer not-the-token-at-all"}):
            answer = httpx.post(f"{served}/api/predict", files={"picture": ("p.png", b"0" * MAX_BODY)}, headers=headers)
            assert answer.status_code == 413 and "before a login (log in, or send the API token)" in answer.text
        # other routes keep the 1 MiB cap
        answer = api.post("/api/faces", content=b"0" * (MAX_BODY + 1))
        assert answer.status_code == 413 and f"at most {MAX_BODY} bytes" in answer.text
        # not an image, nothing, not multipart
        text = api.post("/api/predict", files={"picture": ("a.png", b"hello, this is text", "image/png")})
        assert text.status_code == 422 and "not an image" in text.json()["message"]
        empty = api.post("/api/predict", files={"picture": ("a.png", b"", "image/png")})
        assert empty.status_code == 400 and "choose a picture" in empty.json()["message"]
        as_json = api.post("/api/predict", json={"picture": "x"})
        assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["message"]
        off_list = api.post("/api/predict", files={"url": (None, "https://example.com/a.png")})
        assert off_list.status_code == 422 and "not on the allow-list" in off_list.json()["message"]


# ---------------------------------------------------------------------------------- OpenAPI ----
def test_openapi_describes_exactly_the_api_routes(served: str) -> None:
    with httpx.Client(base_url=served) as anonymous:
        spec = anonymous.get("/api/openapi.json").json()  # public: no login
    assert spec["openapi"].startswith("3.1")
    app = create_app(get_settings())
    routes = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route) and route.path.startswith("/api/")
        for method in (route.methods or set()) - {"HEAD"}
    }
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert described == routes
    faces_params = {p["name"] for p in spec["paths"]["/api/faces"]["get"]["parameters"]}
    assert faces_params == {"source", "character", "split", "state", "suggested", "doubtful", "below", "post",
                            "after", "before", "size", "order", "at"}  # fmt: skip
    body = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(body["properties"]) == {"picture", "url"}
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_tensorflow_is_imported_only_when_a_prediction_runs(service_env) -> None:
    """The page and the API serve without TensorFlow in the process; only a prediction loads it."""
    code = """
import sys
from starlette.testclient import TestClient
from core.settings import get_settings
from waifu.web.app import create_app
client = TestClient(create_app(get_settings()), base_url="http://127.0.0.1")
for url in ("/who", "/api/faces", "/api/models", "/api/openapi.json", "/faces", "/models"):
    assert client.get(url).status_code == 200, url
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
