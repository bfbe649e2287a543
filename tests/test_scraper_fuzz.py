"""Property-based fuzzing of the API client's parser and of the poller on broken pages (issue 21).

1. The parser, on random and truncated JSON and XML pages whose entries carry random fields (Unicode, NUL
   bytes, lone surrogates, huge and negative numbers, missing and repeated keys, wrong types): it raises
   nothing but our documented errors (Retryable for a malformed page, DeepPagination), every entry listed
   is a post or an unusable entry with a reason, and every post fits its row.
2. The poller, on both databases, against the fake site over HTTP serving such pages (mangled entries,
   junk entries, truncated or garbled bodies, XML, gelbooru's wrapper, oversize bodies): no poll crashes,
   and after every poll no cursor stands past a post it did not store — every usable post listed with an
   id at or under the cursor is a row, and so is every post of the site at or under the cursor. A last
   clean poll then brings every post in.

Example counts are kept so both run in CI in a few seconds each (`derandomize` there, so CI is
repeatable); WAIFU_FUZZ_SCALE multiplies them for a longer hunt, e.g. `WAIFU_FUZZ_SCALE=20 pytest
tests/test_scraper_fuzz.py --hypothesis-show-statistics`. Bugs found are pinned below with @example.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete
from sqlmodel import select

from core.errors import DeepPagination, Retryable
from core.settings import get_settings
from db.engine import session_scope
from db.models import Post, PostCharacter, ScrapeCursor
from scraper.characters import add_characters
from scraper.client import INT32, INT64, MAX_POST_ID, ApiPost, parse_posts
from scraper.poller import poll_once
from tests.support.fake_safebooru import FakePost, FakeSafebooru, ServedPage
from waifu.cli import enqueue_downloads

SCALE = float(os.environ.get("WAIFU_FUZZ_SCALE", "1"))
IN_CI = os.environ.get("CI", "").lower() == "true"
BASE = "https://safebooru.org"


def fuzz_settings(examples: int, **kw):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=IN_CI,
        print_blob=True,
        **kw,
    )


# ------------------------------------------------------------------------- random values ----
ODD_CHARACTERS = ["\x00", "\ud800", "\udfff", "\u202e", "\ufeff", "١", "²", "<", ">", "&", '"', "'", "\n", " ", "\t"]
odd_text = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(ODD_CHARACTERS)), max_size=30)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-3, max_value=3),
    st.integers(min_value=MAX_POST_ID - 2, max_value=2**64 + 2),
    st.integers(min_value=INT32[1] - 1, max_value=INT32[1] + 2),
    st.floats(),
    st.sampled_from([1e300, -1e300, float("inf"), float("nan"), 0.5, 1e19]),
)
number_text = st.one_of(
    numbers.map(str),
    st.builds(
        lambda sign, digits, pad: f"{pad}{sign}{digits}{pad}",
        st.sampled_from(["", "+", "-"]),
        st.integers(min_value=0, max_value=10**30),
        st.sampled_from(["", " "]),
    ),
    st.sampled_from(["", " ", "١٢", "12a", "0x1f", "1_000"]),
    st.integers(min_value=4300, max_value=5000).map(lambda n: "9" * n),  # past int()'s digit limit
)
md5_like = st.one_of(
    st.text(alphabet="0123456789abcdefABCDEF", min_size=31, max_size=33),
    st.text(alphabet="0123456789abcdefg \x00", min_size=32, max_size=32),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, number_text, odd_text, md5_like)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)
# what a post's text fields may hold: odd characters, and lengths past their columns (rating 32, directory 255)
field_text = st.one_of(odd_text, st.text(alphabet=st.sampled_from("ab\x00\ud800 "), min_size=30, max_size=300))
TEXT_KEYS = ["file_url", "image", "directory", "rating", "tags", "source"]
FIELDS = ["id", "hash", "md5", "file_url", "image", "directory", "width", "height", "rating", "score", "tags"]
KEYS = st.one_of(st.sampled_from([*FIELDS, "source", "change"]), st.text(max_size=6))


# ids no post can have: what a broken listing may put in `id`
bad_ids = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(max_value=0),
    st.integers(min_value=MAX_POST_ID + 1),
    st.sampled_from([0.5, -1.0, 1e300, float("inf"), float("nan"), "", "x", "12a", "١٢", "0x1f", " - 3"]),
    st.lists(scalars, max_size=2),
)


@dataclass(frozen=True)
class Edit:
    """One change to an entry: `set` replaces a field, `drop` removes it, `repeat` adds the key twice."""

    op: str
    key: str
    value: Any = None


OPS = st.sampled_from(["set", "set", "drop", "repeat"])
# text fields only: the entry stays a post, unless a text is too long for its column
text_edits = st.lists(st.builds(Edit, st.just("set"), st.sampled_from(TEXT_KEYS), field_text), min_size=1, max_size=3)
# any change to any field; in the parser's fuzz an id may become any other
edits = st.lists(st.builds(Edit, OPS, KEYS, values), min_size=1, max_size=4)
# the same, but an id only ever becomes one no post can have: a site lists its posts in id order, and one
# listed under another post's id is beyond what any client can tell (the poller's fuzz)
listing_edits = st.lists(
    st.one_of(
        st.builds(Edit, OPS, KEYS.filter(lambda k: k != "id"), values), st.builds(Edit, OPS, st.just("id"), bad_ids)
    ),
    min_size=1,
    max_size=4,
)

Pairs = list[tuple[str, Any]]


def valid_entry(post_id: int, n: int) -> Pairs:
    md5 = f"{n:032x}"
    return [
        ("id", post_id),
        ("hash", md5),
        ("file_url", f"{BASE}//images/1/{md5}.jpg"),
        ("image", f"{md5}.jpg"),
        ("directory", 1),
        ("width", 100),
        ("height", 80),
        ("rating", "general"),
        ("score", None),
        ("tags", " miku solo "),
        ("source", ""),
        ("change", 1700000000),
    ]


def edited(pairs: Pairs, changes: list[Edit]) -> Pairs:
    pairs = list(pairs)
    for e in changes:
        if e.op == "drop":
            pairs = [(k, v) for k, v in pairs if k != e.key]
        elif e.op == "repeat":
            pairs.append((e.key, e.value))
        else:
            pairs = [(k, v) for k, v in pairs if k != e.key] + [(e.key, e.value)]
    return pairs


def json_object(pairs: Pairs) -> str:
    """JSON text of an object; a key may come twice (json.dumps cannot write that)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"


