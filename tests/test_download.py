"""The download step over real HTTP against the fake, on SQLite and PostgreSQL, with the Redis limiter.

Each bad input must end `failed` or `skipped` with a reason a person can read, and leave a good row in
the same run untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import multiprocessing
import re
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor

import pytest
from aiohttp import web
from PIL import Image

from core.ratelimit import rate_items, wait_for_slot, whole_rate
from core.settings import Settings, get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Post, PostState
from download.step import backoff, download_post
from tests.support.env import TEST_REDIS_URL
from tests.support.fake_safebooru import FakePost, FakeSafebooru, load_drawn
from tests.support.limits import max_in_window


class StreamingFake(FakeSafebooru):
    """The fake plus two file faults this module needs: "chunked" (no Content-Length, so the size cap can
    only be enforced on the running count) and "429_once" (rate limited once, with a Retry-After)."""

    retry_after_file: str = "7"

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        post = next((p for p in self.posts.values() if p.image == name), None)
        if post is None or post.fault not in ("chunked", "429_once"):
            return await super()._file(request)
        self._record(request)
        self.file_hits[post.id] = self.file_hits.get(post.id, 0) + 1
        if post.fault == "429_once" and self.file_hits[post.id] == 1:
            return web.Response(status=429, text="slow down", headers={"Retry-After": self.retry_after_file})
        if post.fault == "429_once":
            return web.Response(body=post.data, content_type="image/png")
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(post.data), 4096):
            await response.write(post.data[start : start + 4096])
        await response.write_eof()
        return response


@pytest.fixture
async def fake() -> StreamingFake:
    """Overrides conftest's fake for this module with the subclass above."""
    site = StreamingFake()
    await site.start()
    yield site
    await site.stop()


