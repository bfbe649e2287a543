"""The web page's hardening (security review 2026-12-03, issue 21), over real HTTP against uvicorn in a
thread: body caps before anything reads a body, password guesses throttled and logged, a strong password
off loopback, CSRF tokens bound to the session, Secure cookies, headers on every response (500s included),
Cache-Control, the models page without Redis, and the expensive pictures refused cross-site and cached.

The layer under test is HTTP, not the database: these run on SQLite only (test_web.py and the fuzz test
run the pages on both databases)."""

from __future__ import annotations

import base64
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from core.settings import get_settings, reset_settings_cache
from tests.support.env import PROJECT_ROOT
from tests.support.web import Web, make_collection, page_csrf
from waifu.web import pictures
from waifu.web.security import StartRefused, check_bind
from waifu.web.server import serving_in_thread
from waifu.web.shield import MAX_BODY, MAX_LOGIN_BODY, SECURITY_HEADERS
from waifu.web.throttle import Throttle, Throttled

PASSWORD = "correct-horse-battery"
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def login_env(service_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WAIFU_WEB_USER", "curator")
    monkeypatch.setenv("WAIFU_WEB_PASSWORD", PASSWORD)
    reset_settings_cache()
    yield
    reset_settings_cache()


@pytest.fixture
def served(service_env, redis_client) -> Iterator[str]:
    with serving_in_thread(get_settings()) as base:
        yield base


def log_in(web: Web, password: str = PASSWORD) -> httpx.Response:
    return web.post("/login", {"username": "curator", "password": password}, json_answer=False, follow_redirects=False)


def raw_request(base: str, head: bytes, chunks: list[bytes], timeout: float = 30) -> bytes:
    """Sends a request head and some body bytes on a plain socket (never the end of a chunked body), then
    reads what the server answers: an answer here means it did not wait for the rest."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: read that answer
        answer = b""
        while True:  # the refusal closes the connection (Connection: close): read up to that
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            answer += data
        return answer


# ------------------------------------------------------------------------------ body caps ----
@sqlite_only
def test_a_declared_body_over_the_cap_is_refused_before_it_is_read(login_env, served) -> None:
    """Review row 5: /login needs no login; a large body used to be read whole before the CSRF check."""
    head = (
        b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n" % (64 * 1024 * 1024)
    )
    answer = raw_request(served, head, [b"a" * 1024])  # 1 KiB of the announced 64 MiB
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert f"this address accepts at most {MAX_LOGIN_BODY} bytes".encode() in answer, answer[:500]
    with httpx.Client(base_url=served) as client:
        small = client.post("/login", content=b"a" * (MAX_LOGIN_BODY + 1), headers={"content-type": "text/plain"})
        assert small.status_code == 413 and f"at most {MAX_LOGIN_BODY} bytes" in small.text
        assert all(small.headers.get(k) == v for k, v in SECURITY_HEADERS.items())


@sqlite_only
def test_a_chunked_body_is_cut_off_at_the_cap_while_it_streams(login_env, served) -> None:
    """No Content-Length: the cap holds on the running count, and the answer comes before the body ends."""
    web = Web(served)
    assert log_in(web).status_code == 303
    token = web.csrf
    cookies = "; ".join(f"{k}={v}" for k, v in web.client.cookies.items())
    head = (
        b"POST /faces/action HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nX-CSRF-Token: " + token.encode() + b"\r\n"
        b"Cookie: " + cookies.encode() + b"\r\n\r\n"
    )
    piece = b"ids=" + b"1," * 32_000
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    chunks = [chunk] * (2 * MAX_BODY // len(piece) + 2)  # a little over twice the cap, never terminated
    answer = raw_request(served, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert f"this address accepts at most {MAX_BODY} bytes".encode() in answer, answer[:500]
    # a body under the cap goes through to the route as before
    ok = web.post("/faces/action", {"action": "reject", "ids": "1," * 1000})
    assert ok.status_code == 404 and "no face with id 1" in ok.json()["message"]


# ------------------------------------------------------------------------- password guesses ----
def test_throttle_grows_per_client_and_in_total() -> None:
    now = [1000.0]
    throttle = Throttle(free=5, total_free=20, base=1.0, cap=900.0, total_cap=60.0, clock=lambda: now[0])
    for _ in range(5):
        throttle.check("a")
        throttle.failed("a", "test")
    throttle.check("a")  # five failures are free
    waits = []
    for _ in range(5):
        throttle.failed("a", "test")
        with pytest.raises(Throttled) as locked:
            throttle.check("a")
        waits.append(locked.value.wait)
        now[0] += locked.value.wait  # wait exactly as long as asked
        throttle.check("a")
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0]
    throttle.check("b")  # another client is not locked by a's failures...
    for n in range(11):  # ...until everyone together failed more than total_free times
        throttle.failed(f"spread-{n}", "test")
    with pytest.raises(Throttled):
        throttle.check("b")
    now[0] += 61  # the total lock is capped at a minute
    throttle.check("b")
    throttle.succeeded("a")
    assert "a" not in throttle.clients
    for _ in range(200):
        throttle.failed("c", "test")
    with pytest.raises(Throttled) as capped:
        throttle.check("c")
    assert capped.value.wait <= 900
    now[0] += 3601  # an hour without a failure forgets everything
    throttle.check("c")
    assert not throttle.clients and throttle.total.count == 0


@sqlite_only
def test_wrong_passwords_are_throttled_logged_and_lock_out_the_right_one(
    login_env, served, caplog: pytest.LogCaptureFixture
) -> None:
    """Review row 6: 100 wrong basic-auth guesses in a second, then the right password was accepted."""
    web = Web(served)
    caplog.set_level(logging.WARNING, logger="waifu.web")
    for _ in range(6):
        wrong = log_in(web, "guess")
        assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    locked = log_in(web)  # the right password, too soon after: not even looked at
    assert locked.status_code == 429 and "too many failed logins: try again in" in locked.text
    assert int(locked.headers["retry-after"]) >= 1
    assert "waifu_session" not in web.client.cookies
    bad = base64.b64encode(b"curator:guess").decode()
    basic = web.get("/models/retrain/status", headers={"authorization": f"Basic {bad}", "accept": "*/*"})
    assert basic.status_code == 429 and int(basic.headers["retry-after"]) >= 1  # basic auth shares the count
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("login failed")]
    assert len(failures) == 6 and 'via="login form"' in failures[0] and "client=127.0.0.1" in failures[0]
    assert "guess" not in " ".join(failures), "a guess is never logged (it may be a mistyped real password)"


@pytest.mark.parametrize("password", ["x", " ", "eleven-char"])
def test_off_loopback_needs_a_password_of_12_characters(password, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAIFU_WEB_USER", "curator")
    monkeypatch.setenv("WAIFU_WEB_PASSWORD", password)
    reset_settings_cache()
    try:
        with pytest.raises(StartRefused, match=f"has {len(password)} characters, off loopback it needs at least 12"):
            check_bind("0.0.0.0", get_settings())
        check_bind("127.0.0.1", get_settings())  # on loopback the owner decides
        monkeypatch.setenv("WAIFU_WEB_PASSWORD", password + "-made-longer")
        reset_settings_cache()
        check_bind("0.0.0.0", get_settings())
    finally:
        reset_settings_cache()


def test_waifu_web_refuses_a_one_space_password_off_loopback(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAIFU_WEB_")}
    refused = subprocess.run(
        [sys.executable, "-m", "waifu.cli", "web", "--host", "0.0.0.0", "--port", "1"],
        env={**env, "WAIFU_WEB_USER": "admin", "WAIFU_WEB_PASSWORD": " ", "WAIFU_DATA_DIR": str(tmp_path)},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert "WAIFU_WEB_PASSWORD has 1 characters, off loopback it needs at least 12" in " ".join(refused.stderr.split())


# ------------------------------------------------------------------------------------ CSRF ----
@sqlite_only
def test_the_csrf_token_is_bound_to_the_session_and_new_at_login(login_env, served) -> None:
    """Review row 14: a token an attacker planted (a cookie set from a sibling host) must not survive a login."""
    attacker = Web(served)
    planted_visitor = attacker.client.get("/login").cookies["waifu_visitor"]
    planted_token = attacker.csrf  # what the attacker's own visit shows for that visitor cookie
    victim = Web(served)
    victim.client.cookies.set("waifu_visitor", planted_visitor)
    assert victim.csrf == planted_token  # before a login the token follows the visitor cookie...
    assert log_in(victim).status_code == 303
    after = victim.csrf
    assert after != planted_token  # ...a login makes a new one, bound to the new session
    forged = victim.client.post("/faces/undo", data={"csrf_token": planted_token})
    assert forged.status_code == 403 and "CSRF token" in forged.text
    other = Web(served)
    assert log_in(other).status_code == 303
    assert other.csrf != after  # each session its own token
    crossed = victim.client.post("/faces/undo", headers={"x-csrf-token": other.csrf, "accept": "application/json"})
    assert crossed.status_code == 403
    accepted = victim.client.post("/faces/undo", headers={"x-csrf-token": after, "accept": "application/json"})
    assert accepted.status_code == 409 and accepted.json()["message"] == "nothing to undo"
    # logging out ends the session: its token goes with it
    victim.post("/logout", json_answer=False)
    gone = victim.client.post("/faces/undo", headers={"x-csrf-token": after, "accept": "application/json"})
    assert gone.status_code in (401, 403)


@sqlite_only
@pytest.mark.parametrize(
    ("env", "headers", "secure"),
    [
        ({}, {}, False),
        ({"WAIFU_WEB_SECURE_COOKIES": "true"}, {}, True),
        ({"WAIFU_WEB_TRUST_PROXY": "true"}, {"x-forwarded-proto": "https"}, True),
        ({"WAIFU_WEB_TRUST_PROXY": "true"}, {"x-forwarded-proto": "http"}, False),
        ({}, {"x-forwarded-proto": "https"}, False),  # an untrusted header changes nothing
    ],
    ids=["plain", "setting", "trusted-proxy", "trusted-proxy-http", "untrusted-header"],
)
def test_cookies_are_secure_over_https(login_env, redis_client, monkeypatch, env, headers, secure) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    with serving_in_thread(get_settings()) as base, httpx.Client(base_url=base, headers=headers) as client:
        form = client.get("/login")
        token = page_csrf(form.text)
        client.cookies.clear()  # a Secure cookie is not sent back over http: send it as a browser over https would
        client.cookies.set("waifu_visitor", form.cookies["waifu_visitor"])
        answer = client.post(
            "/login", data={"csrf_token": token, "username": "curator", "password": PASSWORD}, follow_redirects=False
        )
    assert answer.status_code == 303
    session = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("waifu_session="))
    visitor = next(c for c in form.headers.get_list("set-cookie") if c.startswith("waifu_visitor="))
    for cookie in (session, visitor):
        assert ("; secure" in cookie.lower()) is secure, cookie
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert f"Max-Age={12 * 3600}" in session


# ------------------------------------------------------------------------------- headers ----
@sqlite_only
def test_every_answer_carries_the_security_headers_a_500_too(service_env, redis_client, monkeypatch) -> None:
    """Review row 13: the 500s of Starlette's error handling went out without them."""
    import waifu.web.faces_page as faces_page

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(faces_page, "faces_page", broken)
    with serving_in_thread(get_settings()) as base:
        # one connection each: uvicorn closes the connection after an error that escaped the application
        requests = {
            "500": ("GET", "/faces", {"accept": "text/html"}),
            "500-json": ("GET", "/faces", {"accept": "application/json"}),
            "404": ("GET", "/nowhere", {}),
            "static": ("GET", "/static/waifu.css", {}),
            "400": ("GET", "/faces", {"host": "evil.example"}),
            "403": ("POST", "/faces/undo", {}),
        }
        answers = {}
        for name, (method, path, headers) in requests.items():
            with httpx.Client(base_url=base) as client:
                answers[name] = client.request(method, path, headers=headers)
    assert answers["500"].status_code == 500 and "internal error" in answers["500"].text
    for name, answer in answers.items():
        missing = {k for k, v in SECURITY_HEADERS.items() if answer.headers.get(k) != v}
        assert not missing, (name, answer.status_code, missing)


@sqlite_only
def test_authenticated_pages_are_never_cached(login_env, served) -> None:
    web = Web(served)
    make_collection()
    log_in(web)
    for path in ("/faces", "/collection", "/models", "/models/retrain/status", "/login"):
        answer = web.get(path)
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store", path
    crop = web.get("/faces/1/crop.png")
    assert crop.headers["cache-control"] == "private, max-age=300"  # a picture keeps its own


# ----------------------------------------------------------------------- models without Redis ----
@sqlite_only
def test_models_page_and_its_poll_work_without_the_broker(service_env, redis_client, monkeypatch) -> None:
    """Review row 15: /models and /models/retrain/status were 500s with Redis down."""
    monkeypatch.setenv("WAIFU_BROKER_URL", "redis://127.0.0.1:1/9")
    reset_settings_cache()
    make_collection()
    with serving_in_thread(get_settings()) as base:
        web = Web(base)
        page = web.get("/models")
        assert page.status_code == 200 and "broker unreachable: retrain unavailable" in page.text
        assert 'id="no-models"' in page.text  # the rest of the page is there
        status = web.get("/models/retrain/status", headers={"accept": "application/json"})
        assert status.status_code == 200 and status.json()["phase"] == "unavailable"
        assert status.json()["reason"].startswith("broker unreachable: retrain unavailable")
        pressed = web.post("/models/retrain")
        assert pressed.status_code == 503 and pressed.json()["message"].startswith("broker unreachable")
        assert web.get("/collection").status_code == 200
        assert web.get("/faces").status_code == 200


# --------------------------------------------------------------------- expensive pictures ----
@sqlite_only
def test_expensive_pictures_are_refused_cross_site_and_made_once(service_env, redis_client) -> None:
    """Review row 19: another site could make a visitor's browser decode illustrations and draw charts."""
    faces = make_collection()
    face_id = faces["ambiguous"][0]
    before = pictures.SOURCES.renders
    with serving_in_thread(get_settings()) as base:
        web = Web(base)
        for path in (f"/faces/{face_id}/source.png", "/collection/growth.png"):
            cross = web.get(path, headers={"sec-fetch-site": "cross-site", "accept": "image/png"})
            assert cross.status_code == 403 and "this site's own pages only" in cross.text, path
            for site in ("same-origin", "none", None):
                headers = {"sec-fetch-site": site} if site else {}
                assert web.get(path, headers=headers).status_code == 200, (path, site)
        first = web.get(f"/faces/{face_id}/source.png").content
        assert pictures.SOURCES.renders == before + 1  # four answers, one decoding
        post = get_settings().data_dir / "images/101.png"
        os.utime(post, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: drawn again
        assert web.get(f"/faces/{face_id}/source.png").content == first
        assert pictures.SOURCES.renders == before + 2


def test_picture_cache_keeps_a_byte_budget_and_an_age_limit() -> None:
    now = [0.0]
    cache = pictures.PictureCache(max_bytes=10, ttl=60, clock=lambda: now[0])
    made = []

    def maker(key: str, size: int):
        return lambda: made.append(key) or b"x" * size

    assert cache.get("a", maker("a", 4)) == b"xxxx"
    cache.get("a", maker("a", 4))
    cache.get("b", maker("b", 4))
    cache.get("a", maker("a", 4))  # a is now the most recent
    cache.get("c", maker("c", 4))  # over 10 bytes: b, the least recent, goes
    cache.get("a", maker("a", 4))
    cache.get("b", maker("b", 4))
    assert made == ["a", "b", "c", "b"]
    now[0] = 61
    cache.get("b", maker("b", 4))
    assert made[-1] == "b" and len(made) == 5
    cache.get("huge", maker("huge", 11))  # served, never kept
    cache.get("huge", maker("huge", 11))
    assert made.count("huge") == 2


async def test_a_body_that_never_finishes_arriving_is_cut_off() -> None:
    """A body that drips in holds a connection: the shield stops waiting after its time limit (408)."""
    import asyncio

    from waifu.web.shield import Shield

    reached = []

    async def app(scope, receive, send):  # what is behind the shield must never run
        reached.append(scope["path"])

    async def dripping_receive():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"a", "more_body": True}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/login", "headers": [], "query_string": b""}
    await Shield(app, body_seconds=0.3)(scope, dripping_receive, send)
    assert reached == []
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    assert b"did not arrive within" in b"".join(m.get("body", b"") for m in sent[1:])
