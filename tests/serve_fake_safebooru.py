"""The fake safebooru on its own, for trying `make run` or the README's quick start without the internet:

    .venv/bin/python -m tests.serve_fake_safebooru --port 18765
    WAIFU_DEFAULT_SITE_URL=http://127.0.0.1:18765 make run CHARACTERS="nishikino_maki sakurauchi_riko"

It serves the real test illustrations (tests/support/testdata.py: the copy WAIFU_TEST_DATA names, the
download cache, or a fetch of the pinned set), 107 posts of three characters with faces to find; when they
cannot be had it says so and serves pictures drawn with Pillow instead (no faces in them). `--illustrations`
insists on the real ones; `--drawn TAG=N,...` asks for drawn ones. In a container (the compose test,
deploy/compose-test.override.yml): `--host 0.0.0.0 --public-url http://fake-safebooru:18765`, so the posts'
file URLs name the host the workers reach.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from tests.support.fake_safebooru import FakePost, FakeSafebooru, load_drawn, load_illustrations
from tests.support.testdata import ImagesUnavailable

DEFAULT_DRAWN = "nishikino_maki=5,sakurauchi_riko=5,takimoto_hifumi=5"


def parse_counts(text: str) -> dict[str, int]:
    counts = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        tag, _, n = item.partition("=")
        counts[tag] = int(n or 3)
    return counts


def load_posts(site: FakeSafebooru, drawn: dict[str, int] | None, illustrations: bool) -> list[FakePost]:
    """The real illustrations unless drawn pictures are asked for; drawn ones, with a note, when the real
    ones cannot be had (unless `illustrations` insists on them)."""
    if drawn is not None:
        return load_drawn(site, drawn)
    try:
        return load_illustrations(site)
    except ImagesUnavailable as exc:
        if illustrations:
            raise
        print(
            f"{exc}\nserving pictures drawn with Pillow instead: they hold no face, so `make run` will show "
            "posts done and 0 faces",
            flush=True,
        )
        return load_drawn(site, parse_counts(DEFAULT_DRAWN))


async def serve(
    port: int, drawn: dict[str, int] | None, illustrations: bool, host: str = "127.0.0.1", public_url: str = ""
) -> None:
    site = FakeSafebooru()
    posts = load_posts(site, drawn, illustrations)
    url = await site.start(host=host, port=port)
    if public_url:  # file_url names the host clients reach, not the address listened on (0.0.0.0)
        site.base_url = url = public_url.rstrip("/")
    tags = sorted({p.tags.split()[1] for p in posts})
    print(f"fake safebooru at {url}: {len(posts)} posts of {' '.join(tags)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
    await site.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument(
        "--public-url", default="", help="base URL clients reach it at, e.g. http://fake-safebooru:18765"
    )
    parser.add_argument(
        "--drawn",
        default=None,
        help=f"TAG=N,...: N pictures drawn with Pillow per tag instead of the real ones, e.g. {DEFAULT_DRAWN}",
    )
    parser.add_argument(
        "--illustrations", action="store_true", help="the real test illustrations or nothing (no drawn fallback)"
    )
    args = parser.parse_args()
    drawn = parse_counts(args.drawn) if args.drawn is not None else None
    asyncio.run(serve(args.port, drawn, args.illustrations, args.host, args.public_url))


if __name__ == "__main__":
    main()
