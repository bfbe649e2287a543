"""The collection page: what `waifu status` knows (waifu.status.collect_status; stalled steps on top), the
growth of the faces per character as a picture (train.charts.growth_png), and the tracked characters."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.sites import DEFAULT_SITE, KNOWN_SITES
from db.models import TAG_CHARS
from scraper.characters import add_characters, list_characters, remove_characters
from waifu.status import collect_status
from waifu.web.pictures import growth_chart
from waifu.web.rendering import done, refuse, render, same_site_only

MAX_TAGS_TEXT = 2000


async def collection(request: Request) -> Response:
    settings = request.app.state.settings
    status = await run_in_threadpool(collect_status, settings)
    characters = await run_in_threadpool(list_characters)
    return render(
        request,
        "collection.html",
        status=status,
        characters=characters,
        sites=list(KNOWN_SITES),
        default_site=DEFAULT_SITE,
    )


def growth(request: Request) -> Response:
    same_site_only(request)
    try:
        data = growth_chart(request.app.state.settings)
    except ImportError as exc:  # matplotlib comes with the `train` extra
        raise refuse(501, f"the chart needs matplotlib (pip install 'waifu[train]'): {exc}") from exc
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


async def add(request: Request) -> Response:
    form = await request.form()
    text = str(form.get("tags") or "")
    # not cut to the columns' lengths: add_characters refuses what does not fit, saying why
    extra, ratings = str(form.get("extra") or ""), str(form.get("ratings") or "")
    site = str(form.get("site") or DEFAULT_SITE)
    tags = text.replace(",", " ").split()
    if not tags or len(text) > MAX_TAGS_TEXT:
        raise refuse(400, "name one or more tags to track, e.g. nishikino_maki")
    try:
        added, updated = await run_in_threadpool(add_characters, tags, extra, ratings, site)
    except ValueError as exc:
        raise refuse(400, str(exc)) from exc
    parts = [f"added {', '.join(added)}"] if added else []
    parts += [f"updated {', '.join(updated)}"] if updated else []
    return done(request, "; ".join(parts) or f"already tracked: {', '.join(tags)}", "/collection")


async def remove(request: Request) -> Response:
    form = await request.form()
    tag = str(form.get("tag") or "").strip()
    site = str(form.get("site") or DEFAULT_SITE)
    if not tag or len(tag) > TAG_CHARS:
        raise refuse(400, "name the tag to stop tracking")
    if site not in KNOWN_SITES:
        raise refuse(400, f"unknown site {site[:40]!r}; known: {', '.join(sorted(KNOWN_SITES))}")  # as Settings.site
    removed = await run_in_threadpool(remove_characters, [tag], site)
    if not removed:
        raise refuse(404, f"{tag[:100]!r} is not tracked on {site}: nothing to stop")
    return done(request, f"stopped tracking {tag} (its posts and faces stay)", "/collection")


def routes() -> list[Route]:
    return [
        Route("/collection", collection, methods=["GET"]),
        Route("/collection/growth.png", growth, methods=["GET"]),
        Route("/collection/characters", add, methods=["POST"]),
        Route("/collection/characters/remove", remove, methods=["POST"]),
    ]
