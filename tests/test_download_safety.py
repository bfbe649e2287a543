"""Downloads after the allow-list: the address a name resolves to (security review row 17), the connection
made to the very address that was checked (DNS rebinding), no https -> http redirect, and an overall
deadline (review row 11: each read had a timeout, the whole download none). Real HTTP against the fake
site, real Redis limiter, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from core.errors import Refused
from core.settings import Settings, get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Post, PostState
from download.fetch import address_refusal, check_redirect, deadline_for, pinned, resolve
from download.step import download_post
from tests.support.fake_safebooru import FakePost, FakeSafebooru, load_drawn


class DrippingFake(FakeSafebooru):
    """The fake plus a "drip" file fault: every request's body comes one byte at a time, each byte well
    inside the HTTP timeout, so no single read ever times out."""

    drip_every: float = 0.3

    async def _file(self, request: web.Request) -> web.StreamResponse:
        post = next((p for p in self.posts.values() if p.image == request.match_info["name"]), None)
        if post is None or post.fault != "drip":
            return await super()._file(request)
        self._record(request)
        self.file_hits[post.id] = self.file_hits.get(post.id, 0) + 1
        response = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": str(len(post.data))})
        await response.prepare(request)
        for byte in post.data:
            await response.write(bytes([byte]))
            await asyncio.sleep(self.drip_every)
        await response.write_eof()
        return response


@pytest.fixture
async def fake() -> DrippingFake:
    """Overrides conftest's fake for this module with the subclass above."""
    site = DrippingFake()
    await site.start()
    yield site
    await site.stop()


def configure(monkeypatch: pytest.MonkeyPatch, **values: str) -> Settings:
    for key, value in values.items():
        monkeypatch.setenv(f"WAIFU_{key.upper()}", value)
    monkeypatch.setenv("WAIFU_DOWNLOAD_RETRIES", "2")
    monkeypatch.setenv("WAIFU_DOWNLOAD_BACKOFF_S", "0.01")
    reset_settings_cache()
    return get_settings()


def list_post(fake: FakeSafebooru, post: FakePost, host: str | None = None) -> int:
    """The row the scraper would have made from the fake's listing; `host` replaces the URL's host."""
    api = fake._json(post)
    url = api["file_url"] if host is None else api["file_url"].replace("127.0.0.1", host, 1)
    with session_scope() as session:
        session.add(Post(id=post.id, md5=api["hash"], file_url=url, image=api["image"], tags=post.tags))
    return post.id


async def run_download(post_id: int, settings: Settings) -> Post:
    for _ in range(10):  # as the task does: again while the step asks for a retry
        outcome = await asyncio.to_thread(download_post, post_id, settings)
        if outcome.retry_in is None:
            break
    with session_scope() as session:
        return session.get(Post, post_id)


# ------------------------------------------------------------------------------ deadline ----
async def test_a_byte_drip_is_cut_at_the_deadline_and_fails_the_row_after_the_retries(
    service_env, fake: DrippingFake, monkeypatch
) -> None:
    """20 bytes, one every 0.3 s: every read is inside the 1 s timeout, the whole takes 6 s. The deadline
    is 1 s + 20 bytes / 20 B/s = 2 s: each attempt is cut there, and after the retries the row fails."""
    good = load_drawn(fake, {"maki": 1}, size=(64, 64))[0]
    post = fake.add(FakePost(id=fake.next_id(), tags="maki", data=b"\x89PNG" + bytes(16), image="drip.png"))
    post.fault = "drip"
    settings = configure(monkeypatch, default_site_url=fake.base_url, http_timeout_s="1", download_min_rate="20")
    assert deadline_for(settings, 0.0, 20) == 2.0
    row = await run_download(list_post(fake, post), settings)
    assert row.state == PostState.failed, row.reason
    assert row.reason.startswith("gave up after 3 attempts: download too slow: "), row.reason
    assert "over its deadline of 2 s" in row.reason and "WAIFU_DOWNLOAD_MIN_RATE" in row.reason
    assert fake.file_hits[post.id] == 3
    assert list(settings.images_dir.rglob(".download-*")) == []
    assert (await run_download(list_post(fake, good), settings)).state == PostState.downloaded


def test_the_deadline_follows_the_announced_size_and_the_cap() -> None:
    settings = Settings(_env_file=None, http_timeout_s=30, download_min_rate=65536, max_download_bytes=50 * 2**20)
    assert deadline_for(settings, 100.0, 2 * 2**20) == 100 + 30 + 32  # 2 MiB at 64 KiB/s
    assert deadline_for(settings, 100.0, None) == 100 + 30 + 800  # nothing announced: the cap
    assert deadline_for(settings, 100.0, 10**12) == 100 + 30 + 800  # a lie over the cap changes nothing