def json_page(entries: list[Pairs | Any], wrapped: bool = False) -> str:
    items = ", ".join(json_object(e) if isinstance(e, list) and _is_pairs(e) else json.dumps(e) for e in entries)
    return f'{{"@attributes": {{"count": {len(entries)}}}, "post": [{items}]}}' if wrapped else f"[{items}]"


def _is_pairs(entry: list) -> bool:
    return all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in entry)


def xml_page(entries: list[Pairs | Any]) -> str:
    """XML as a site ignoring json=1 answers; what is not an entry becomes text between them."""
    rows = []
    for e in entries:
        if isinstance(e, list) and _is_pairs(e):
            short = {"general": "g", "safe": "s"}  # XML's rating letters
            attrs = " ".join(f"{k}={quoteattr(short.get(str(v), str(v)) if k == 'rating' else str(v))}" for k, v in e)
            rows.append(f"<post {attrs}/>")
        else:
            rows.append(str(e))
    return f'<?xml version="1.0" encoding="UTF-8"?><posts count="{len(entries)}" offset="0">{"".join(rows)}</posts>'


def encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate goes out as the invalid bytes it is


# ---------------------------------------------------------------------------- the parser ----
def assert_fits_its_row(post: ApiPost) -> None:
    assert 0 < post.id <= MAX_POST_ID
    assert re.fullmatch(r"[0-9a-f]{32}", post.md5)
    for name in ("md5", "file_url", "image", "directory", "rating", "tags", "source"):
        value = getattr(post, name)
        assert "\x00" not in value, name
        value.encode("utf-8")  # no lone surrogate: a database can store it
    assert len(post.directory) <= 255 and len(post.rating) <= 32
    for name in ("width", "height"):
        assert getattr(post, name) is None or 0 <= getattr(post, name) <= INT32[1]
    assert post.score is None or INT32[0] <= post.score <= INT32[1]
    assert post.change is None or INT64[0] <= post.change <= INT64[1]


