"""Migrations keep every existing row: a database filled at the revision before sites, upgraded, on SQLite and
PostgreSQL (and the models match what the migrations build: tests/test_db.py)."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlmodel import select

from core.settings import reset_settings_cache
from db.engine import engine_for, session_scope
from db.migrate import current_revision, upgrade
from db.models import Character, Face, Post, PostCharacter, PostState, ScrapeCursor

BEFORE_SITES = "0005"
NOW = "2026-11-01 10:00:00"


def fill_before_sites(url: str) -> None:
    """What a collection looked like before sites: safebooru ids as post ids, faces and links pointing at them."""
    with engine_for(url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO character (tag, extra_terms, ratings, created_at) VALUES "
                "('nishikino_maki', '-comic', '', :now), ('sakurauchi_riko', '', 'general', :now)"
            ),
            {"now": NOW},
        )
        maki, riko = (
            conn.execute(text("SELECT id FROM character WHERE tag = :t"), {"t": t}).scalar_one()
            for t in ("nishikino_maki", "sakurauchi_riko")
        )
        for post_id, state in ((5000123, "done"), (5000124, "failed"), (4999999, "discovered")):
            conn.execute(
                text(
                    "INSERT INTO post (id, md5, file_url, image, directory, rating, tags, source, state, attempts, "
                    "created_at, updated_at) VALUES (:id, :md5, 'https://safebooru.org//images/1/x.jpg', 'x.jpg', '1', "
                    "'general', 'nishikino_maki 1girl', '', :state, 1, :now, :now)"
                ),
                {"id": post_id, "md5": f"{post_id:032x}", "state": state, "now": NOW},
            )
        conn.execute(
            text("INSERT INTO post_character (post_id, character_id) VALUES (5000123, :maki), (5000124, :riko)"),
            {"maki": maki, "riko": riko},
        )
        conn.execute(
            text(
                "INSERT INTO face (post_id, detector, x, y, w, h, crop_left, crop_top, crop_right, crop_bottom, state, "
                "label, label_source, split, created_at, updated_at) VALUES (5000123, 'animeface', 1, 2, 30, 30, 0, 0, "
                "40, 40, 'ready', 'nishikino_maki', 'tag', 'train', :now, :now)"
            ),
            {"now": NOW},
        )
        conn.execute(
            text(
                "INSERT INTO scrape_cursor (tag, newest_id, oldest_id, backfill_done, requests) VALUES "
                "('nishikino_maki', 5000124, 4999999, :done, 7)"
            ),
            {"done": True},
        )


@pytest.fixture
def old_database(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> str:
    monkeypatch.setenv("WAIFU_DATABASE_URL", db_url)
    monkeypatch.setenv("WAIFU_DATA_DIR", str(tmp_path / "data"))
    reset_settings_cache()
    upgrade(db_url, BEFORE_SITES)
    assert current_revision(db_url) == BEFORE_SITES
    fill_before_sites(db_url)
    yield db_url
    reset_settings_cache()


def test_sites_migration_keeps_every_row_and_numbers_new_posts_after_them(old_database: str) -> None:
    upgrade(old_database)
    with session_scope() as session:
        posts = {p.id: p for p in session.exec(select(Post)).all()}
        assert sorted(posts) == [4999999, 5000123, 5000124], "every post kept, under its old id"
        assert all(p.site == "safebooru" and p.remote_id == p.id for p in posts.values())
        assert posts[5000124].state == PostState.failed and posts[5000123].attempts == 1
        face = session.exec(select(Face)).one()
        assert face.post_id == 5000123 and face.label == "nishikino_maki", "faces still point at their post"
        characters = {c.tag: c for c in session.exec(select(Character)).all()}
        links = {(link.post_id, link.character_id) for link in session.exec(select(PostCharacter)).all()}
        assert links == {(5000123, characters["nishikino_maki"].id), (5000124, characters["sakurauchi_riko"].id)}
        assert {(c.site, c.extra_terms) for c in characters.values()} == {("safebooru", "-comic"), ("safebooru", "")}
        cursor = session.exec(select(ScrapeCursor)).one()
        assert (cursor.site, cursor.tag, cursor.newest_id, cursor.requests) == (
            "safebooru",
            "nishikino_maki",
            5000124,
            7,
        )

        # after the upgrade: the database numbers new posts, after every old id; the same remote id may come
        # from another site, never twice from one
        fresh = Post(site="gelbooru", remote_id=5000123, md5="f" * 32, file_url="https://gelbooru.com/x.jpg")
        session.add(fresh)
        session.add(Character(site="gelbooru", tag="nishikino_maki"))
        session.flush()
        assert fresh.id > 5000124
    with pytest.raises(Exception, match="(?i)unique"), session_scope() as session:
        session.add(Post(site="gelbooru", remote_id=5000123, md5="e" * 32, file_url="https://gelbooru.com/y.jpg"))


def test_sites_migration_goes_back_with_the_safebooru_rows(old_database: str) -> None:
    upgrade(old_database)
    with session_scope() as session:
        session.add(Post(site="gelbooru", remote_id=1, md5="f" * 32, file_url="https://gelbooru.com/x.jpg"))
    from alembic import command

    from db.migrate import alembic_config

    command.downgrade(alembic_config(old_database), BEFORE_SITES)
    with engine_for(old_database).connect() as conn:
        ids = sorted(row[0] for row in conn.execute(text("SELECT id FROM post")))
        faces = conn.execute(text("SELECT post_id FROM face")).all()
    assert ids == [4999999, 5000123, 5000124] and faces == [(5000123,)]


BEFORE_WEAK_LABELS = "0006"


def test_weak_labels_migration_adds_the_columns_and_goes_back_with_inferred_labels_ambiguous(
    db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from alembic import command

    from db.migrate import alembic_config

    monkeypatch.setenv("WAIFU_DATABASE_URL", db_url)
    monkeypatch.setenv("WAIFU_DATA_DIR", str(tmp_path / "data"))
    reset_settings_cache()
    upgrade(db_url, BEFORE_WEAK_LABELS)
    with engine_for(db_url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO post (id, site, remote_id, md5, file_url, image, directory, rating, tags, "
                "source, state, attempts, created_at, updated_at) VALUES (7, 'safebooru', 7, :md5, "
                "'https://safebooru.org//images/1/x.jpg', 'x.jpg', '1', 'general', 'nishikino_maki', '', "
                "'done', 1, :now, :now)"
            ),
            {"md5": "7" * 32, "now": NOW},
        )
        for label, source in (("nishikino_maki", "tag"), (None, "ambiguous")):
            conn.execute(
                text(
                    "INSERT INTO face (post_id, detector, x, y, w, h, crop_left, crop_top, crop_right, crop_bottom, "
                    "state, label, label_source, split, created_at, updated_at) "
                    "VALUES (7, 'animeface', 1, 2, 30, 30, 0, 0, 40, 40, 'ready', :label, :source, 'train', :now, :now)"
                ),
                {"label": label, "source": source, "now": NOW},
            )
    upgrade(db_url)
    with session_scope() as session:
        tagged, other = session.exec(select(Face).order_by(Face.id)).all()
        assert (tagged.label, tagged.label_source, tagged.doubt, tagged.doubt_score) == (
            "nishikino_maki",
            "tag",
            None,
            None,
        )
        assert other.inferred_margin is None
        tagged.doubt, tagged.doubt_score = "a model trained without this face calls it sakurauchi_riko", 0.93
        other.label, other.label_source, other.inferred_margin = "nishikino_maki", "inferred", 0.7
    command.downgrade(alembic_config(db_url), BEFORE_WEAK_LABELS)
    with engine_for(db_url).connect() as conn:
        rows = conn.execute(text("SELECT label, label_source FROM face ORDER BY id")).all()
        columns = {
            c
            for (c,) in conn.execute(
                text(
                    "SELECT name FROM pragma_table_info('face')"
                    if db_url.startswith("sqlite")
                    else "SELECT column_name FROM information_schema.columns WHERE table_name = 'face'"
                )
            )
        }
    assert rows == [("nishikino_maki", "tag"), (None, "ambiguous")], "an inferred label was only a guess"
    assert not {"doubt", "doubt_score", "inferred_margin"} & columns and "suggestion" in columns
    upgrade(db_url)
    assert current_revision(db_url) != BEFORE_WEAK_LABELS
    reset_settings_cache()