# ------------------------------------------------------------------------------ addresses ----
@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),  # IPv4-mapped
        ("10.1.2.3", "a private address"),
        ("192.168.0.10", "a private address"),
        ("172.16.5.4", "a private address"),
        ("169.254.169.254", "a link-local address"),  # cloud metadata
        ("fe80::1%eth0", "a link-local address"),
        ("fc00::5", "a private address"),
        ("0.0.0.0", "an unspecified address"),
        ("100.64.0.1", "not a global address"),  # carrier-grade NAT
        ("224.0.0.1", "a multicast address"),
        ("93.184.216.34", None),
        ("2606:2800:220:1:248:1893:25c8:1946", None),
    ],
)
def test_only_global_addresses_are_fetched_from(address: str, why: str | None) -> None:
    assert address_refusal(address) == why


def test_an_allowed_name_that_resolves_to_loopback_is_refused_unless_local_on_purpose() -> None:
    with pytest.raises(Refused, match=r"host 'localhost' resolves to (127\.0\.0\.1|::1), a loopback address"):
        resolve("localhost", 80, frozenset({"127.0.0.1"}))
    assert resolve("localhost", 80, frozenset({"localhost"})) in ("127.0.0.1", "::1")
    # an address written in the configuration is taken as written (the fake site; no name to rebind)
    assert resolve("127.0.0.2", 80, frozenset()) == "127.0.0.2"
    assert resolve("10.1.2.3", 80, frozenset()) == "10.1.2.3"


async def test_a_download_from_a_name_at_a_loopback_address_fails_the_row(
    service_env, fake: DrippingFake, monkeypatch
) -> None:
    """`localhost` is on the allow-list (the site's URL) but not in WAIFU_LOCAL_HOSTS: nothing is fetched."""
    port = fake.base_url.rsplit(":", 1)[1]
    settings = configure(monkeypatch, default_site_url=f"http://localhost:{port}", local_hosts="some.mirror.lan")
    post = load_drawn(fake, {"maki": 1}, size=(64, 64))[0]
    row = await run_download(list_post(fake, post, host="localhost"), settings)
    assert row.state == PostState.failed and row.attempts == 1
    assert "host 'localhost' resolves to" in row.reason and "a loopback address: refused" in row.reason
    assert fake.file_requests() == []
    # the same, configured as local on purpose (the default WAIFU_LOCAL_HOSTS names localhost): fetched
    settings = configure(monkeypatch, local_hosts="localhost")
    other = load_drawn(fake, {"maki": 1}, size=(64, 48), first_id=9000)[0]
    assert (await run_download(list_post(fake, other, host="localhost"), settings)).state == PostState.downloaded


async def test_the_connection_goes_to_the_address_that_was_checked(
    service_env, fake: DrippingFake, monkeypatch
) -> None:
    """DNS rebinding: a name answers one address to the check and another one to the connection. Our
    lookup is the only one: its answer is where the request goes."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            lookups.append(host)
            # first answer: the fake site; any later one: an address where nothing answers
            return real("127.0.0.1" if len(lookups) == 1 else "10.255.255.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    port = fake.base_url.rsplit(":", 1)[1]
    settings = configure(
        monkeypatch, default_site_url=f"http://rebind.test:{port}", local_hosts="rebind.test", http_timeout_s="2"
    )
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    post = load_drawn(fake, {"maki": 1}, size=(64, 64))[0]
    row = await run_download(list_post(fake, post, host="rebind.test"), settings)
    assert row.state == PostState.downloaded, row.reason
    assert lookups == ["rebind.test"], "the name was looked up again after the check"
    assert len(fake.file_requests()) == 1


def test_pinned_urls_keep_the_name_for_host_and_tls() -> None:
    url, headers, extensions = pinned("https://img.safebooru.org/images/1/a.png?x=1", "93.184.216.34")
    assert url == "https://93.184.216.34/images/1/a.png?x=1"
    assert headers == {"Host": "img.safebooru.org"} and extensions == {"sni_hostname": "img.safebooru.org"}
    url, headers, extensions = pinned("http://[::1]:8080/a.png", "::1")
    assert url == "http://[::1]:8080/a.png" and headers == {"Host": "[::1]:8080"} and extensions == {}


def test_redirects_never_go_from_https_to_http() -> None:
    allowed = frozenset({"safebooru.org", "img.safebooru.org"})
    check_redirect("https://safebooru.org/a.png", "https://img.safebooru.org/a.png", allowed)
    check_redirect("http://safebooru.org/a.png", "https://img.safebooru.org/a.png", allowed)  # an upgrade is fine
    with pytest.raises(Refused, match="redirect from https to http refused"):
        check_redirect("https://safebooru.org/a.png", "http://img.safebooru.org/a.png", allowed)
    with pytest.raises(Refused, match="redirect to disallowed host 'evil.example' refused"):
        check_redirect("https://safebooru.org/a.png", "https://evil.example/a.png", allowed)