@pytest.fixture
def dl_settings(service_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("WAIFU_DEFAULT_SITE_URL", fake.base_url)
    monkeypatch.setenv("WAIFU_DOWNLOAD_RETRIES", "2")
    monkeypatch.setenv("WAIFU_DOWNLOAD_BACKOFF_S", "0.01")
    reset_settings_cache()
    return get_settings()


def list_post(fake: FakeSafebooru, post: FakePost, image: str | None = None) -> int:
    """Inserts the row the scraper would have made from the fake's JSON for this post."""
    api = fake._json(post)
    with session_scope() as session:
        session.add(
            Post(
                id=post.id,
                md5=api["hash"],
                file_url=api["file_url"],
                image=image or api["image"],
                directory=str(api["directory"]),
                tags=post.tags,
                rating=post.rating,
            )
        )
    return post.id


async def run_download(post_id: int, settings: Settings, max_tries: int = 10) -> Post:
    """Calls download_post the way the Celery task does, retries included; returns the final row."""
    for _ in range(max_tries):
        outcome = await asyncio.to_thread(download_post, post_id, settings)
        if outcome.retry_in is None:
            break
    with session_scope() as session:
        return session.get(Post, post_id)


def png_bytes(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def good(fake: FakeSafebooru) -> FakePost:
    """A good PNG drawn here (downloading checks bytes and format, never a face), several 4 KiB chunks long."""
    post = load_drawn(fake, {"nishikino_maki": 1}, size=(400, 300))[0]
    assert post.image.endswith(".png") and len(post.data) > 3 * 4096
    return post


def new(fake: FakeSafebooru, data: bytes, **kw) -> FakePost:
    kw.setdefault("image", f"{hashlib.md5(data).hexdigest()}.jpg")
    return fake.add(FakePost(id=fake.next_id(), tags="maki", data=data, **kw))


async def test_good_file_is_stored_by_hash_and_verified(dl_settings, fake, good) -> None:
    outcome = await asyncio.to_thread(download_post, list_post(fake, good), dl_settings)
    assert outcome.state is PostState.downloaded and outcome.retry_in is None
    with session_scope() as session:
        row = session.get(Post, good.id)
    assert row.state == PostState.downloaded and row.reason is None and row.attempts == 1
    stored = dl_settings.data_dir / row.stored_path
    assert stored.name == f"{good.md5}.png" and stored.parent.name == good.md5[:2]
    assert hashlib.md5(stored.read_bytes()).hexdigest() == good.md5
    assert row.file_size == len(good.data)
    # a duplicate message is a no-op: no second request
    again = await asyncio.to_thread(download_post, good.id, dl_settings)
    assert again.state is PostState.downloaded
    assert fake.file_hits[good.id] == 1
    with session_scope() as session:
        assert session.get(Post, good.id).attempts == 1


async def test_two_messages_for_one_post_at_once_fetch_it_once(dl_settings, fake, good, monkeypatch) -> None:
    """Two workers take duplicate messages of one post at the same moment: only one claim is granted."""
    import download.step as step

    post_id = list_post(fake, good)
    both_ask, both_answered = threading.Barrier(2, timeout=60), threading.Barrier(2, timeout=60)
    real_claim = step.claim

    def claim_together(*args, **kwargs):
        both_ask.wait()  # both claims are made at the same moment...
        try:
            return real_claim(*args, **kwargs)
        finally:
            both_answered.wait()  # ...and both are answered before either worker fetches anything

    monkeypatch.setattr(step, "claim", claim_together)
    outcomes = await asyncio.gather(*(asyncio.to_thread(download_post, post_id, dl_settings) for _ in range(2)))
    assert fake.file_hits[good.id] == 1, "the file was fetched by both workers"
    assert PostState.downloaded in [o.state for o in outcomes]
    with session_scope() as session:
        row = session.get(Post, post_id)
    assert row.state == PostState.downloaded and row.attempts == 1 and row.claim_token is None


def test_download_backoff_doubles_with_jitter_and_honours_retry_after() -> None:
    settings = Settings(_env_file=None, download_backoff_s=1.0)
    for attempts in (1, 2, 3, 4):
        waits = [backoff(settings, attempts, None) for _ in range(200)]
        base = 2 ** (attempts - 1)
        assert base * 0.8 <= min(waits) and max(waits) <= base * 1.2, (attempts, min(waits), max(waits))
        assert max(waits) - min(waits) > 0.1 * base, "jittered, so retries of many posts do not come at once"
    assert backoff(settings, 3, 7.0) == 7.0, "a server's Retry-After wins over the backoff"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda f, g: new(f, g.data + b"!", fault="md5_mismatch"), "md5 mismatch: API announced"),
        (
            lambda f, g: new(f, b"<!DOCTYPE html><html><body>Nope</body></html>", fault="html"),
            "not an image: an HTML page",
        ),
        (lambda f, g: new(f, bytes(range(256)) * 40), r"not an image: starts with b'\x00\x01\x02"),
        # Pillow could decode TIFF, but only the formats we store are ever tried on fetched bytes
        (lambda f, g: new(f, png_bytes((8, 8), fmt="TIFF")), "not an image: starts with b'II*\\x00"),
        (
            lambda f, g: new(f, png_bytes((20000, 20000), mode="1"), image="bomb.png"),
            "image is 20000x20000 = 400 MP, over the 80 MP limit",
        ),
        (
            lambda f, g: new(f, g.data + b"r", fault="redirect_offsite"),
            "redirect to disallowed host 'evil.example.invalid' refused",
        ),
        (lambda f, g: new(f, g.data + b"4", fault="404"), "HTTP 404 Not Found: file gone"),
        # the body breaks off mid-way: retried, then given up with what went wrong
        (
            lambda f, g: new(f, g.data + b"t", fault="truncated"),
            re.compile(
                r"^gave up after 3 attempts: (connection broke off mid-body \(truncated\?\)|truncated body: "
                r"got \d+ of \d+ bytes)"
            ),
        ),
    ],
    ids=["md5-mismatch", "html", "not-image", "tiff", "pixel-bomb", "offsite-redirect", "404", "truncated"],
)
async def test_bad_input_fails_with_reason_and_good_row_goes_on(dl_settings, fake, good, make, reason) -> None:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    bad = make(fake, good)
    bad_id, good_id = list_post(fake, bad), list_post(fake, good)
    bad_row = await run_download(bad_id, dl_settings)
    good_row = await run_download(good_id, dl_settings)
    assert bad_row.state == PostState.failed
    assert reason.search(bad_row.reason) if isinstance(reason, re.Pattern) else reason in bad_row.reason, bad_row.reason
    assert bad_row.stored_path is None
    # a refusal is final at once; only transient trouble (the truncated body) is tried again
    assert bad_row.attempts == (3 if isinstance(reason, re.Pattern) else 1)
    assert good_row.state == PostState.downloaded
    leftovers = [p.name for p in dl_settings.images_dir.rglob(".download-*")]
    assert leftovers == [], "temp files must be cleaned up"
    assert pillow_limit == Image.MAX_IMAGE_PIXELS, "Pillow's own bomb guard must be restored for the process"


