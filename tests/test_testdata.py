"""tests/support/testdata.py over real HTTP: a local server stands in for the upstream, an empty cache dir for a fresh
clone. The mechanism is exercised on files drawn here (with their own registry), so this module needs neither
the real set nor the network; the committed registry itself is checked at the end."""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support import testdata
from tests.support.drawn import drawn_image
from tests.support.env import PROJECT_ROOT
from tests.support.testdata import ImagesUnavailable

# upstream names, one with the space upstream has in "raw (unrecognized)", and 2 before 10 as a person counts
FILES = {
    "raw/b_chan/10.jpg": drawn_image("b10", fmt="JPEG"),
    "raw/b_chan/2.png": drawn_image("b2"),
    "raw/a_chan/1.png": drawn_image("a1"),
    "raw (unrecognized)/a_chan/1.png": drawn_image("u1"),
}


class Upstream:
    """A static file server in a thread, laid out as the upstream repository, recording what is asked."""

    def __init__(self, root: Path) -> None:
        self.root, self.paths = root, []
        recorded = self.paths

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                recorded.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/pinned/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            (self.root / "pinned" / name).parent.mkdir(parents=True, exist_ok=True)
            (self.root / "pinned" / name).write_bytes(data)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    server = Upstream(tmp_path / "www")
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def drawn_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """testdata reads a registry of FILES; no copy, an empty cache, a fresh process's memory."""
    registry = tmp_path / "registry.txt"
    registry.write_text(
        "# drawn\n" + "".join(f"{shlex.quote(n)} sha256:{hashlib.sha256(d).hexdigest()}\n" for n, d in FILES.items())
    )
    monkeypatch.setattr(testdata, "REGISTRY", registry)
    monkeypatch.setattr(testdata, "_verified", {})
    monkeypatch.setattr(testdata, "_network_failure", {})
    monkeypatch.delenv("WAIFU_TEST_DATA", raising=False)
    monkeypatch.setenv("WAIFU_TEST_DATA_CACHE", str(tmp_path / "cache"))
    testdata.registry.cache_clear()
    testdata._pooch.cache_clear()
    yield tmp_path / "cache"
    testdata.registry.cache_clear()
    testdata._pooch.cache_clear()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/nothing/"


def test_files_arrive_verified_and_are_cached(drawn_set: Path, upstream: Upstream, monkeypatch) -> None:
    upstream.publish(FILES)
    monkeypatch.setenv("WAIFU_TEST_DATA_URL", upstream.url)
    images = testdata.raw_images()
    assert [(tag, p.name) for tag, p in images] == [("a_chan", "1.png"), ("b_chan", "2.png"), ("b_chan", "10.jpg")]
    assert all(p.read_bytes() == FILES[f"raw/{tag}/{p.name}"] for tag, p in images)
    assert all(p.is_relative_to(drawn_set) for _, p in images), "kept in the cache dir"
    unrecognized = testdata.data_file("raw (unrecognized)/a_chan/1.png")
    assert unrecognized.read_bytes() == FILES["raw (unrecognized)/a_chan/1.png"]
    assert "/pinned/raw%20%28unrecognized%29/a_chan/1.png" in upstream.paths, "the space is percent-encoded"
    assert len(upstream.paths) == len(FILES)

    # a later session: everything comes from the cache, checked again, nothing is asked of the server
    monkeypatch.setattr(testdata, "_verified", {})
    assert testdata.raw_image("b_chan/10.jpg").read_bytes() == FILES["raw/b_chan/10.jpg"]
    assert len(upstream.paths) == len(FILES)


def test_a_corrupted_file_on_the_server_is_refused(drawn_set: Path, upstream: Upstream, monkeypatch) -> None:
    upstream.publish({**FILES, "raw/a_chan/1.png": FILES["raw/a_chan/1.png"][:-10] + b"x" * 10})
    monkeypatch.setenv("WAIFU_TEST_DATA_URL", upstream.url)
    with pytest.raises(ImagesUnavailable) as refused:
        testdata.raw_image("a_chan/1.png")
    message = str(refused.value)
    assert message.startswith("real test images unavailable: ")
    assert "raw/a_chan/1.png" in message and "does not match the known hash" in message
    assert not (drawn_set / "raw" / "a_chan" / "1.png").exists(), "a refused file never lands in the cache"
    assert testdata.raw_image("b_chan/2.png").read_bytes() == FILES["raw/b_chan/2.png"], "the others still arrive"


