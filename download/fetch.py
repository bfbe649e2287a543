"""Fetching one file safely, with no database: allowed hosts only, every redirect hop checked, the size
cap enforced while streaming, the md5 computed on the way. Errors follow core.errors: `Refused` is final,
`Retryable` is worth another try."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from core.errors import Refused, Retryable, Unavailable
from core.http import USER_AGENT, check_status
from core.ratelimit import wait_for_slot
from core.settings import Settings

CHUNK = 64 * 1024


@dataclass
class Fetched:
    path: Path
    md5: str
    size: int


def check_url(url: str, allowed: frozenset[str]) -> str:
    """Refuses anything but http(s) to an allowed host, and any path traversal. Returns the host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused(f"refused URL scheme {parts.scheme or 'none'!r} in {url[:200]!r}")
    host = (parts.hostname or "").lower()
    if host not in allowed:
        raise Refused(f"host {host or '?'!r} is not on the allow-list ({', '.join(sorted(allowed))})")
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


def take_slot(host: str, settings: Settings) -> None:
    """Waits for the shared per-host limit; a Redis outage is the machine's fault, worth a retry later."""
    try:
        wait_for_slot(host, settings.downloads_per_second, settings.broker_url)
    except Exception as exc:  # redis.exceptions.* (and limits' own storage errors)
        raise Unavailable(f"host rate limiter unavailable: {type(exc).__name__}: {exc}") from exc


def fetch(url: str, settings: Settings, workdir: Path, allowed: frozenset[str]) -> Fetched:
    """Streams `url` into a temp file in `workdir`, touching only `allowed` hosts (redirects included);
    md5 computed on the way."""
    with httpx.Client(
        timeout=settings.http_timeout, follow_redirects=False, headers={"User-Agent": USER_AGENT}
    ) as client:
        for _hop in range(settings.max_redirects + 1):
            host = check_url(url, allowed)
            take_slot(host, settings)
            try:
                with client.stream("GET", url) as resp:
                    if resp.is_redirect:
                        target = urljoin(url, resp.headers.get("location", ""))
                        target_host = (urlsplit(target).hostname or "").lower()
                        if target_host not in allowed:
                            raise Refused(
                                f"redirect to disallowed host {target_host or '?'!r} refused ({target[:200]})"
                            )
                        url = target
                        continue
                    check_status(
                        resp.status_code,
                        resp.reason_phrase,
                        resp.headers.get("retry-after"),
                        settings.retry_after_max,
                        subject="file",
                    )
                    return stream_to_file(resp, settings, workdir)
            except httpx.TimeoutException as exc:
                raise Retryable(f"timed out after {settings.http_timeout:.0f} s: {type(exc).__name__}") from exc
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                raise Retryable(f"connection broke off mid-body (truncated?): {exc}") from exc
            except httpx.DecodingError as exc:
                raise Retryable(f"body could not be decoded: {exc}") from exc
            except httpx.TransportError as exc:
                raise Retryable(f"network error: {type(exc).__name__}: {exc}") from exc
        raise Refused(f"more than {settings.max_redirects} redirects")


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
            raise Retryable(f"truncated body: got {resp.num_bytes_downloaded} of {announced} bytes")
        return Fetched(path, md5.hexdigest(), size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
