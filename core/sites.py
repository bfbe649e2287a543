"""The Gelbooru-0.2 sites we know: one API, one client, a table of instances (as gallery-dl does).

To add a site: add a `Site` here (its API URL, the hosts its files come from, how many posts a page may
hold, whether it wants `api_key`/`user_id`, its rating words). Settings can point a known site at another
URL or give it credentials (`WAIFU_SITES`), and `WAIFU_DEFAULT_SITE_URL` moves the default site.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

DEFAULT_SITE = "safebooru"


@dataclass(frozen=True)
class Site:
    name: str
    url: str  # base URL; the API is `{url}/index.php?page=dapi&s=post&q=index`
    file_hosts: frozenset[str]  # hosts its files are served from (the download allow-list)
    max_page: int  # posts one API request may return
    needs_credentials: bool  # the API refuses anonymous requests without api_key and user_id
    ratings: tuple[str, ...]  # the site's own rating words (characters' rating filters use them)
    # credentials: never in repr() (a Site is logged and shown in tracebacks)
    api_key: str | None = field(default=None, repr=False)
    user_id: str | None = field(default=None, repr=False)

    @property
    def api_host(self) -> str:
        return (urlsplit(self.url).hostname or "").lower()

    @property
    def hosts(self) -> frozenset[str]:
        """Every host a request for this site may reach: its API host and its file hosts."""
        return frozenset({self.api_host, *self.file_hosts} - {""})

    def post_url(self, remote_id: int) -> str:
        """The post's page on the site, for a person."""
        return f"{self.url}/index.php?page=post&s=view&id={remote_id}"


KNOWN_SITES: dict[str, Site] = {
    site.name: site
    for site in (
        Site(
            "safebooru",
            "https://safebooru.org",
            frozenset({"safebooru.org", "www.safebooru.org", "img.safebooru.org"}),
            max_page=100,
            needs_credentials=False,
            ratings=("general", "safe", "questionable", "explicit"),
        ),
        Site(
            "gelbooru",
            "https://gelbooru.com",
            frozenset(
                {
                    "gelbooru.com",
                    "img1.gelbooru.com",
                    "img2.gelbooru.com",
                    "img3.gelbooru.com",
                    "img4.gelbooru.com",
                    "video-cdn3.gelbooru.com",
                }
            ),
            max_page=100,
            needs_credentials=True,
            ratings=("general", "sensitive", "questionable", "explicit"),
        ),
    )
}


def configured(site: Site, url: str | None = None, api_key: str | None = None, user_id: str | None = None) -> Site:
    """The site with a settings override applied: another URL (its host joins the allow-list; the known
    file hosts stay only while the URL is the real one) and credentials."""
    if url and url.rstrip("/") != site.url:
        site = replace(site, url=url.rstrip("/"), file_hosts=frozenset({(urlsplit(url).hostname or "").lower()}))
    if api_key:
        site = replace(site, api_key=api_key)
    if user_id:
        site = replace(site, user_id=user_id)
    return site
