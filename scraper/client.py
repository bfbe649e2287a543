"""Gelbooru-0.2 DAPI client (safebooru, gelbooru and kin; see core.sites): query building, JSON/XML
parsing, and the API's quirks.

Design notes: docs/architecture.md, `scraper/client.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

import aiohttp
from aiolimiter import AsyncLimiter
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from core.errors import DeepPagination, Refused, Retryable
from core.http import USER_AGENT, check_status
from core.logs import kv
from core.settings import Settings
from core.sites import Site

log = logging.getLogger("waifu.scraper.client")

DEEP_PAGINATION = re.compile(r"too deep|pull it back", re.IGNORECASE)

# the columns a listed post lands in (db.models.Post): a site's post id is a BIGINT, sizes and score an
# INTEGER, `change` a BIGINT. Anything else is not a post id / is dropped as unknown.
MAX_POST_ID = 2**63 - 1
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
OPTIONAL_NUMBERS = {"width": (0, INT32[1]), "height": (0, INT32[1]), "score": INT32, "change": INT64}
TEXT_FIELDS = ("image", "directory", "rating", "tags", "source", "file_url", "md5")
DIGITS = re.compile(r"[+-]?[0-9]{1,100}")  # long enough for any id out of range, short for int()


def clean_text(value: str) -> str:
    """Text a database takes: no NUL byte (PostgreSQL refuses them in text) and no lone surrogate (no
    encoding has them; JSON's `\\ud800` makes one)."""
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def as_integer(value: object) -> int | None:
    """An integer as the API may write one (a JSON number or a string of ASCII digits), else None: never
    a bool, a fraction, a float beyond any id, or Unicode digits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None  # NaN and infinities are not
    if isinstance(value, str) and DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _optional_number(value: object, bounds: tuple[int, int]) -> int | None:
    """Sizes, score and change time only inform: one the API got wrong is unknown, not a lost post."""
    number = as_integer(value)
    return number if number is not None and bounds[0] <= number <= bounds[1] else None


class ApiPost(BaseModel):
    """One post as the API describes it; tolerant of strings-for-ints, nulls and missing fields, strict on
    what makes it a post (an id a site can have, an md5, a file) and on what fits its row."""

    id: int = Field(gt=0, le=MAX_POST_ID)
    md5: str
    file_url: str
    image: str = ""
    directory: str = Field("", max_length=255)
    width: int | None = None
    height: int | None = None
    rating: str = Field("", max_length=32)
    score: int | None = None
    tags: str = ""
    source: str = ""
    change: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_api(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"a post must be an object, got {type(data).__name__}")
        data = dict(data)
        if "md5" not in data:
            data["md5"] = data.get("hash", "")
        for key in TEXT_FIELDS:
            value = data.get(key)
            if value is None:
                value = ""
            elif isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError(f"{key} must be text, got {type(value).__name__}")
            data[key] = clean_text(str(value))
        for key, bounds in OPTIONAL_NUMBERS.items():
            data[key] = _optional_number(data.get(key), bounds)
        number = as_integer(data.get("id"))
        if number is None:
            raise ValueError(f"id must be a whole number, got {clean_text(repr(data.get('id')))[:40]}")
        data["id"] = number  # its range is checked by the field, with the bound in the reason
        return data

    @field_validator("tags")
    @classmethod
    def _normalize_tags(cls, value: str) -> str:
        return " ".join(value.split())

    @field_validator("md5")
    @classmethod
    def _check_md5(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{32}", value):
            raise ValueError(f"not an md5: {value!r}")
        return value

    def with_base(self, base_url: str) -> ApiPost:
        """Fills file_url from directory + image when the API left it out (older Gelbooru versions)."""
        if self.file_url:
            return self
        return self.model_copy(update={"file_url": f"{base_url}/images/{self.directory}/{self.image}"})


def make_limiter(requests_per_second: float) -> AsyncLimiter:
    """A limiter under which no 1-second sliding window holds more than `requests_per_second` requests.

    AsyncLimiter(N, 1) is a leaky bucket: after an initial burst of N it lets one more in within the same
    second. A bucket of one slot drained every 1/rps seconds cannot; 3% margin absorbs the jitter between a
    slot and the request reaching the site on a busy machine (seen: 1% was not enough under load).
    """
    return AsyncLimiter(1, 1.03 / requests_per_second)


@dataclass(frozen=True)
class Unusable:
    """A listed entry that cannot become a post; kept so the refusal is visible on a row. `id` is None
    when the entry has no id a post can have (then only the log tells of it)."""

    id: int | None
    reason: str


@dataclass(frozen=True)
class Page:
    """One page as listed: its posts and its unusable entries, in the API's order each."""

    posts: list[ApiPost]
    unusable: list[Unusable]

    @property
    def listed(self) -> int:
        """Entries listed, usable or not: what says whether the page was full."""
        return len(self.posts) + len(self.unusable)

    @property
    def ids(self) -> list[int]:
        """Every post id the page listed, of posts and of unusable entries that have one."""
        return [p.id for p in self.posts] + [u.id for u in self.unusable if u.id is not None]


XML_RATINGS = {"s": "safe", "g": "general", "q": "questionable", "e": "explicit"}


def _validation_reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "entry"
    return f"{where}: {first.get('msg', 'invalid')}"


def _entry_id(entry: object) -> int | None:
    """The post id of an entry that is no post, if it has one a site's post can have."""
    number = as_integer(entry.get("id")) if isinstance(entry, dict) else None
    return number if number is not None and 0 < number <= MAX_POST_ID else None


def _json_integer(digits: str) -> int | str:
    """A JSON integer; one too long to be any id stays text, for its entry alone to be refused (Python's
    int() refuses over 4300 digits, which would fail the whole page)."""
    return int(digits) if len(digits) <= 100 else digits


def _decode_entries(text: str, what: str) -> list[object]:
    """The JSON list of a page; an XML page (a site ignoring json=1) is read too."""
    if text.startswith("<") and "<posts" in text[:300]:
        try:
            root = ElementTree.fromstring(text)
        except ElementTree.ParseError as exc:
            raise Retryable(f"malformed XML from API ({what}): {exc}") from exc
        entries: list[object] = []
        for node in root.iter("post"):
            entry = dict(node.attrib)
            entry["rating"] = XML_RATINGS.get(entry.get("rating", ""), entry.get("rating", ""))
            entries.append(entry)
        return entries
    try:
        data = json.loads(text, parse_int=_json_integer)
    except json.JSONDecodeError as exc:
        raise Retryable(
            f"malformed JSON from API ({what}): {exc.msg} at char {exc.pos}; body starts {text[:60]!r}"
        ) from exc
    except RecursionError as exc:  # nesting deeper than the stack
        raise Retryable(f"malformed JSON from API ({what}): {type(exc).__name__}: {str(exc)[:120]}") from exc
    if isinstance(data, dict) and ("post" in data or "@attributes" in data):
        # gelbooru wraps the list, and leaves it out when nothing matches
        data = data.get("post", [])
    if not isinstance(data, list):
        raise Retryable(f"unexpected JSON from API ({what}): expected a list, got {type(data).__name__}")
    return data


def parse_posts(body: bytes, base_url: str, what: str) -> tuple[list[ApiPost], list[Unusable]]:
    """Parses a page. Returns the posts and, for each unusable entry, its id (if any) and why; every
    listed entry is one or the other. Raises only Retryable (malformed page) and DeepPagination."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return [], []  # safebooru's way of saying "no match"
    if DEEP_PAGINATION.search(text[:500]):
        raise DeepPagination(f"API refused a deep page ({what}): {text[:120]!r}")
    posts, unusable = [], []
    for entry in _decode_entries(text, what):
        try:
            posts.append(ApiPost.model_validate(entry).with_base(base_url))
        except ValidationError as exc:
            unusable.append(Unusable(_entry_id(entry), f"unusable API entry: {_validation_reason(exc)}"))
    return posts, unusable


class BooruClient:
    """One site's API. `requests` counts every HTTP request made, retries included."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        site: Site | None = None,
        limiter: AsyncLimiter | None = None,
    ) -> None:
        self.session = session
        self.settings = settings
        self.site = site or settings.site()
        self.limiter = limiter or make_limiter(settings.requests_per_second)
        self.requests = 0

    def _params(self, tags: str, pid: int, limit: int, as_json: bool) -> dict[str, str]:
        params = {"page": "dapi", "s": "post", "q": "index", "tags": tags, "pid": str(pid), "limit": str(limit)}
        if as_json:
            params["json"] = "1"
        if self.site.api_key and self.site.user_id:
            params["api_key"] = self.site.api_key
            params["user_id"] = self.site.user_id
        return params

    async def _get(self, params: dict[str, str], what: str, on_request: Callable[[], None] | None) -> bytes:
        """One HTTP GET behind the limiter; classifies failures as retryable or final."""
        async with self.limiter:
            self.requests += 1
            if on_request is not None:
                on_request()
            try:
                timeout = aiohttp.ClientTimeout(total=self.settings.http_timeout_s)
                async with self.session.get(
                    f"{self.site.url}/index.php",
                    params=params,
                    timeout=timeout,
                    headers={"User-Agent": USER_AGENT},
                    allow_redirects=False,
                ) as resp:
                    check_status(
                        resp.status,
                        resp.reason or "",
                        resp.headers.get("Retry-After"),
                        self.settings.retry_after_max_s,
                        what=f"{self.site.name} API, {what}",
                        subject="API page",
                    )
                    return await self._read_capped(resp, what)
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                name = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
                raise Retryable(f"API request failed ({what}): {name}") from exc

    async def _read_capped(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        """The body, refused past WAIFU_API_MAX_PAGE_BYTES: by its Content-Length before reading, else
        while reading (decoded bytes, so a compressed bomb stops too). Final for this request: the next
        poll asks again."""
        cap = self.settings.api_max_page_bytes

        def refused(size: str) -> Refused:
            return Refused(f"API page over the size cap ({what}): {size}, cap {cap} bytes (WAIFU_API_MAX_PAGE_BYTES)")

        if resp.content_length is not None and resp.content_length > cap:
            raise refused(f"Content-Length {resp.content_length}")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > cap:
                raise refused(f"more than {cap} bytes")
        return bytes(body)

    def _backoff(self, attempt: int, error: BaseException | None) -> float:
        if isinstance(error, Retryable) and error.retry_after is not None:
            return error.retry_after
        base = self.settings.api_backoff_s * (2 ** (attempt - 1))
        return min(self.settings.api_backoff_max_s, base * random.uniform(0.5, 1.5))

    async def _with_retries(
        self, params: dict[str, str], what: str, parse, on_request: Callable[[], None] | None = None
    ):
        attempts = AsyncRetrying(
            stop=stop_after_attempt(self.settings.api_retries + 1),
            retry=retry_if_exception_type(Retryable),
            wait=lambda state: self._backoff(state.attempt_number, _error(state)),
            before_sleep=lambda state: log.warning(
                kv(
                    "api retry",
                    what=what,
                    attempt=state.attempt_number,
                    error=_error(state),
                    wait=round(state.next_action.sleep if state.next_action else 0.0, 2),
                )
            ),
            reraise=True,
        )
        try:
            async for attempt in attempts:
                with attempt:
                    return parse(await self._get(params, what, on_request))
        except Retryable as exc:
            raise Refused(f"gave up after {self.settings.api_retries + 1} attempts: {exc}") from exc

    async def fetch_page(
        self, tags: str, pid: int = 0, limit: int | None = None, on_request: Callable[[], None] | None = None
    ) -> Page:
        """One page, usable and unusable entries both; `on_request` is called for every HTTP request made
        (retries included). Every unusable entry is logged with its reason."""
        limit = limit or self.settings.page_size
        what = f"tags={tags!r} pid={pid}"
        posts, unusable = await self._with_retries(
            self._params(tags, pid, limit, as_json=True),
            what,
            lambda body: parse_posts(body, self.site.url, what),
            on_request,
        )
        for bad in unusable:
            log.warning(kv("unusable post", what=what, post=bad.id, reason=bad.reason))
        return Page(posts, unusable)

    async def fetch_posts(
        self,
        tags: str,
        pid: int = 0,
        limit: int | None = None,
        on_request: Callable[[], None] | None = None,
        on_unusable: Callable[[Unusable], None] | None = None,
    ) -> list[ApiPost]:
        """The usable posts of one page; `on_unusable` is called for every listed entry that could not be
        parsed."""
        page = await self.fetch_page(tags, pid, limit, on_request)
        for bad in page.unusable:
            if on_unusable is not None:
                on_unusable(bad)
        return page.posts

    async def count(self, tags: str) -> int:
        """Total matches: only the XML answer carries it (`<posts count=...>`)."""
        what = f"count tags={tags!r}"

        def parse(body: bytes) -> int:
            try:
                root = ElementTree.fromstring(body)
                return int(root.attrib["count"])
            except (ElementTree.ParseError, KeyError, ValueError) as exc:
                raise Retryable(f"malformed XML from API ({what}): {exc}") from exc

        return await self._with_retries(self._params(tags, 0, 1, as_json=False), what, parse)


def _error(state: RetryCallState) -> BaseException | None:
    """What the attempt raised (tenacity's outcome is None only before the first attempt ends)."""
    return state.outcome.exception() if state.outcome is not None else None
