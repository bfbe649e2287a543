"""The picture a person (the "Who is this?" page) or a script (POST /api/predict) sends: a file in the
multipart field `picture`, or the address of a picture on an allowed site in `url`, fetched with the
download code (download.fetch: the allow-list, the address checks, the size cap, the deadline) into a
temporary directory that is gone before the answer. The same size cap either way: WAIFU_MAX_DOWNLOAD_BYTES."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from core.errors import Refused, Retryable, Unavailable
from core.settings import Settings
from download.fetch import fetch

PICTURE_FIELD = "picture"
URL_FIELD = "url"
MAX_URL = 2000  # characters


class BadUpload(ValueError):
    """What was sent cannot be named; `status` is the HTTP answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """Every known site's hosts (and WAIFU_EXTRA_HOSTS): the hosts a pasted address may name."""
    return frozenset().union(*(settings.hosts_for(site.name) for site in settings.all_sites))


async def picture_bytes(request: Request, settings: Settings) -> bytes:
    """The bytes of the picture the request carries; BadUpload says what is wrong with it."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadUpload(
            415,
            f"send the picture as multipart/form-data: a file in the `{PICTURE_FIELD}` field, "
            f"or its address on an allowed site in `{URL_FIELD}`",
        )
    try:
        async with request.form(max_files=1, max_fields=20) as form:
            upload, url = form.get(PICTURE_FIELD), form.get(URL_FIELD)
            if isinstance(upload, UploadFile) and (upload.filename or upload.size):
                return await _read_upload(upload, settings.max_download_bytes)
    except (HTTPException, MultiPartException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", "")
        raise BadUpload(400, f"the form could not be read: {detail}") from exc
    if isinstance(url, str) and url.strip():
        return await run_in_threadpool(fetch_picture, url.strip(), settings)
    raise BadUpload(
        400,
        f"choose a picture to upload (field `{PICTURE_FIELD}`) or paste the address of one on an allowed site "
        f"(field `{URL_FIELD}`)",
    )


async def _read_upload(upload: UploadFile, cap: int) -> bytes:
    data = await upload.read(cap + 1)
    if len(data) > cap:
        raise BadUpload(413, f"the picture is larger than {cap} bytes (WAIFU_MAX_DOWNLOAD_BYTES)")
    if not data:
        raise BadUpload(400, "the file sent is empty: choose a picture")
    return data


def fetch_picture(url: str, settings: Settings) -> bytes:
    """The picture at `url`, through download.fetch; its temporary file is removed before returning."""
    if len(url) > MAX_URL:
        raise BadUpload(400, f"the address is longer than {MAX_URL} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise BadUpload(400, "the address holds spaces or control characters: paste it again")
    try:
        with tempfile.TemporaryDirectory(prefix="waifu-who-") as workdir:
            fetched = fetch(url, settings, Path(workdir), allowed_hosts(settings))
            return fetched.path.read_bytes()
    except (ValueError, httpx.InvalidURL) as exc:  # a port out of range, a host httpx cannot encode...
        raise BadUpload(422, f"this address cannot be used: {exc}") from exc
    except Refused as exc:
        raise BadUpload(422, f"this address cannot be used: {exc}") from exc
    except Retryable as exc:
        raise BadUpload(502, f"the site did not deliver the picture (try again later): {exc}") from exc
    except Unavailable as exc:
        raise BadUpload(503, f"pictures cannot be fetched right now: {exc}") from exc