@st.composite
def pages(draw) -> tuple[bytes, int | None, list[int]]:
    """A page as bytes, how many entries it lists when it is whole JSON (None: unknown, or XML, which a
    NUL in a value makes malformed as a whole), and the ids of entries left intact (each must come out as a
    post)."""
    count = draw(st.integers(min_value=0, max_value=6))
    entries: list[Pairs | Any] = []
    intact: list[int] = []
    for n in range(count):
        post_id = draw(st.integers(min_value=1, max_value=MAX_POST_ID))
        kind = draw(st.sampled_from(["intact", "edited", "edited", "text", "random", "not an object"]))
        if kind == "intact":
            entries.append(valid_entry(post_id, n))
            intact.append(post_id)
        elif kind == "edited":
            entries.append(edited(valid_entry(post_id, n), draw(edits)))
        elif kind == "text":  # still a post, unless a text is too long for its column
            entries.append(edited(valid_entry(post_id, n), draw(text_edits)))
        elif kind == "random":
            entries.append(draw(st.lists(st.tuples(KEYS, values), max_size=6)))
        else:
            entries.append(draw(st.one_of(scalars, st.lists(scalars, max_size=2))))
    form = draw(st.sampled_from(["json", "json", "gelbooru", "xml"]))
    if form == "xml":
        entries = [e for e in entries if isinstance(e, list) and _is_pairs(e)]  # XML has only elements
        body = encoded(xml_page(entries))
    else:
        body = encoded(json_page(entries, wrapped=form == "gelbooru"))
    whole: int | None = len(entries)
    damage = draw(st.sampled_from(["none", "none", "truncate", "splice", "random bytes"]))
    if damage == "truncate":
        body = body[: draw(st.integers(min_value=0, max_value=len(body)))]
    elif damage == "splice":
        at = draw(st.integers(min_value=0, max_value=len(body)))
        body = body[:at] + draw(st.binary(max_size=8)) + body[at:]
    elif damage == "random bytes":
        body = draw(st.binary(max_size=200))
    if damage != "none":
        whole, intact = None, []
    if form == "xml":
        whole = None
    return body, whole, intact


@fuzz_settings(600)
@given(pages())
@example((b'[{"id": ' + b"9" * 5000 + b', "hash": "' + b"a" * 32 + b'"}]', 1, []))  # int() refuses 4300+ digits
@example((b"[" * 100_000, None, []))  # nesting past the stack
@example((b'[{"id": Infinity, "hash": "' + b"a" * 32 + b'"}]', 1, []))  # int(inf): OverflowError before
@example((b'[{"id": 5, "hash": "' + b"a" * 32 + b'", "width": 4294967296}]', 1, [5]))  # INTEGER column
@example((b'{"@attributes": {"limit": 100, "offset": 0, "count": 0}}', 0, []))  # gelbooru's "no match"
def test_parser_yields_posts_or_reasons_and_nothing_else(page: tuple[bytes, int | None, list[int]]) -> None:
    body, whole, intact = page
    try:
        posts, unusable = parse_posts(body, BASE, "fuzz")
    except (Retryable, DeepPagination) as exc:
        assert str(exc), "an error a person can read"
        assert whole is None, f"a whole JSON page refused: {exc}"
        return
    if whole is not None:
        assert len(posts) + len(unusable) == whole, "an entry was neither a post nor refused"
    for post in posts:
        assert_fits_its_row(post)
    for bad in unusable:
        assert bad.reason.startswith("unusable API entry: ") and len(bad.reason) > len("unusable API entry: ")
        assert bad.id is None or 0 < bad.id <= MAX_POST_ID
    assert set(intact) <= {p.id for p in posts}, "an intact entry was refused"


# ---------------------------------------------------------------------------- the poller ----
@dataclass
class Sickness:
    """How a post's entry is listed wrong: `edits` on its first `times` listings (0: every listing)."""

    edits: list[Edit]
    times: int


@dataclass
class Script:
    batches: list[int]  # posts published before each fuzzed poll
    gaps: list[int]  # id step before each post
    sick: dict[int, Sickness]  # by the post's position
    faults: list[str]  # one a page request, in order; then none
    junk: list[Any]  # entries slipped into pages with the "junk" fault: a value, or edits of a listed one
    api_retries: int


