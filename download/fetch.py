"""Fetching one file safely, with no database: allowed hosts only, every redirect hop checked, the size
cap enforced while streaming, the md5 computed on the way, an overall deadline. Errors follow core.errors:
`Refused` is final, `Retryable` is worth another try.

Design notes: docs/architecture.md, `download/fetch.py`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx

from core.errors import Refused, Retryable, Unavailable
from core.http import USER_AGENT, check_status
from core.ratelimit import wait_for_slot
from core.settings import Settings
from download.tls import shared_context


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


def check_redirect(url: str, target: str, allowed: frozenset[str]) -> None:
    """A redirect may stay on the allow-list and never go from https to http."""
    target_host = (urlsplit(target).hostname or "").lower()
    if target_host not in allowed:
        raise Refused(f"redirect to disallowed host {target_host or '?'!r} refused ({target[:200]})")
    if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
        raise Refused(f"redirect from https to {urlsplit(target).scheme or '?'} refused ({target[:200]})")


def address_refusal(address: str) -> str | None:
    """Why a connection to this address is refused (it is not a global unicast address), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is not part of the address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip.is_global and not ip.is_multicast:
        return None
    for kind, words in (
        ("loopback", "a loopback address"),
        ("link_local", "a link-local address"),
        ("unspecified", "an unspecified address"),
        ("multicast", "a multicast address"),
        ("private", "a private address"),
        ("reserved", "a reserved address"),
    ):
        if getattr(ip, f"is_{kind}"):
            return words
    return "not a global address"


def resolve(host: str, port: int, local_hosts: frozenset[str]) -> str:
    """The address to connect to for `host`: its first address, after every address it has was checked.
    An address written as the host (only configuration puts one on the allow-list) is taken as written:
    there is no name to rebind."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Retryable(f"cannot resolve {host!r}: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise Retryable(f"cannot resolve {host!r}: no address")
    if host not in local_hosts and not _is_address(host):
        for address in addresses:
            why = address_refusal(address)
            if why:
                raise Refused(
                    f"host {host!r} resolves to {address}, {why}: refused (only hosts in WAIFU_LOCAL_HOSTS may be)"
                )
    return addresses[0]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URL with its host replaced by `address`, the Host header and the TLS name that keep the
    request what it was: (url to request, headers, httpx extensions)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    name = parts.hostname or ""
    host_header = (f"[{name}]" if ":" in name else name) + port
    literal = f"[{address}]" if ":" in address else address
    target = urlunsplit(parts._replace(netloc=literal + port))
    extensions = {"sni_hostname": name} if parts.scheme == "https" else {}
    return target, {"Host": host_header}, extensions


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
    """Streams `url` into a temp file in `workdir`, touching only `allowed` hosts (redirects included) at
    checked addresses, within the overall deadline; md5 computed on the way."""
    local_hosts = frozenset(h.lower() for h in settings.local_hosts)
    with httpx.Client(
        timeout=settings.http_timeout_s,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        verify=shared_context(),
    ) as client:
        for _hop in range(settings.max_redirects + 1):
            host = check_url(url, allowed)
            take_slot(host, settings)
            started = time.monotonic()  # the deadline counts from here: the rate limiter's wait is not the host's
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            target, headers, extensions = pinned(url, resolve(host, port, local_hosts))
            try:
                with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
                    if resp.is_redirect:
                        location = urljoin(url, resp.headers.get("location", ""))
                        check_redirect(url, location, allowed)
                        url = location
                        continue
                    check_status(
                        resp.status_code,
                        resp.reason_phrase,
                        resp.headers.get("retry-after"),
                        settings.retry_after_max_s,
                        subject="file",
                    )
                    return stream_to_file(resp, settings, workdir, started)
            except httpx.TimeoutException as exc:
                raise Retryable(f"timed out after {settings.http_timeout_s:.0f} s: {type(exc).__name__}") from exc
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                raise Retryable(f"connection broke off mid-body (truncated?): {exc}") from exc
            except httpx.DecodingError as exc:
                raise Retryable(f"body could not be decoded: {exc}") from exc
            except httpx.TransportError as exc:
                raise Retryable(f"network error: {type(exc).__name__}: {exc}") from exc
        raise Refused(f"more than {settings.max_redirects} redirects")


def deadline_for(settings: Settings, started: float, announced: int | None) -> float:
    """When a download must be over: the HTTP timeout, plus its size (announced, else the cap) at the
    slowest rate we accept. Every read is bounded by the timeout, so a host dripping a byte just inside it
    would otherwise hold the thread as long as it likes."""
    size = announced if announced is not None and announced <= settings.max_download_bytes else None
    return started + settings.http_timeout_s + (size or settings.max_download_bytes) / settings.download_min_rate


def stream_to_file(resp: httpx.Response, settings: Settings, workdir: Path, started: float | None = None) -> Fetched:
    cap = settings.max_download_bytes
    announced = resp.headers.get("content-length")
    if announced and announced.isdigit() and int(announced) > cap:
        raise Refused(f"file is {int(announced)} bytes, over the {cap} byte cap")
    started = time.monotonic() if started is None else started
    deadline = deadline_for(settings, started, int(announced) if announced and announced.isdigit() else None)
    md5, size = hashlib.md5(), 0
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".download-")
    path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in resp.iter_bytes():  # as each read returns: a fixed chunk size would wait for it to fill
                size += len(chunk)
                if size > cap:
                    raise Refused(f"file exceeds the {cap} byte cap (stopped after {size} bytes)")
                md5.update(chunk)
                out.write(chunk)
                if time.monotonic() > deadline:
                    raise Retryable(
                        f"download too slow: {size} of {announced or '?'} bytes after "
                        f"{time.monotonic() - started:.0f} s, over its deadline of {deadline - started:.0f} s "
                        f"(WAIFU_HTTP_TIMEOUT_S + size / WAIFU_DOWNLOAD_MIN_RATE {settings.download_min_rate:.0f} B/s)"
                    )
        # raw bytes, not decoded ones: Content-Length counts the body as sent (gzip included)
        if announced and announced.isdigit() and resp.num_bytes_downloaded < int(announced):
            raise Retryable(f"truncated body: got {resp.num_bytes_downloaded} of {announced} bytes")
        return Fetched(path, md5.hexdigest(), size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
