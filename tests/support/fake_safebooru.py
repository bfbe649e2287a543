"""A local aiohttp server that speaks safebooru's DAPI, with its quirks, serving real image files: the real
illustrations of the test set (`load_illustrations`, via tests/support/testdata.py) or pictures drawn with Pillow
(`load_drawn`) where no real face is needed.

Quirks reproduced: JSON answers an empty body (not `[]`) when nothing matches; `file_url` has safebooru's
double slash (`//images/...`); `score` is null; XML carries the total in `<posts count=...>`; `limit` is
capped at 100; deep `pid` values are refused; metatags `id:>N`, `id:<N`, `-tag`, `rating:x`,
`sort:id:asc` work. Faults can be injected per API request (`api_faults`) and per file (`FakePost.fault`).
Every request is recorded with its arrival time (`requests`), so tests can check politeness.
Set `credentials` and `gelbooru_json` and the same server speaks as gelbooru does (a second site).

Broken listings, as a site can send them: `entry_overrides` replaces (or, with `DROP`, removes) fields of
one post's entry in every page that lists it; `page_hook` sees every API page before it is sent and may
alter its entries or answer other bytes altogether (the fuzz tests); the `oversize` faults answer a page
larger than any sane cap. A FakePost may carry any id (0, negative, beyond 2**63-1): it is listed as such.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

from aiohttp import web

DEEP_PAGINATION_MESSAGE = "Too deep! Pull it back some. Holy fuck."
# the largest id a site's post can have and still be one (PostgreSQL BIGINT); ids beyond are bogus entries
MAX_POST_ID = 2**63 - 1
# in `entry_overrides`: leave this field out of the entry
DROP = object()

# File faults a FakePost can carry:
#   "html"          an HTML page served as the image (announced md5 is the page's own)
#   "not_image"     random bytes under a .jpg name (announced md5 matches them)
#   "md5_mismatch"  the real image, but the API announces another md5
#   "truncated"     Content-Length says more than the body delivers
#   "redirect_offsite"  302 to a host that is not on the allow-list
#   "redirect_local"    302 to another path on the same host (allowed)
#   "404"           the file is gone (post deleted after listing)
#   "503_once"      the first request for the file answers 503, later ones succeed
#   "429_once"      the first request for the file answers 429 with `Retry-After: retry_after`, later ones succeed
#   "slow_once"     the first request's body trickles out over `slow_seconds` (a download to kill a worker in)
FILE_FAULTS = {
    "html",
    "not_image",
    "md5_mismatch",
    "truncated",
    "redirect_offsite",
    "redirect_local",
    "404",
    "503_once",
    "429_once",
    "slow_once",
}


@dataclass
class FakePost:
    id: int
    tags: str
    data: bytes
    image: str
    directory: str = "1000"
    rating: str = "general"
    width: int = 0
    height: int = 0
    fault: str | None = None
    announced_md5: str | None = None  # overrides the md5 the API announces
    change: int = 1700000000

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data).hexdigest()

    def api_md5(self) -> str:
        if self.announced_md5:
            return self.announced_md5
        if self.fault == "md5_mismatch":
            return hashlib.md5(b"not-the-file" + self.data).hexdigest()
        return self.md5


@dataclass
class RecordedRequest:
    at: float
    path: str
    query: dict[str, str]


@dataclass
class ServedPage:
    """What an API request asked and the entries the fake listed for it (before any `page_hook`): JSON
    fields (`as_json`) or XML attributes."""

    request: RecordedRequest
    as_json: bool
    entries: list[dict[str, Any]]


# a page hook returns the entries to send (altered or not), or the raw bytes of the whole body
PageHook = Callable[[ServedPage], "list[dict[str, Any]] | bytes"]


@dataclass
class FakeSafebooru:
    posts: dict[int, FakePost] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    # each API request pops one fault, if any: "429", "503", "empty", "malformed", "truncated", "none" (no
    # fault), "oversize" (a body of `oversize_bytes` with its Content-Length), "oversize_chunked" (the same,
    # chunked, no length announced)
    api_faults: deque[str] = field(default_factory=deque)
    oversize_bytes: int = 64 * 1024 * 1024
    # bytes of oversize bodies actually sent before the client hung up (a client that reads past its cap
    # takes them all)
    oversize_sent: list[int] = field(default_factory=list)
    # fields replaced in one post's listed entry, by post id; a value of DROP leaves the field out
    entry_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    page_hook: PageHook | None = None
    retry_after: str = "1"
    max_limit: int = 100
    deep_offset: int = 20000  # pid * limit beyond this is refused, as on the real site
    file_hits: dict[int, int] = field(default_factory=dict)
    offsite_url: str = "http://evil.example.invalid/x.jpg"
    slow_seconds: float = 20.0
    # a gelbooru-like site: the API refuses requests without these (api_key, user_id), and wraps its JSON
    credentials: tuple[str, str] | None = None
    gelbooru_json: bool = False
    _runner: web.AppRunner | None = None
    base_url: str = ""

    # ---------------------------------------------------------------- content -------------------
    def add(self, post: FakePost) -> FakePost:
        if not post.width or not post.height:
            post.width, post.height = _image_size(post.data)
        self.posts[post.id] = post
        return post

    def next_id(self) -> int:
        """The id after the newest real one: bogus entries (id 0, negative, beyond MAX_POST_ID) don't count."""
        return max((i for i in self.posts if 0 < i <= MAX_POST_ID), default=1000) + 1

    def api_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/index.php"]

    def file_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.lstrip("/").startswith("images/")]

    # ---------------------------------------------------------------- server ------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/index.php", self._api)
        # safebooru's file_url has a double slash ("//images/..."): serve both spellings
        app.router.add_get(r"/{lead:/?}images/{directory}/{name}", self._file)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://{host}:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    # ---------------------------------------------------------------- handlers ----------------
    def _record(self, request: web.Request) -> RecordedRequest:
        recorded = RecordedRequest(time.monotonic(), request.path, dict(request.query))
        self.requests.append(recorded)
        return recorded

    async def _api(self, request: web.Request) -> web.StreamResponse:
        recorded = self._record(request)
        q = request.query
        if q.get("page") != "dapi" or q.get("s") != "post" or q.get("q") != "index":
            return web.Response(status=404, text="not found")
        if self.credentials and (q.get("api_key"), q.get("user_id")) != self.credentials:
            # gelbooru's answer to anonymous or wrong API requests
            return web.Response(
                status=401,
                text="Missing authentication. Go to api access credentials on your "
                "account profile page to find your API credentials.",
            )
        if self.api_faults:
            fault = self.api_faults.popleft()
            if fault == "429":
                return web.Response(status=429, text="slow down", headers={"Retry-After": self.retry_after})
            if fault == "503":
                return web.Response(status=503, text="<html>Service Unavailable</html>")
            if fault == "empty":
                return web.Response(status=200, body=b"", content_type="application/json")
            if fault == "malformed":
                return web.Response(status=200, text='[{"id": 12, "hash": ', content_type="application/json")
            if fault == "truncated":
                return await _truncated(request, b'[{"id": 1, "hash": "abc", "tags": "x"}]', "application/json")
            if fault in ("oversize", "oversize_chunked"):
                return await self._oversize(request, announce=fault == "oversize")
        limit = min(int(q.get("limit", 100) or 100), self.max_limit)
        pid = int(q.get("pid", 0) or 0)
        if pid * limit > self.deep_offset:
            return web.Response(status=200, text=DEEP_PAGINATION_MESSAGE, content_type="text/html")
        matches = self._search(q.get("tags", ""))
        page = matches[pid * limit : (pid + 1) * limit]
        as_json = q.get("json") == "1"
        entries = [self._listed(p, as_json) for p in page]
        if self.page_hook is not None:
            altered = self.page_hook(ServedPage(recorded, as_json, entries))
            if isinstance(altered, bytes):
                content_type = "application/json" if as_json else "text/xml"
                return web.Response(status=200, body=altered, content_type=content_type)
            entries = altered
        if as_json:
            if not entries:
                # the real API answers an empty body, not "[]", when nothing matches
                return web.Response(status=200, body=b"", content_type="application/json")
            if self.gelbooru_json:  # gelbooru wraps the list and counts the matches
                body = {"@attributes": {"limit": limit, "offset": pid * limit, "count": len(matches)}, "post": entries}
                return web.Response(text=json.dumps(body), content_type="application/json")
            return web.Response(text=json.dumps(entries), content_type="application/json")
        return web.Response(text=xml_page(entries, len(matches), pid * limit), content_type="text/xml")

    def _listed(self, post: FakePost, as_json: bool) -> dict[str, Any]:
        """A post's entry as the API lists it, with its `entry_overrides` applied."""
        entry = self._json(post) if as_json else self._xml_attributes(post)
        for key, value in self.entry_overrides.get(post.id, {}).items():
            if value is DROP:
                entry.pop(key, None)
            else:
                entry[key] = value
        return entry

    async def _oversize(self, request: web.Request, announce: bool) -> web.StreamResponse:
        """`oversize_bytes` of JSON whitespace before `[]`, sent in 64 KiB pieces; counts what got out."""
        headers = {"Content-Type": "application/json"}
        if announce:
            headers["Content-Length"] = str(self.oversize_bytes)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        piece, sent = b" " * 65536, 0
        try:
            while sent < self.oversize_bytes - 2:
                chunk = piece[: self.oversize_bytes - 2 - sent]
                await response.write(chunk)
                sent += len(chunk)
            await response.write(b"[]")
            sent += 2
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: what it refused is the point
        finally:
            self.oversize_sent.append(sent)
        return response

    def _search(self, tags: str) -> list[FakePost]:
        include, exclude, ascending = [], [], False
        id_gt: int | None = None
        id_lt: int | None = None
        rating: str | None = None
        for term in tags.split():
            term = term.lower()
            if term == "sort:id:asc":
                ascending = True
            elif term.startswith("sort:"):
                continue
            elif term.startswith("id:>"):
                id_gt = int(term[4:])
            elif term.startswith("id:<"):
                id_lt = int(term[4:])
            elif term.startswith("rating:"):
                rating = term[7:]
            elif term.startswith("-"):
                exclude.append(term[1:])
            else:
                include.append(term)
        out = []
        for post in self.posts.values():
            tagset = set(post.tags.split())
            if any(t not in tagset for t in include) or any(t in tagset for t in exclude):
                continue
            if id_gt is not None and post.id <= id_gt:
                continue
            if id_lt is not None and post.id >= id_lt:
                continue
            if rating and post.rating != rating:
                continue
            out.append(post)
        out.sort(key=lambda p: p.id, reverse=not ascending)
        return out

    def _file_url(self, post: FakePost) -> str:
        return f"{self.base_url}//images/{post.directory}/{post.image}"

    def _json(self, post: FakePost) -> dict:
        return {
            "preview_url": f"{self.base_url}/thumbnails/{post.directory}/thumbnail_{post.md5}.jpg",
            "sample_url": self._file_url(post),
            "file_url": self._file_url(post),
            "directory": int(post.directory) if post.directory.isdigit() else post.directory,
            "hash": post.api_md5(),
            "width": post.width,
            "height": post.height,
            "id": post.id,
            "image": post.image,
            "change": post.change,
            "owner": "danbooru",
            "parent_id": 0,
            "rating": post.rating,
            "sample": False,
            "sample_height": 0,
            "sample_width": 0,
            "score": None,
            "tags": f" {post.tags} ",
            "source": "",
            "status": "active",
            "has_notes": False,
            "comment_count": 0,
        }

    def _xml_attributes(self, post: FakePost) -> dict[str, Any]:
        return {
            "id": post.id,
            "md5": post.api_md5(),
            "file_url": self._file_url(post),
            "tags": f" {post.tags} ",
            "rating": post.rating[:1],
            "width": post.width,
            "height": post.height,
            "change": post.change,
            "score": 0,
            "source": "",
            "status": "active",
        }

    def _xml(self, post: FakePost) -> str:
        return xml_entry(self._xml_attributes(post))

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        directory, name = request.match_info["directory"], request.match_info["name"]
        post = next((p for p in self.posts.values() if p.directory == directory and p.image == name), None)
        if post is None:
            return web.Response(status=404, text="404 Not Found")
        self.file_hits[post.id] = self.file_hits.get(post.id, 0) + 1
        fault = post.fault
        if fault == "404":
            return web.Response(status=404, text="<html>404 Not Found</html>", content_type="text/html")
        if fault == "503_once" and self.file_hits[post.id] == 1:
            return web.Response(status=503, text="busy")
        if fault == "429_once" and self.file_hits[post.id] == 1:
            return web.Response(status=429, text="slow down", headers={"Retry-After": self.retry_after})
        if fault == "redirect_offsite":
            raise web.HTTPFound(self.offsite_url)
        if fault == "redirect_local" and "moved" not in request.query:
            raise web.HTTPFound(f"/images/{directory}/{name}?moved=1")
        if fault == "truncated":
            return await _truncated(request, post.data, "image/jpeg")
        if fault == "slow_once" and self.file_hits[post.id] == 1:
            return await _trickle(request, post.data, self.slow_seconds)
        content_type = "text/html" if fault == "html" else "image/jpeg"
        return web.Response(body=post.data, content_type=content_type)