async def test_image_name_with_path_traversal_is_refused_before_any_request(dl_settings, fake, good) -> None:
    evil = new(fake, good.data + b"e")
    row = await run_download(list_post(fake, evil, image="../../../etc/passwd.jpg"), dl_settings)
    assert row.state == PostState.failed and "unsafe image name" in row.reason and "../" in row.reason
    assert fake.file_hits.get(evil.id, 0) == 0
    assert (await run_download(list_post(fake, good), dl_settings)).state == PostState.downloaded


async def test_url_off_the_allow_list_is_refused(dl_settings, fake, good) -> None:
    with session_scope() as session:
        session.add(Post(id=1, md5=good.md5, file_url="https://evil.example.org/x.jpg"))
        session.add(Post(id=2, md5=good.md5[::-1], file_url="file:///etc/passwd"))
        session.add(Post(id=3, md5=good.md5[::-1], file_url=f"{fake.base_url}/images/1000/%2e%2e/secret.jpg"))
        session.add(Post(id=4, md5=good.md5[::-1], file_url=f"{fake.base_url}/images/%252e%252e/secret.jpg"))
    assert "not on the allow-list" in (await run_download(1, dl_settings)).reason
    assert "refused URL scheme 'file'" in (await run_download(2, dl_settings)).reason
    assert "path traversal in URL refused" in (await run_download(3, dl_settings)).reason
    assert "path traversal in URL refused" in (await run_download(4, dl_settings)).reason
    assert fake.file_requests() == [], "refused before any request"
    assert (await run_download(list_post(fake, good), dl_settings)).state == PostState.downloaded


async def test_same_host_redirect_is_followed(dl_settings, fake, good) -> None:
    moved = new(fake, good.data + b"m", fault="redirect_local")
    moved.announced_md5 = None
    row = await run_download(list_post(fake, moved), dl_settings)
    assert row.state == PostState.downloaded
    assert fake.file_hits[moved.id] == 2  # the redirect and the file


async def test_503_once_then_success_after_retry(dl_settings, fake, good) -> None:
    flaky = new(fake, good.data + b"5", fault="503_once")
    post_id = list_post(fake, flaky)
    first = await asyncio.to_thread(download_post, post_id, dl_settings)
    assert first.retry_in is not None and "HTTP 503" in first.reason
    with session_scope() as session:
        retrying = session.get(Post, post_id)
    assert retrying.state == PostState.discovered
    assert retrying.reason.startswith("retrying: HTTP 503") and "(attempt 1 of 3)" in retrying.reason
    row = await run_download(post_id, dl_settings)
    assert row.state == PostState.downloaded and row.attempts == 2 and row.reason is None


async def test_same_md5_under_another_id_is_skipped(dl_settings, fake, good) -> None:
    repost = fake.add(FakePost(id=fake.next_id(), tags="maki", data=good.data, image="again.png"))
    first = await run_download(list_post(fake, good), dl_settings)
    second = await run_download(list_post(fake, repost), dl_settings)
    assert first.state == PostState.downloaded
    assert second.state == PostState.skipped and second.duplicate_of == good.id
    assert second.reason.startswith(f"duplicate of post {good.id}")
    assert fake.file_hits.get(repost.id, 0) == 0


async def test_429_retry_after_is_honoured(dl_settings, fake, good) -> None:
    limited = new(fake, good.data + b"9", fault="429_once")
    limited.announced_md5 = None
    first = await asyncio.to_thread(download_post, list_post(fake, limited), dl_settings)
    assert first.state is PostState.discovered and first.retry_in == 7.0 and "HTTP 429" in first.reason
    # PNG with trailing bytes still loads: the retry stores it
    assert (await run_download(limited.id, dl_settings)).state == PostState.downloaded


@pytest.mark.parametrize("fault", [None, "chunked"], ids=["content-length", "running-count"])
async def test_size_cap_is_enforced_while_streaming(dl_settings, fake, good, monkeypatch, fault) -> None:
    monkeypatch.setenv("WAIFU_MAX_DOWNLOAD_BYTES", str(len(good.data) + 1000))
    reset_settings_cache()
    settings = get_settings()
    big = new(fake, good.data + bytes(50_000), fault=fault)
    bad_row = await run_download(list_post(fake, big), settings)
    good_row = await run_download(list_post(fake, good), settings)
    assert bad_row.state == PostState.failed and bad_row.stored_path is None
    expected = f"file is {len(big.data)} bytes, over the" if fault is None else "(stopped after"
    assert expected in bad_row.reason and f"{len(good.data) + 1000} byte cap" in bad_row.reason
    assert good_row.state == PostState.downloaded
    assert list(settings.images_dir.rglob(".download-*")) == []