FAULTS = ["none", "none", "none", "junk", "truncate", "garbage", "xml", "gelbooru", "oversize"]


@st.composite
def scripts(draw) -> Script:
    batches = draw(st.lists(st.integers(min_value=0, max_value=12), min_size=2, max_size=3))
    total = sum(batches)
    gaps = draw(st.lists(st.integers(min_value=1, max_value=3), min_size=total, max_size=total))
    sick = draw(
        st.dictionaries(
            st.integers(min_value=0, max_value=max(total - 1, 0)),
            st.builds(Sickness, listing_edits | text_edits, st.integers(min_value=0, max_value=2)),
            max_size=min(total, 6),
        )
    )
    faults = draw(st.lists(st.sampled_from(FAULTS), max_size=12))
    junk = draw(
        st.lists(
            st.one_of(
                scalars,  # not an object
                st.builds(lambda i, pairs: [("id", i), *pairs], bad_ids, st.lists(st.tuples(KEYS, values), max_size=3)),
                listing_edits,  # a listed entry once more (a repeated entry), edited
            ),
            max_size=4,
        )
    )
    return Script(batches, gaps, sick, faults, junk, draw(st.integers(min_value=0, max_value=1)))


@dataclass
class Site:
    """The fake site's state for one example, and what it listed."""

    script: Script
    fake: FakeSafebooru
    posts: list[FakePost] = field(default_factory=list)
    listings: dict[int, int] = field(default_factory=dict)  # post id -> times listed
    id_mangled: set[int] = field(default_factory=set)  # posts listed at least once without their id
    usable_listed: set[int] = field(default_factory=set)  # ids the client got as usable posts
    clean: bool = False
    requests: int = 0

    def publish(self, count: int) -> None:
        for _ in range(count):
            n = len(self.posts)
            post_id = (self.posts[-1].id if self.posts else 1000) + self.script.gaps[n]
            self.posts.append(self.fake.add(FakePost(id=post_id, tags="miku solo", data=b"%d" % n, image=f"{n}.jpg")))

    def hook(self, served: ServedPage) -> bytes:
        """Answers an API page: the fake's listing, with the script's damage; records what the client will
        read from it (by our own parser: what matters here is what the poller then does)."""
        fault = "none" if self.clean or self.requests >= len(self.script.faults) else self.script.faults[self.requests]
        self.requests += 1
        position = {p.id: n for n, p in enumerate(self.posts)}
        entries: list[Pairs | Any] = []
        for entry in served.entries:
            post_id = int(entry["id"])
            pairs = valid_entry(post_id, position[post_id])
            self.listings[post_id] = self.listings.get(post_id, 0) + 1
            sickness = self.script.sick.get(position[post_id])
            if not self.clean and sickness and (sickness.times == 0 or self.listings[post_id] <= sickness.times):
                pairs = edited(pairs, sickness.edits)
                if any(e.key == "id" for e in sickness.edits):
                    self.id_mangled.add(post_id)
            entries.append(pairs)
        if fault == "junk" and entries:
            listed = list(entries)
            for i, extra in enumerate(self.script.junk):
                if isinstance(extra, list) and extra and isinstance(extra[0], Edit):
                    extra = edited(listed[i % len(listed)], extra)
                entries.insert(min(i * 2, len(entries)), extra)
        if fault == "xml":
            body = encoded(xml_page([e for e in entries if isinstance(e, list) and _is_pairs(e)]))
        elif not entries:
            body = b""  # the real API's "no match"
        else:
            body = encoded(json_page(entries, wrapped=fault == "gelbooru"))
        if fault == "truncate":
            body = body[: len(body) // 2]
        elif fault == "garbage":
            body = b"<html>\x00\xff" + body[:10]
        elif fault == "oversize":
            body = b" " * (get_settings().api_max_page_bytes + 1)
        try:
            posts, _ = parse_posts(body, BASE, "oracle")
        except (Retryable, DeepPagination):
            return body
        self.usable_listed |= {p.id for p in posts}
        return body


def check_invariants(site: Site, final: bool) -> None:
    """No cursor stands past a post it did not store."""
    with session_scope(readonly=True) as session:
        cursor = session.get(ScrapeCursor, ("safebooru", "miku"))
        rows = {p.remote_id: p for p in session.exec(select(Post)).all()}
    if cursor is None or cursor.newest_id is None:
        assert not final, "the clean poll left no cursor"
        return
    newest = cursor.newest_id
    low = None if cursor.backfill_done else cursor.oldest_id
    for post_id in site.usable_listed:
        if post_id <= newest and (low is None or post_id >= low):
            assert post_id in rows and rows[post_id].md5, f"usable post {post_id} listed, cursor {newest}, no row"
    for post in site.posts:
        if post.id <= newest and (low is None or post.id >= low) and post.id not in site.id_mangled:
            assert post.id in rows, f"post {post.id} of the site never stored, cursor at {newest}"
    if final:
        assert cursor.last_error is None, cursor.last_error
        assert cursor.backfill_done and newest >= max((p.id for p in site.posts), default=0)


def fresh_database(redis_client: redis.Redis) -> None:
    with session_scope() as session:
        for table in (PostCharacter, Post, ScrapeCursor):
            session.exec(delete(table))
    redis_client.flushdb()


async def run_script(script: Script) -> None:
    fake = FakeSafebooru()
    await fake.start()
    site = Site(script, fake)
    fake.page_hook = site.hook
    poll_settings = get_settings().model_copy(
        update={"default_site_url": fake.base_url, "api_retries": script.api_retries}
    )
    try:
        for count in script.batches:
            site.publish(count)
            report = await poll_once(poll_settings, enqueue_downloads)  # must return, whatever the pages held
            assert len(report.tags) == 1
            check_invariants(site, final=False)
        site.clean = True  # the site lists right again: the next poll brings in every post
        report = await poll_once(poll_settings, enqueue_downloads)
        assert report.errors == [], report.errors
        check_invariants(site, final=True)
    finally:
        await fake.stop()


@pytest.fixture
def fuzz_env(service_env, monkeypatch: pytest.MonkeyPatch):
    for key, value in {
        "WAIFU_PAGE_SIZE": "5",
        "WAIFU_BACKFILL_PAGES": "100",
        "WAIFU_REQUESTS_PER_SECOND": "1000",
        "WAIFU_API_BACKOFF_S": "0",
        "WAIFU_API_MAX_PAGE_BYTES": str(64 * 1024),
        "WAIFU_HTTP_TIMEOUT_S": "10",
    }.items():
        monkeypatch.setenv(key, value)
    from core.settings import reset_settings_cache

    reset_settings_cache()
    add_characters(["miku"])
    return service_env


# a post whose only listing lost its id (then the cursor may pass it: there was no id to keep it by)
PINNED_ID_LOST = Script([3, 0], [1, 1, 1], {1: Sickness([Edit("drop", "id")], 0)}, [], [], 0)
# after a synced post, a full page of entries none of which has an id between two pages of posts: refused
# (the cursor stays, the post below is not passed over), then listed right
PINNED_NO_ID_PAGE = Script(
    [1, 11], [1] * 12, {n: Sickness([Edit("set", "id", "x")], 1) for n in range(2, 7)}, [], [], 0
)
# the oldest post listed without its id by the first sync's backfill, which then reached the end of the
# tag's history: once listed right it is taken (the floor no longer stands above it: history_done)
PINNED_OLDEST_ID_LOST = Script([2, 0], [1, 1], {0: Sickness([Edit("set", "id", None)], 0)}, [], [], 0)
# one unusable entry on the newest full page over a gap of two pages (issue 17's probe)
PINNED_GAP = Script([2, 11], [1] * 13, {10: Sickness([Edit("set", "hash", "not-an-md5")], 0)}, [], [], 0)


@fuzz_settings(20, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scripts())
@example(PINNED_ID_LOST)
@example(PINNED_NO_ID_PAGE)
@example(PINNED_GAP)
@example(PINNED_OLDEST_ID_LOST)
def test_poller_on_fuzzed_pages_never_passes_an_unstored_post(fuzz_env, redis_client, script: Script) -> None:
    fresh_database(redis_client)
    asyncio.run(run_script(script))
