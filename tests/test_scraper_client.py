"""The safebooru client against the local fake over real HTTP: quirks, retries, politeness."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from core.errors import DeepPagination, Refused
from core.settings import Settings
from scraper.client import ApiPost, BooruClient, parse_posts
from tests.support.fake_safebooru import FakePost, FakeSafebooru, load_drawn
from tests.support.limits import max_in_window

# pictures drawn with Pillow: the client reads the API, never a face; a different count per tag
COUNTS = {"nishikino_maki": 4, "sakurauchi_riko": 3, "takimoto_hifumi": 5}


def settings_for(fake: FakeSafebooru, **overrides) -> Settings:
    values = {
        "default_site_url": fake.base_url,
        "requests_per_second": 50,
        "api_backoff_s": 0.01,
        "api_backoff_max_s": 5,
        "api_retries": 3,
        "page_size": 100,
    } | overrides
    return Settings(_env_file=None, **values)


async def fetch(fake: FakeSafebooru, tags: str, **overrides) -> tuple[list[ApiPost], BooruClient]:
    settings = settings_for(fake, **overrides)
    async with aiohttp.ClientSession() as http:
        client = BooruClient(http, settings)
        return await client.fetch_posts(tags), client


async def test_parses_posts_with_the_apis_quirks(fake: FakeSafebooru) -> None:
    published = load_drawn(fake, COUNTS)
    posts, _ = await fetch(fake, "nishikino_maki")
    assert [p.id for p in posts] == sorted((p.id for p in published if "nishikino_maki" in p.tags), reverse=True)
    assert len(posts) == COUNTS["nishikino_maki"]
    first = posts[0]
    source = fake.posts[first.id]
    assert first.md5 == source.md5 and first.score is None and first.tags == source.tags
    assert first.file_url.endswith(f"//images/{source.directory}/{source.image}")
    assert first.width == source.width and first.rating == "general"


async def test_empty_body_means_no_posts(fake: FakeSafebooru) -> None:
    posts, client = await fetch(fake, "nobody_at_all")
    assert posts == [] and client.requests == 1


async def test_malformed_json_is_retried_then_reported(fake: FakeSafebooru) -> None:
    load_drawn(fake, dict.fromkeys(COUNTS, 1))
    fake.api_faults.extend(["malformed", "truncated"])
    posts, client = await fetch(fake, "nishikino_maki")
    assert len(posts) == 1 and client.requests == 3

    fake.api_faults.extend(["malformed"] * 10)
    with pytest.raises(Refused, match="gave up after 4 attempts: malformed JSON"):
        await fetch(fake, "nishikino_maki")


async def test_429_retry_after_is_honoured(fake: FakeSafebooru) -> None:
    load_drawn(fake, dict.fromkeys(COUNTS, 1))
    fake.retry_after = "1"
    fake.api_faults.append("429")
    posts, client = await fetch(fake, "nishikino_maki")
    assert len(posts) == 1 and client.requests == 2
    first, second = fake.api_requests()
    assert second.at - first.at >= 0.95, "the client came back before Retry-After elapsed"


async def test_burst_of_503_then_success(fake: FakeSafebooru) -> None:
    load_drawn(fake, dict.fromkeys(COUNTS, 1))
    fake.api_faults.extend(["503"] * 3)
    # a first backoff well above the limiter's spacing (1/50 s), so the gaps measure the backoff alone
    posts, client = await fetch(fake, "nishikino_maki", api_backoff_s=0.1)
    assert len(posts) == 1 and client.requests == 4
    gaps = [b.at - a.at for a, b in zip(fake.api_requests(), fake.api_requests()[1:], strict=False)]
    # the n-th wait is 0.1 * 2**n jittered by x0.5..x1.5: at least 0.05, 0.1, 0.2 s. A constant backoff
    # (at most 0.15 s) cannot reach the third bound, no backoff at all cannot reach the first (2 ms: the
    # event loop's clock resolution)
    assert [g >= 0.1 * 2**n * 0.5 - 0.002 for n, g in enumerate(gaps)] == [True] * 3, gaps


async def test_503_forever_is_bounded(fake: FakeSafebooru) -> None:
    fake.api_faults.extend(["503"] * 10)
    with pytest.raises(Refused, match="HTTP 503"):
        await fetch(fake, "nishikino_maki", api_retries=2)
    assert len(fake.api_requests()) == 3


async def test_deep_pagination_is_a_distinct_error(fake: FakeSafebooru) -> None:
    load_drawn(fake, dict.fromkeys(COUNTS, 1))
    settings = settings_for(fake)
    async with aiohttp.ClientSession() as http:
        client = BooruClient(http, settings)
        with pytest.raises(DeepPagination):
            await client.fetch_posts("nishikino_maki", pid=500)
        assert client.requests == 1, "a refused deep page is not retried"


async def test_count_comes_from_the_xml_answer(fake: FakeSafebooru) -> None:
    load_drawn(fake, COUNTS)
    async with aiohttp.ClientSession() as http:
        client = BooruClient(http, settings_for(fake))
        assert await client.count("takimoto_hifumi") == COUNTS["takimoto_hifumi"]  # asked with limit=1
        assert await client.count("nobody") == 0


def test_unusable_entries_are_reported_not_fatal() -> None:
    good = b'{"id": "2", "hash": "' + b"a" * 32 + b'", "tags": " a  b "}'
    body = b'[{"id": 1, "hash": "nothex", "file_url": "x"}, ' + good + b"]"
    posts, unusable = parse_posts(body, "https://safebooru.org", "test")
    assert [p.id for p in posts] == [2] and posts[0].tags == "a b"
    assert posts[0].file_url == "https://safebooru.org/images//"  # built from directory + image
    assert [u.id for u in unusable] == [1] and "md5: Value error, not an md5: 'nothex'" in unusable[0].reason


def test_xml_page_is_read_when_json_is_ignored() -> None:
    body = (
        b'<?xml version="1.0"?><posts count="1" offset="0"><post id="7" md5="'
        + b"b" * 32
        + b'" file_url="https://safebooru.org//images/1/x.png" tags=" maki " rating="s" width="10"/></posts>'
    )
    posts, unusable = parse_posts(body, "https://safebooru.org", "test")
    assert unusable == [] and posts[0].id == 7 and posts[0].rating == "safe" and posts[0].width == 10


async def test_one_limiter_keeps_every_window_under_the_rate(fake: FakeSafebooru) -> None:
    for i in range(3):
        fake.add(FakePost(id=100 + i, tags=f"tag_{i}", data=b"x" * (i + 1), image=f"{i}.jpg"))
    settings = settings_for(fake, requests_per_second=4)
    async with aiohttp.ClientSession() as http:
        client = BooruClient(http, settings)
        await asyncio.gather(*(client.fetch_posts(f"tag_{i % 3}") for i in range(14)))
    times = [r.at for r in fake.api_requests()]
    assert len(times) == 14
    assert max_in_window(times) <= 4
    assert times[-1] - times[0] >= (14 - 1) / 4 * 0.95


@pytest.mark.parametrize("fault", ["oversize", "oversize_chunked"])
async def test_oversize_page_is_refused_without_reading_it_whole(fake: FakeSafebooru, fault: str) -> None:
    """A page over WAIFU_API_MAX_PAGE_BYTES is refused: at once by its Content-Length, or while it is read
    in pieces when no length is announced. Not retried (the next poll asks again), and the client stops
    reading: the fake could not send most of its 64 MiB (a client reading it whole takes every byte)."""
    fake.oversize_bytes = 64 * 1024 * 1024
    fake.api_faults.append(fault)
    with pytest.raises(Refused, match=r"API page over the size cap .*cap 1048576 bytes \(WAIFU_API_MAX_PAGE_BYTES\)"):
        await fetch(fake, "nishikino_maki", api_max_page_bytes=1024 * 1024)
    assert len(fake.api_requests()) == 1
    for _ in range(100):  # the fake's handler notices the hang-up a moment later
        if fake.oversize_sent:
            break
        await asyncio.sleep(0.05)
    assert fake.oversize_sent and fake.oversize_sent[0] < fake.oversize_bytes // 2, fake.oversize_sent


async def test_page_under_the_cap_is_read(fake: FakeSafebooru) -> None:
    load_drawn(fake, {"nishikino_maki": 2})
    posts, _ = await fetch(fake, "nishikino_maki", api_max_page_bytes=64 * 1024)
    assert len(posts) == 2


def test_text_fields_lose_nul_bytes_and_lone_surrogates() -> None:
    """PostgreSQL's text refuses NUL (psycopg: 'PostgreSQL text fields cannot contain NUL'), and no codec
    writes a lone surrogate: both are cleaned when the page is read, the post kept."""
    body = json.dumps(
        [{"id": 5, "hash": "c" * 32, "tags": "a\x00b c", "source": "x\ud800y\x00", "file_url": "https://h/\x00i.jpg"}]
    ).encode()
    (post,), unusable = parse_posts(body, "https://safebooru.org", "test")
    assert unusable == []
    assert (post.tags, post.source, post.file_url) == ("ab c", "x?y", "https://h/i.jpg")


def test_post_ids_are_bounded_and_numbers_checked() -> None:
    """A post id is 1..2**63-1 (a BIGINT); anything else is an unusable entry with a reason and no id.
    Sizes, score and change that fit no column are unknown (None), and the post is kept."""
    md5 = "d" * 32
    entries = [
        {"id": 2**63, "hash": md5},
        {"id": 2**63 - 1, "hash": md5},
        {"id": 0, "hash": md5},
        {"id": -5, "hash": md5},
        {"id": True, "hash": md5},
        {"id": "12a", "hash": md5},
        {"id": "١٢", "hash": md5},  # Unicode digits int() would take
        {"id": 1e300, "hash": md5},
        {"id": "77", "hash": md5, "width": 2**40, "height": -1, "score": "high", "change": 2**70},
    ]
    text = json.dumps(entries).replace("1e+300", "1e300")
    posts, unusable = parse_posts(text.encode(), "https://safebooru.org", "test")
    assert [p.id for p in posts] == [2**63 - 1, 77]
    assert (posts[1].width, posts[1].height, posts[1].score, posts[1].change) == (None, None, None, None)
    assert [u.id for u in unusable] == [None] * 7
    reasons = [u.reason for u in unusable]
    assert "less than or equal to 9223372036854775807" in reasons[0] and "greater than 0" in reasons[1]
    assert all("id" in r for r in reasons), reasons


def test_unusable_entry_keeps_its_id_only_when_a_post_can_have_it() -> None:
    body = json.dumps([{"id": 12, "hash": "nothex"}, {"id": 2**64, "hash": "nothex"}, {"id": "7", "md5": 5}])
    posts, unusable = parse_posts(body.encode(), "https://safebooru.org", "test")
    assert posts == [] and [u.id for u in unusable] == [12, None, 7]
