"""Database layer on SQLite and PostgreSQL: migrations, characters, status, reconcile, retry-failed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import inspect
from sqlmodel import select

from core.settings import get_settings
from db.engine import get_engine, session_scope
from db.migrate import current_revision
from db.models import Character, Post, PostCharacter, PostState, utcnow
from scraper.characters import add_characters, list_characters, remove_characters
from tests.support.broker import queued_ids
from waifu.status import collect_status, reason_category
from worker import inflight
from worker.reconcile import reconcile_stuck, retry_failed


def make_post(
    post_id: int, state: PostState = PostState.discovered, reason: str | None = None, age: float = 0.0
) -> Post:
    return Post(
        id=post_id,
        md5=f"{post_id:032x}",
        file_url=f"https://safebooru.org//images/1/{post_id}.jpg",
        state=state,
        reason=reason,
        updated_at=utcnow() - timedelta(seconds=age),
    )


def test_migrations_create_every_table(service_env: dict[str, str]) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlmodel import SQLModel

    from db.migrate import alembic_config

    tables = set(inspect(get_engine()).get_table_names())
    assert set(SQLModel.metadata.tables) | {"alembic_version"} == tables
    assert current_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()
    # the migrations build exactly what the models describe: columns, types, nullability, indexes
    with get_engine().connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_characters_add_list_remove_keeps_posts(service_env: dict[str, str]) -> None:
    added, updated = add_characters(["Nishikino Maki", "sakurauchi_riko"], extra_terms="-animated")
    assert added == ["nishikino_maki", "sakurauchi_riko"] and updated == []
    assert add_characters(["nishikino_maki"]) == ([], [])  # a plain re-add changes nothing
    with pytest.raises(ValueError, match="not a plain safebooru tag"):
        add_characters(["id:>5"])

    with session_scope() as session:
        maki = session.exec(select(Character).where(Character.tag == "nishikino_maki")).one()
        session.add(make_post(1, PostState.downloaded))
        session.flush()
        session.add(PostCharacter(post_id=1, character_id=maki.id))

    rows = {r["tag"]: r for r in list_characters()}
    assert rows["nishikino_maki"]["posts"] == 1 and rows["nishikino_maki"]["extra_terms"] == "-animated"
    assert rows["sakurauchi_riko"]["posts"] == 0

    assert remove_characters(["nishikino_maki", "unknown_tag"]) == ["nishikino_maki"]
    assert [r["tag"] for r in list_characters()] == ["sakurauchi_riko"]
    with session_scope() as session:
        assert session.get(Post, 1) is not None, "removing a character must not delete its posts"
        assert session.exec(select(PostCharacter)).all() == []


def test_status_counts_states_and_groups_failure_reasons(service_env: dict[str, str], redis_client) -> None:
    add_characters(["nishikino_maki"])
    with session_scope() as session:
        session.add_all(
            [
                make_post(1, PostState.downloaded),
                make_post(2, PostState.failed, "md5 mismatch: API announced aaaa, file is bbbb"),
                make_post(3, PostState.failed, "md5 mismatch: API announced cccc, file is dddd"),
                make_post(4, PostState.failed, "HTTP 404 Not Found: file gone (post deleted after listing?)"),
                make_post(5, PostState.skipped, "duplicate of post 1 (same md5)"),
            ]
        )
    redis_client.rpush("io", b"x", b"y")
    status = collect_status(get_settings())
    assert status["posts"]["failed"] == 3 and status["posts"]["downloaded"] == 1 and status["total"] == 5
    assert status["failure_reasons"][0]["reason"] == "md5 mismatch"
    assert status["failure_reasons"][0]["count"] == 2
    assert status["queues"] == {"io": 2, "cpu": 0, "train": 0}
    assert status["characters"] == {"nishikino_maki": {}}


def test_reason_category_folds_numbers_and_hashes() -> None:
    assert reason_category("HTTP 503 Service Unavailable: retrying") == "HTTP N Service Unavailable"
    assert reason_category("duplicate of post 77 (same md5)") == "duplicate of post N (same md5)"


def test_reconcile_requeues_only_orphaned_stale_rows(service_env: dict[str, str], redis_client) -> None:
    with session_scope() as session:
        session.add_all(
            [
                make_post(10, age=3600),  # stale, no marker: its message was lost
                make_post(11, age=3600),  # stale, but its message is still in flight
                make_post(12, age=1),  # recent
                make_post(13, PostState.failed, age=3600),  # terminal
            ]
        )
    inflight.mark("download", [11])
    counts = reconcile_stuck(get_settings(), older_than=600)
    assert counts["discovered"] == 1 and counts["downloaded"] == 0
    assert queued_ids(redis_client) == [10]
    # the re-enqueued row is now marked and fresh: a second pass adds nothing
    assert reconcile_stuck(get_settings(), older_than=600)["discovered"] == 0
    assert queued_ids(redis_client) == [10]


def test_retry_failed_requeues_and_resets_attempts(service_env: dict[str, str], redis_client) -> None:
    with session_scope() as session:
        failed = make_post(20, PostState.failed, "gave up after 5 attempts: HTTP 503")
        failed.attempts = 5
        session.add_all([failed, make_post(21, PostState.downloaded)])
    assert retry_failed(get_settings()) == 1
    with session_scope() as session:
        row = session.get(Post, 20)
        assert row.state == PostState.discovered and row.attempts == 0
        assert "gave up after 5 attempts" in row.reason
    assert queued_ids(redis_client) == [20]