async def test_chunked_body_without_length_is_stored(dl_settings, fake, good) -> None:
    chunked = new(fake, good.data + b"c", fault="chunked")
    row = await run_download(list_post(fake, chunked), dl_settings)
    assert row.state == PostState.downloaded and row.file_size == len(chunked.data)
    assert hashlib.md5((dl_settings.data_dir / row.stored_path).read_bytes()).hexdigest() == chunked.md5


async def test_unexpected_error_fails_the_row_with_its_text(dl_settings, fake, good) -> None:
    dl_settings.data_dir.mkdir(parents=True, exist_ok=True)
    dl_settings.images_dir.write_text("a file where the images dir should be")
    row = await run_download(list_post(fake, good), dl_settings)
    assert row.state == PostState.failed and row.reason.startswith("unexpected error: FileExistsError")


def test_fractional_rates_become_whole_seconds_never_faster() -> None:
    assert whole_rate(2) == (2, 1)
    assert whole_rate(0.5) == (1, 2)
    assert whole_rate(0.3) == (3, 10)
    assert whole_rate(0.005) == (1, 200)  # slower than one per minute still means one per 200 s
    for rate in (0.005, 0.01, 0.1, 0.3, 0.7, 1.5, 1.9999, 2, 2.5, 7.3, 50):
        amount, period = whole_rate(rate)
        assert 0 < amount / period <= rate, rate


def test_multi_second_windows_get_a_burst_cap() -> None:
    # 7 per 10 s alone would allow all 7 at once: a 1-per-second companion spreads them
    assert [(i.amount, i.multiples) for i in rate_items(0.7)] == [(1, 1), (7, 10)]
    assert [(i.amount, i.multiples) for i in rate_items(2.5)] == [(3, 1), (5, 2)]
    assert [(i.amount, i.multiples) for i in rate_items(2)] == [(2, 1)]
    assert [(i.amount, i.multiples) for i in rate_items(0.5)] == [(1, 2)]


def hammer(host: str, settings: Settings, seconds: float) -> list[float]:
    """Takes slots as fast as the limit allows; returns when each was granted (monotonic, system-wide)."""
    grants = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        wait_for_slot(host, settings.downloads_per_second, settings.broker_url)
        grants.append(time.monotonic())
    return grants


def test_host_limit_is_shared_across_processes(redis_client) -> None:
    settings = Settings(broker_url=TEST_REDIS_URL, downloads_per_second=2)
    host = f"img-{uuid.uuid4().hex[:8]}.example"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        runs = [pool.submit(hammer, host, settings, 3.0) for _ in range(2)]
        per_process = [run.result(timeout=30) for run in runs]
    grants = sorted(t for run in per_process for t in run)
    assert all(per_process), "both processes must get slots"
    assert len(grants) >= 6, "the limit must let the rate through, not just block"
    # grants are timestamped after the call returns: allow 20 ms of measurement jitter on the window
    assert max_in_window(grants, window=0.98) <= 2


def test_fractional_host_limit_spreads_its_grants(redis_client) -> None:
    settings = Settings(broker_url=TEST_REDIS_URL, downloads_per_second=1.5)  # 3 per 2 s, at most 2 per 1 s
    host = f"img-{uuid.uuid4().hex[:8]}.example"
    grants: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        times = hammer(host, settings, 2.2)
        with lock:
            grants.extend(times)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(grants) >= 3
    assert max_in_window(grants, window=0.98) <= 2
    assert max_in_window(grants, window=1.98) <= 3


async def test_downloads_share_one_tls_context(dl_settings, fake, monkeypatch) -> None:
    """Each download makes its own httpx Client; building a TLS context per Client loaded the CA bundle per
    file, the io worker's memory growth in soak runs. Three downloads load it once."""
    import ssl

    from download.tls import shared_context

    loads = []
    original = ssl.SSLContext.load_verify_locations

    def counting(self, *args, **kwargs):
        loads.append(args or kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    shared_context.cache_clear()
    posts = load_drawn(fake, {"nishikino_maki": 3}, size=(200, 150))
    for post in posts:
        row = await run_download(list_post(fake, post), dl_settings)
        assert row.state == PostState.downloaded, row.reason
    assert len(loads) == 1
