"""`waifu characters add | list | remove`: the tracked characters (a site's tags)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from waifu.cli.base import characters_app, console, ensure_db, exits_on

SITE_OPTION = typer.Option(help="Gelbooru-0.2 site the tags belong to (see core/sites.py)")


@characters_app.command("add")
def characters_add(
    tags: Annotated[list[str], typer.Argument(help="character tags of the site, e.g. nishikino_maki")],
    extra: Annotated[str, typer.Option(help="Extra search terms, e.g. '-animated -comic'")] = "",
    ratings: Annotated[
        str, typer.Option(help="Ratings to keep, comma separated, in the site's words (default: all)")
    ] = "",
    site: Annotated[str, SITE_OPTION] = "safebooru",
) -> None:
    """Track characters; the next poll starts collecting them."""
    from scraper.characters import add_characters

    ensure_db()
    # an unknown site, a rating word the site does not use, a tag that is a query: a usage error
    with exits_on(ValueError, code=2):
        added, updated = add_characters(tags, extra_terms=extra, ratings=ratings, site=site)
    for tag in added:
        console.print(f"[green]added[/green] {tag} ({site})")
    for tag in updated:
        console.print(f"[yellow]updated[/yellow] {tag} ({site})")


@characters_app.command("list")
def characters_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List tracked characters with their post counts."""
    from scraper.characters import list_characters

    ensure_db()
    rows = list_characters()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="tracked characters")
    for column in ("site", "tag", "extra terms", "ratings", "posts", "newest id", "last poll"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["site"],
            r["tag"],
            r["extra_terms"],
            r["ratings"] or "all",
            str(r["posts"]),
            str(r["newest_id"] or "-"),
            r["last_poll_at"] or "never",
        )
    console.print(table)


@characters_app.command("remove")
def characters_remove(
    tags: Annotated[list[str], typer.Argument(help="tags to stop tracking")],
    site: Annotated[str, SITE_OPTION] = "safebooru",
) -> None:
    """Stop tracking characters (their posts and files stay)."""
    from scraper.characters import normalize_tag, remove_characters

    ensure_db()
    removed = remove_characters(tags, site=site)
    for tag in tags:
        console.print(f"[red]removed[/red] {tag}" if normalize_tag(tag) in removed else f"not tracked: {tag}")
    if not removed:
        raise typer.Exit(1)