def xml_entry(attributes: dict[str, Any]) -> str:
    return "<post " + " ".join(f"{k}={quoteattr(str(v))}" for k, v in attributes.items()) + "/>"


def xml_page(entries: list[dict[str, Any]], count: int, offset: int) -> str:
    """The XML answer: `<posts count=TOTAL offset=...>` around one `<post .../>` a listed entry."""
    head = f'<?xml version="1.0" encoding="UTF-8"?><posts count="{count}" offset="{offset}">'
    return head + "".join(xml_entry(e) for e in entries) + "</posts>"


async def _truncated(request: web.Request, body: bytes, content_type: str) -> web.StreamResponse:
    """Announce the full length, send half, and drop the connection."""
    response = web.StreamResponse(headers={"Content-Type": content_type, "Content-Length": str(len(body))})
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    await asyncio.sleep(0.05)
    if request.transport is not None:
        request.transport.close()
    return response


async def _trickle(request: web.Request, body: bytes, seconds: float, steps: int = 40) -> web.StreamResponse:
    """The whole body, announced up front, sent in `steps` pieces spread over `seconds`."""
    response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body))})
    await response.prepare(request)
    size = -(-len(body) // steps)
    for start in range(0, len(body), size):
        await response.write(body[start : start + size])
        await asyncio.sleep(seconds / steps)
    await response.write_eof()
    return response


def _image_size(data: bytes) -> tuple[int, int]:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        return (0, 0)


def publish(fake: FakeSafebooru, per_tag: dict[str, list[tuple[bytes, str]]], first_id: int = 5000) -> list[FakePost]:
    """One post per (bytes, suffix) under "1girl <tag> solo", ids interleaved across tags, names by md5."""
    posts = []
    next_id = first_id
    longest = max((len(v) for v in per_tag.values()), default=0)
    for i in range(longest):
        for tag, files in per_tag.items():
            if i < len(files):
                data, suffix = files[i]
                post = FakePost(
                    id=next_id,
                    tags=f"1girl {tag} solo",
                    data=data,
                    image=f"{hashlib.md5(data).hexdigest()}{suffix}",
                    directory=str(1000 + next_id // 1000),
                )
                posts.append(fake.add(post))
                next_id += 1
    return posts


def load_illustrations(fake: FakeSafebooru, first_id: int = 5000, limit_per_tag: int | None = None) -> list[FakePost]:
    """Publish the real illustrations of the test set (tests/support/testdata.py): one post each. The set holds one
    real repost (takimoto_hifumi 3.jpg = 11.jpg)."""
    from tests.support.testdata import raw_images

    per_tag: dict[str, list[tuple[bytes, str]]] = {}
    for tag, path in raw_images():
        per_tag.setdefault(tag, []).append((path.read_bytes(), path.suffix.lower()))
    if limit_per_tag is not None:
        per_tag = {t: files[:limit_per_tag] for t, files in per_tag.items()}
    return publish(fake, per_tag, first_id)


def load_drawn(
    fake: FakeSafebooru, counts: dict[str, int], first_id: int = 5000, size: tuple[int, int] = (160, 120)
) -> list[FakePost]:
    """Publish `counts[tag]` pictures drawn with Pillow per tag (PNG and JPEG alternating, all distinct)."""
    from tests.support.drawn import drawn_image

    formats = [("PNG", ".png"), ("JPEG", ".jpg")]
    per_tag = {
        tag: [(drawn_image(f"{tag}/{i}", size, formats[i % 2][0]), formats[i % 2][1]) for i in range(n)]
        for tag, n in counts.items()
    }
    return publish(fake, per_tag, first_id)
