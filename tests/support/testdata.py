"""The one place tests and benchmarks get real anime illustrations and face crops from.

The set is freedomofkeima/transfer-learning-anime on GitHub at a pinned commit; every file has a sha256 in
tests/support/testdata_registry.txt. Where the files come from, first match wins:

1. `WAIFU_TEST_DATA`: a local copy (the folder holding `transfer-learning-anime/`, or that folder itself,
   with `raw (unrecognized)` stored as `raw_unrecognized_by_lbpcascade`). Files are read in place, each
   checked against its sha256 the first time this process uses it (the whole set hashes in well under a
   second; a size check would miss a same-size corruption). Nothing is downloaded: CI sets this.
2. Otherwise pooch fetches each file on first use from `WAIFU_TEST_DATA_URL` (default: the pinned upstream)
   into `WAIFU_TEST_DATA_CACHE` (default: the OS cache, `waifu-test-data/<commit>`), verifies it, and
   reuses the verified copy in later runs.

Nothing happens at import: a test that never asks for an image never triggers a fetch. When the images
cannot be had, every call raises `ImagesUnavailable` with one line saying how to provide them (conftest
reports it as that line alone).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

COMMIT = "84d35f181b6149349ec320a5b975fde4f3270ba3"
UPSTREAM_URL = f"https://raw.githubusercontent.com/freedomofkeima/transfer-learning-anime/{COMMIT}/"
REGISTRY = Path(__file__).with_name("testdata_registry.txt")
SET_NAME = "transfer-learning-anime"
# upstream folder -> folder in a local copy, where the two differ (a space-free name there)
LOCAL_NAMES = {"raw (unrecognized)": "raw_unrecognized_by_lbpcascade"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
PARALLEL_FETCHES = 8

_verified: dict[tuple[str, str], Path] = {}  # (source, upstream path) -> checked file, for this process
_network_failure: dict[str, str] = {}  # base URL -> why it failed: later calls fail at once, not per file
_lock = threading.Lock()


class ImagesUnavailable(RuntimeError):
    """The real test images can be neither read from a local copy nor downloaded."""


@cache
def registry() -> dict[str, str]:
    """upstream path -> 'sha256:<hex>', in the order of the registry file."""
    entries = {}
    for line in REGISTRY.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, checksum = shlex.split(line)  # quoted names hold spaces, as pooch reads them
            entries[name] = checksum
    return entries


def base_url() -> str:
    url = os.environ.get("WAIFU_TEST_DATA_URL") or UPSTREAM_URL
    return url if url.endswith("/") else url + "/"


def cache_dir() -> Path:
    configured = os.environ.get("WAIFU_TEST_DATA_CACHE")
    if configured:
        return Path(configured)
    import pooch

    return Path(pooch.os_cache("waifu-test-data")) / COMMIT[:12]


def local_root() -> Path | None:
    """The local copy WAIFU_TEST_DATA names (the set itself or the folder holding it), if set."""
    configured = os.environ.get("WAIFU_TEST_DATA")
    if not configured:
        return None
    root = Path(configured).expanduser()
    return root / SET_NAME if (root / SET_NAME).is_dir() else root


def source() -> str:
    """Where files come from now (the settings are read on every call, so a test can change them)."""
    root = local_root()
    return f"local {root}" if root is not None else f"{base_url()} -> {cache_dir()}"


def unavailable(cause: str) -> ImagesUnavailable:
    where = f"WAIFU_TEST_DATA={os.environ['WAIFU_TEST_DATA']}" if os.environ.get("WAIFU_TEST_DATA") else None
    how = (
        f"set WAIFU_TEST_DATA to a copy of the {SET_NAME} set, or allow downloads from {base_url()} "
        f"(WAIFU_TEST_DATA_URL)"
    )
    if where:
        how = f"{where} is used instead of downloads; point it at a complete copy of the {SET_NAME} set, or unset it"
    one_line = " ".join(cause.split())
    return ImagesUnavailable(f"real test images unavailable: {how}: {one_line[:400]}")


# ----------------------------------------------------------------------------- one file ----
def data_file(name: str) -> Path:
    """A verified local file for `name`, an upstream path such as 'raw/nishikino_maki/1.png'."""
    if name not in registry():
        raise KeyError(f"{name!r} is not in {REGISTRY.name}")
    key = (source(), name)
    if key not in _verified:
        root = local_root()
        _verified[key] = _from_local_copy(root, name) if root is not None else _download(name)
    return _verified[key]


def _from_local_copy(root: Path, name: str) -> Path:
    top, _, rest = name.partition("/")
    candidates = [root / LOCAL_NAMES.get(top, top) / rest, root / name]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise unavailable(f"{name} is missing from {root}")
    expected = registry()[name].removeprefix("sha256:")
    actual = hashlib.sha256(file.read_bytes()).hexdigest()
    if actual != expected:
        raise unavailable(f"{file} fails its checksum: sha256 {actual}, expected {expected}")
    return file


@cache
def _pooch(base: str, cache: str):
    import pooch

    pooch.get_logger().setLevel("WARNING")  # no line per file: a failure shows only the one line below
    fetcher = pooch.create(path=cache, base_url=base, registry=dict(registry()), retry_if_failed=1)
    # pooch joins base URL and name as they are: names with spaces need percent-encoding in the URL
    fetcher.urls = {name: base + urllib.parse.quote(name) for name in fetcher.registry}
    return fetcher


def _download(name: str) -> Path:
    import pooch
    import requests

    base = base_url()
    if base in _network_failure:
        raise unavailable(_network_failure[base])
    fetcher = _pooch(base, str(cache_dir()))
    # pooch creates the parent folder with a check-then-makedirs (no exist_ok): two parallel fetches into one
    # folder can race there (seen in CI as FileExistsError), so the folder is made here first, race-free
    (cache_dir() / name).parent.mkdir(parents=True, exist_ok=True)
    # big chunks: pooch's default 1 KiB chunk is slow in Python for 44 MB of illustrations
    downloader = pooch.HTTPDownloader(chunk_size=1 << 16, timeout=60)
    try:
        return Path(fetcher.fetch(name, downloader=downloader))
    except ValueError as exc:  # pooch's checksum refusal: this file, not the network, is wrong
        raise unavailable(f"{name} from {fetcher.get_url(name)} refused: {exc}") from exc
    except (requests.RequestException, OSError) as exc:
        cause = f"{name} from {fetcher.get_url(name)}: {type(exc).__name__}: {exc}"
        if isinstance(exc, requests.ConnectionError | requests.Timeout):  # the server, not this one file
            with _lock:
                _network_failure.setdefault(base, cause)
        raise unavailable(cause) from exc


def data_files(names: list[str]) -> list[Path]:
    """Verified local files for `names` (fetched in parallel when not local), in the same order."""
    missing = [n for n in names if (source(), n) not in _verified]
    if len(missing) > 1 and local_root() is None:
        with ThreadPoolExecutor(PARALLEL_FETCHES) as pool:
            list(pool.map(data_file, missing))
    return [data_file(n) for n in names]


# ------------------------------------------------------------------------- the set's parts ----
def names_under(folder: str) -> list[str]:
    return [n for n in registry() if n.startswith(folder + "/")]


def _tag_and_order(name: str) -> tuple[str, int, str]:
    """Sort key: character tag, then file number as a person counts (2 before 10)."""
    _, tag, file = name.split("/")
    stem = file.rsplit(".", 1)[0]
    return tag, len(stem), stem


def raw_names() -> list[str]:
    """Upstream names of the full illustrations, by tag then by number; no fetch."""
    names = [n for n in names_under("raw") if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(names, key=_tag_and_order)


def raw_images() -> list[tuple[str, Path]]:
    """(tag, file) for every full illustration (107, three characters), by tag then by number."""
    names = raw_names()
    return [(n.split("/")[1], p) for n, p in zip(names, data_files(names), strict=True)]


def raw_image(name: str) -> Path:
    """One full illustration, e.g. raw_image("nishikino_maki/1.png")."""
    return data_file(f"raw/{name}")


def crop_dirs() -> tuple[Path, Path]:
    """(train_dir, test_dir) of the 96x96 face crops, each with a <tag>/ folder per character."""
    dirs = []
    for folder in ("resized_for_training", "resized_for_test"):
        names = names_under(folder)
        first = data_files(names)[0]
        dirs.append(first.parents[1])  # <folder>/<tag>/<file>
    return dirs[0], dirs[1]


def crop_counts() -> tuple[dict[str, int], dict[str, int]]:
    """Crops per character in (train_dir, test_dir) as the registry lists them; no fetch."""
    counts: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for split, folder in zip(counts, ("resized_for_training", "resized_for_test"), strict=True):
        for name in names_under(folder):
            tag = name.split("/")[1]
            split[tag] = split.get(tag, 0) + 1
    return counts
