"""Tracked characters: add, list, remove (plain functions behind `waifu characters` and the web page).
A character is a tag on one site (core.sites); the same tag on two sites is tracked twice."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from core.settings import get_settings
from core.sites import DEFAULT_SITE
from db.engine import session_scope
from db.models import EXTRA_TERMS_CHARS, RATINGS_CHARS, TAG_CHARS, Character, PostCharacter, ScrapeCursor, pk


def normalize_tag(tag: str) -> str:
    """Booru tags are lower case with underscores for spaces."""
    return "_".join(tag.strip().lower().split())


def check_ratings(site: str, ratings: str) -> str:
    """The rating filter in the site's own words: a word the site does not use would filter out everything."""
    known = get_settings().site(site).ratings
    words = list(dict.fromkeys(r.strip().lower() for r in ratings.split(",") if r.strip()))  # each once
    unknown = [w for w in words if w not in known]
    if unknown:
        shown = ", ".join(repr(w[:40]) for w in unknown[:5])
        raise ValueError(f"{site} has no rating {shown}; its ratings: {', '.join(known)}")
    if len(",".join(words)) > RATINGS_CHARS:
        raise ValueError(f"ratings are at most {RATINGS_CHARS} characters")
    return ",".join(words)


def add_characters(
    tags: list[str], extra_terms: str = "", ratings: str = "", site: str = DEFAULT_SITE
) -> tuple[list[str], list[str]]:
    get_settings().site(site)  # an unknown site is refused before anything is written
    ratings = check_ratings(site, ratings)
    if len(extra_terms.strip()) > EXTRA_TERMS_CHARS:
        raise ValueError(f"extra search terms are at most {EXTRA_TERMS_CHARS} characters")
    added, updated = [], []
    with session_scope() as session:
        for raw in tags:
            tag = normalize_tag(raw)
            if not tag or any(c in tag for c in "*:"):
                raise ValueError(f"not a plain {site} tag: {raw!r}")
            if len(tag) > TAG_CHARS:
                raise ValueError(f"a tag is at most {TAG_CHARS} characters, not {len(tag)}: {raw[:40]!r}...")
            existing = session.exec(select(Character).where(Character.site == site, Character.tag == tag)).first()
            if existing is None:
                session.add(Character(site=site, tag=tag, extra_terms=extra_terms.strip(), ratings=ratings))
                added.append(tag)
            elif (extra_terms, ratings) != ("", ""):
                # re-adding with options updates them; a plain re-add changes nothing
                existing.extra_terms, existing.ratings = extra_terms.strip(), ratings
                updated.append(tag)
    return added, updated


def remove_characters(tags: list[str], site: str = DEFAULT_SITE) -> list[str]:
    """Stops tracking; posts, files and other characters' links stay."""
    removed = []
    with session_scope() as session:
        for raw in tags:
            tag = normalize_tag(raw)
            character = session.exec(select(Character).where(Character.site == site, Character.tag == tag)).first()
            if character is None:
                continue
            for link in session.exec(select(PostCharacter).where(PostCharacter.character_id == character.id)):
                session.delete(link)
            cursor = session.get(ScrapeCursor, (site, tag))
            if cursor is not None:
                session.delete(cursor)
            session.delete(character)
            removed.append(tag)
    return removed


def list_characters() -> list[dict[str, Any]]:
    with session_scope(readonly=True) as session:
        counts = dict(
            session.exec(
                select(PostCharacter.character_id, func.count()).group_by(col(PostCharacter.character_id))
            ).all()
        )
        rows = []
        for c in session.exec(select(Character).order_by(col(Character.site), col(Character.tag))).all():
            cursor = session.get(ScrapeCursor, (c.site, c.tag))
            rows.append(
                {
                    "site": c.site,
                    "tag": c.tag,
                    "extra_terms": c.extra_terms,
                    "ratings": c.ratings,
                    "posts": int(counts.get(pk(c), 0)),
                    "newest_id": cursor.newest_id if cursor else None,
                    "last_poll_at": cursor.last_poll_at.isoformat(timespec="seconds")
                    if cursor and cursor.last_poll_at
                    else None,
                }
            )
    return rows
