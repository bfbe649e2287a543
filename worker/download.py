"""Download one post's file: allowed hosts only, checked redirects, size cap while streaming, md5 and
image verification, stored under the data dir by content hash. Every refusal is recorded on the row.

`download_post` is the plain function the Celery task wraps; it never raises for a bad input.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError
from sqlmodel import col, select

from db.engine import session_scope
from db.models import Post, PostState
from db.states import touch, transition
from waifu.logs import kv
from waifu.settings import Settings
from worker.hostlimit import wait_for_slot

log = logging.getLogger("waifu.download")

STORED_STATES = (PostState.downloaded, PostState.detected, PostState.done)
# MPO is how Pillow reports multi-picture JPEGs (camera files): still a .jpg
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}
# the only decoders Pillow may try on fetched bytes (no EPS via Ghostscript, no PSD...); JPEG also yields MPO
OPEN_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
CHUNK = 64 * 1024


class Refused(Exception):
    """A final refusal: the row ends `failed` with this message."""


class Transient(Exception):
    """Worth another try later (429, 5xx, network trouble, a truncated body)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class DownloadOutcome:
    state: PostState | None
    retry_in: float | None = None  # seconds after which the caller should call again
    reason: str | None = None


def outcome(post: Post) -> DownloadOutcome:
    """The row's state as a PostState (a freshly loaded row holds the plain string) and its reason."""
    return DownloadOutcome(PostState(post.state), reason=post.reason)


@dataclass
class Fetched:
    path: Path
    md5: str
    size: int