def test_no_copy_and_no_server_is_one_clear_line(drawn_set: Path, monkeypatch) -> None:
    url = closed_port_url()
    monkeypatch.setenv("WAIFU_TEST_DATA_URL", url)
    with pytest.raises(ImagesUnavailable) as first:
        testdata.raw_images()
    message = str(first.value)
    assert "\n" not in message
    assert message.startswith(
        "real test images unavailable: set WAIFU_TEST_DATA to a copy of the "
        f"transfer-learning-anime set, or allow downloads from {url} (WAIFU_TEST_DATA_URL): "
    )
    assert "ConnectionError" in message
    with pytest.raises(ImagesUnavailable, match="ConnectionError"):  # remembered: no wait per file
        testdata.raw_image("b_chan/2.png")


def test_a_local_copy_comes_first_and_is_checked(drawn_set: Path, upstream: Upstream, tmp_path, monkeypatch) -> None:
    copy = tmp_path / "data" / "transfer-learning-anime"  # laid out as CI's copy: <folder>/transfer-learning-anime/
    for name, data in FILES.items():
        local = copy / name.replace("raw (unrecognized)", "raw_unrecognized_by_lbpcascade")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
    monkeypatch.setenv("WAIFU_TEST_DATA", str(copy.parent))
    monkeypatch.setenv("WAIFU_TEST_DATA_URL", upstream.url)
    assert testdata.raw_image("a_chan/1.png") == copy / "raw" / "a_chan" / "1.png"
    unrecognized = "raw (unrecognized)/a_chan/1.png"
    assert testdata.data_file(unrecognized) == copy / "raw_unrecognized_by_lbpcascade" / "a_chan" / "1.png"
    assert upstream.paths == [] and not drawn_set.exists(), "nothing downloaded, nothing cached"

    (copy / "raw" / "b_chan" / "2.png").write_bytes(b"not the pinned file")
    with pytest.raises(ImagesUnavailable, match=r"2\.png fails its checksum: sha256 [0-9a-f]{64}, expected"):
        testdata.raw_image("b_chan/2.png")
    (copy / "raw" / "b_chan" / "10.jpg").unlink()
    with pytest.raises(ImagesUnavailable, match="WAIFU_TEST_DATA=.* is used instead of downloads.*10.jpg is missing"):
        testdata.raw_image("b_chan/10.jpg")
    assert upstream.paths == [], "a broken copy is reported, never papered over with a download"


def test_what_a_test_sees_without_images(tmp_path: Path) -> None:
    """The committed registry, no copy, no server: a test needing images fails with the one line alone, a test
    that needs none passes (nothing is fetched on import)."""
    (tmp_path / "test_inner.py").write_text(
        "from tests.support.testdata import raw_image\n\n"
        "def test_needs_images():\n    raw_image('nishikino_maki/1.png')\n\n"
        "def test_needs_none():\n    assert True\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "WAIFU_TEST_DATA"}
    env |= {"WAIFU_TEST_DATA_URL": closed_port_url(), "WAIFU_TEST_DATA_CACHE": str(tmp_path / "cache")}
    pytest_args = ["-q", "-p", "no:cacheprovider", "-p", "tests.conftest", "--rootdir", str(tmp_path)]
    command = [sys.executable, "-m", "pytest", *pytest_args, str(tmp_path / "test_inner.py")]
    run = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = run.stdout
    assert "1 failed, 1 passed" in out, out[-3000:]
    lines = [line for line in out.splitlines() if "real test images unavailable" in line]
    assert lines and lines[0].startswith("real test images unavailable: set WAIFU_TEST_DATA"), out[-3000:]
    assert "raw/nishikino_maki/1.png" in lines[0]
    assert "Traceback" not in out and "FileNotFoundError" not in out and "raise " not in out, out[-3000:]


def test_the_committed_registry_describes_the_pinned_set() -> None:
    names = list(testdata.registry())
    assert len(names) == 236 and all(c.startswith("sha256:") and len(c) == 71 for c in testdata.registry().values())
    tags = ["nishikino_maki", "sakurauchi_riko", "takimoto_hifumi"]
    raw = testdata.raw_names()
    assert [sum(f"/{t}/" in n for n in raw) for t in tags] == [36, 36, 35]  # takimoto_hifumi/19.jpg is absent
    assert raw[:3] == ["raw/nishikino_maki/1.png", "raw/nishikino_maki/2.jpg", "raw/nishikino_maki/3.png"]
    assert testdata.crop_counts() == (dict.fromkeys(tags, 30), dict.fromkeys(tags, 6))
    assert len(testdata.names_under("raw (unrecognized)")) == 21