# ------------------------------------------------------------------------- checks -------------
def check_url(url: str, settings: Settings) -> str:
    """Refuses anything but http(s) to an allowed host, and any path traversal. Returns the host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused(f"refused URL scheme {parts.scheme or 'none'!r} in {url[:200]!r}")
    host = (parts.hostname or "").lower()
    if host not in settings.allowed_hosts:
        raise Refused(f"host {host or '?'!r} is not on the allow-list ({', '.join(sorted(settings.allowed_hosts))})")
    if ".." in path_segments(parts.path):
        raise Refused(f"path traversal in URL refused: {parts.path[:200]!r}")
    return host


def path_segments(path: str) -> list[str]:
    """Segments after decoding up to three times (`%252e%252e` is `..` to a server that decodes twice)."""
    for _ in range(3):
        path = unquote(path)
    return path.replace("\\", "/").split("/")


def check_image_name(name: str) -> None:
    """The remote name is never used for storage, but a name like `../x` means the listing is not to be trusted."""
    if ".." in name or "/" in name or "\\" in name or "\x00" in name:
        raise Refused(f"unsafe image name from the API refused: {name[:200]!r}")


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def describe_start(head: bytes) -> str:
    """What the bytes look like, for a person: an HTML page is named as such, text is quoted as text."""
    text = head.lstrip()
    if not head:
        return "an empty file"
    if text.lower().startswith((b"<!doctype html", b"<html")):
        return f"an HTML page, starts with {quote_bytes(text[:15])}"
    return f"starts with {quote_bytes(head[:16])}"


def quote_bytes(data: bytes) -> str:
    text = data.decode("latin-1")
    return repr(text) if text.isascii() and text.isprintable() else repr(data)


_PILLOW_LIMIT = threading.Lock()


@contextmanager
def own_pixel_check() -> Iterator[None]:
    """Pillow's own bomb guard raises before the size is known; lift it around our open only (we check the
    size ourselves, with a readable reason) and restore it, so other code in the process keeps its guard."""
    with _PILLOW_LIMIT:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_head(path: Path, size: int = 64) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


def verify_image(path: Path, settings: Settings) -> tuple[str, int, int]:
    """Returns (format, width, height); refuses non-images and pixel bombs before decoding them."""
    with own_pixel_check():
        return _verify_image(path, settings)


def _verify_image(path: Path, settings: Settings) -> tuple[str, int, int]:
    fmt = ""
    try:
        with Image.open(path, formats=OPEN_FORMATS) as im:
            fmt, (width, height) = im.format or "", im.size
            pixels = width * height
            if pixels > settings.max_image_pixels:
                raise Refused(f"image is {width}x{height} = {pixels / 1e6:.0f} MP, over the "
                              f"{settings.max_image_pixels / 1e6:.0f} MP limit (decompression bomb?)")
            im.verify()
        with Image.open(path, formats=OPEN_FORMATS) as im:
            im.load()  # verify() does not decode: a truncated file only shows here
    except Refused:
        raise
    except UnidentifiedImageError as exc:
        raise Refused(f"not an image: {describe_start(read_head(path))} "
                      f"(accepted: {', '.join(OPEN_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Refused(f"broken image ({fmt or 'unknown format'}): {exc}") from exc
    if fmt not in FORMAT_EXTENSIONS:
        raise Refused(f"unsupported image format {fmt!r}")
    return fmt, width, height


# ------------------------------------------------------------------------- fetching -----------
def fetch(url: str, settings: Settings, workdir: Path) -> Fetched:
    """Streams `url` into a temp file, following only allowed redirects; md5 computed on the way."""
    with httpx.Client(timeout=settings.http_timeout, follow_redirects=False,
                      headers={"User-Agent": "waifu-collector/0.1"}) as client:
        for _hop in range(settings.max_redirects + 1):
            host = check_url(url, settings)
            take_slot(host, settings)
            try:
                with client.stream("GET", url) as resp:
                    if resp.is_redirect:
                        target = urljoin(url, resp.headers.get("location", ""))
                        target_host = (urlsplit(target).hostname or "").lower()
                        if target_host not in settings.allowed_hosts:
                            raise Refused(f"redirect to disallowed host {target_host or '?'!r} refused "
                                          f"({target[:200]})")
                        url = target
                        continue
                    check_status(resp)
                    return stream_to_file(resp, settings, workdir)
            except httpx.TimeoutException as exc:
                raise Transient(f"timed out after {settings.http_timeout:.0f} s: {type(exc).__name__}") from exc
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                raise Transient(f"connection broke off mid-body (truncated?): {exc}") from exc
            except httpx.DecodingError as exc:
                raise Transient(f"body could not be decoded: {exc}") from exc
            except httpx.TransportError as exc:
                raise Transient(f"network error: {type(exc).__name__}: {exc}") from exc
        raise Refused(f"more than {settings.max_redirects} redirects")


def take_slot(host: str, settings: Settings) -> None:
    """Waits for the shared per-host limit; a Redis outage is worth a retry, not a failed row."""
    try:
        wait_for_slot(host, settings)
    except Exception as exc:  # redis.exceptions.* (and limits' own storage errors)
        raise Transient(f"host rate limiter unavailable: {type(exc).__name__}: {exc}") from exc


def check_status(resp: httpx.Response) -> None:
    status = resp.status_code
    if status == 200:
        return
    phrase = f"HTTP {status} {resp.reason_phrase}".strip()
    if status == 429:
        wait = retry_after_seconds(resp.headers.get("retry-after"))
        raise Transient(f"{phrase}: rate limited by the image host", wait)
    if status >= 500:
        raise Transient(phrase, retry_after_seconds(resp.headers.get("retry-after")))
    if status in (404, 410):
        raise Refused(f"{phrase}: file gone (post deleted after listing?)")
    if status in (401, 403):
        raise Refused(f"{phrase}: the image host refuses access")
    raise Refused(f"{phrase}: unexpected answer")


def stream_to_file(resp: httpx.Response, settings: Settings, workdir: Path) -> Fetched:
    cap = settings.max_download_bytes
    announced = resp.headers.get("content-length")
    if announced and announced.isdigit() and int(announced) > cap:
        raise Refused(f"file is {int(announced)} bytes, over the {cap} byte cap")
    md5, size = hashlib.md5(), 0
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".download-")
    path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in resp.iter_bytes(CHUNK):
                size += len(chunk)
                if size > cap:
                    raise Refused(f"file exceeds the {cap} byte cap (stopped after {size} bytes)")
                md5.update(chunk)
                out.write(chunk)
        # raw bytes, not decoded ones: Content-Length counts the body as sent (gzip included)
        if announced and announced.isdigit() and resp.num_bytes_downloaded < int(announced):
            raise Transient(f"truncated body: got {resp.num_bytes_downloaded} of {announced} bytes")
        return Fetched(path, md5.hexdigest(), size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------- the step -----------
def find_original(session, post: Post) -> int | None:  # noqa: ANN001
    """An earlier stored post with the same md5 makes this one a repost."""
    if not post.md5:
        return None  # an empty md5 would match every other empty one
    return session.exec(
        select(Post.id).where(Post.md5 == post.md5, Post.id != post.id, col(Post.state).in_(STORED_STATES))
        .order_by(Post.id)
    ).first()


def backoff(settings: Settings, attempts: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return retry_after
    return settings.download_backoff * (2 ** max(0, attempts - 1)) * random.uniform(0.8, 1.2)


def download_post(post_id: int, settings: Settings) -> DownloadOutcome:
    """Fetches, verifies and stores one post; records every outcome on its row."""
    with session_scope() as session:
        post = session.get(Post, post_id, with_for_update=True)
        if post is None:
            return DownloadOutcome(None, reason="no such post")
        if post.state != PostState.discovered:
            return outcome(post)  # a duplicate message: already handled
        post.attempts += 1
        original = find_original(session, post)
        if original is not None:
            skip_as_duplicate(post, original)
            return outcome(post)
        url, md5, attempts = post.file_url, (post.md5 or "").strip().lower(), post.attempts
        image_name = post.image

    fetched: Fetched | None = None
    try:
        check_image_name(image_name)
        settings.images_dir.mkdir(parents=True, exist_ok=True)
        fetched = fetch(url, settings, settings.images_dir)
        if fetched.md5 != md5:
            raise Refused(f"md5 mismatch: API announced {md5 or 'nothing'}, file is {fetched.md5}")
        fmt, width, height = verify_image(fetched.path, settings)
        # named by the hash we computed ourselves: nothing from the remote side reaches the path
        relative = Path("images") / fetched.md5[:2] / f"{fetched.md5}.{FORMAT_EXTENSIONS[fmt]}"
        (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched.path, settings.data_dir / relative)
        fetched = None
        return record_stored(post_id, relative, width, height, settings)
    except Refused as exc:
        return record(post_id, PostState.failed, str(exc))
    except Transient as exc:
        if attempts <= settings.download_retries:
            delay = backoff(settings, attempts, exc.retry_after)
            record_retry(post_id, f"retrying: {exc} (attempt {attempts} of {settings.download_retries + 1})")
            return DownloadOutcome(PostState.discovered, retry_in=delay, reason=str(exc))
        return record(post_id, PostState.failed, f"gave up after {attempts} attempts: {exc}")
    except Exception as exc:  # never lose a row to a bug: say what happened on it
        log.exception(kv("download crashed", post=post_id))
        return record(post_id, PostState.failed, f"unexpected error: {type(exc).__name__}: {exc}")
    finally:
        if fetched is not None:
            fetched.path.unlink(missing_ok=True)


def skip_as_duplicate(post: Post, original: int) -> None:
    transition(post, PostState.skipped, f"duplicate of post {original} (same md5 {post.md5})")
    post.duplicate_of = original


def record(post_id: int, state: PostState, reason: str) -> DownloadOutcome:
    with session_scope() as session:
        post = session.get(Post, post_id, with_for_update=True)
        if post is None:  # deleted while we fetched
            return DownloadOutcome(None, reason="no such post")
        if post.state == PostState.discovered:  # another worker may have finished it meanwhile
            transition(post, state, reason)
        return outcome(post)


def record_retry(post_id: int, reason: str) -> None:
    with session_scope() as session:
        post = session.get(Post, post_id, with_for_update=True)
        if post is None or post.state != PostState.discovered:
            return  # deleted, or finished by another worker meanwhile: nothing to retry
        post.reason = reason
        touch(post)
        log.info(kv("retry", post=post_id, reason=reason))


def record_stored(post_id: int, relative: Path, width: int, height: int, settings: Settings) -> DownloadOutcome:
    with session_scope() as session:
        post = session.get(Post, post_id, with_for_update=True)
        if post is None:
            return DownloadOutcome(None, reason="no such post")
        if post.state != PostState.discovered:
            return outcome(post)
        original = find_original(session, post)  # another worker may have stored the same file meanwhile
        if original is not None:
            skip_as_duplicate(post, original)
            return outcome(post)
        post.stored_path = relative.as_posix()
        post.file_size = (settings.data_dir / relative).stat().st_size
        post.width, post.height = post.width or width, post.height or height
        transition(post, PostState.downloaded)
        return outcome(post)
