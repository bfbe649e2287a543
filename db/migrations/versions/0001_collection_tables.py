"""collection tables

Revision ID: 0001
Revises:
Create Date: 2026-11-24 22:16:56.603265
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "character",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(length=255), nullable=False),
        sa.Column("extra_terms", sa.String(length=500), nullable=False),
        sa.Column("ratings", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("character", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_character_tag"), ["tag"], unique=True)

    op.create_table(
        "post",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("md5", sa.String(length=32), nullable=False),
        sa.Column("file_url", sa.Text(), nullable=False),
        sa.Column("image", sa.Text(), nullable=False),
        sa.Column("directory", sa.String(length=255), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("rating", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("change", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("duplicate_of", sa.BigInteger(), nullable=True),
        sa.Column("file_size", sa.BigInteger(), nullable=True),
        sa.Column("stored_path", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("post", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_post_md5"), ["md5"], unique=False)
        batch_op.create_index(batch_op.f("ix_post_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_post_updated_at"), ["updated_at"], unique=False)

    op.create_table(
        "scrape_cursor",
        sa.Column("tag", sa.String(length=255), nullable=False),
        sa.Column("newest_id", sa.BigInteger(), nullable=True),
        sa.Column("oldest_id", sa.BigInteger(), nullable=True),
        sa.Column("backfill_done", sa.Boolean(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("last_poll_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("tag"),
    )
    op.create_table(
        "post_character",
        sa.Column("post_id", sa.BigInteger(), nullable=False),
        sa.Column("character_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["character_id"], ["character.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["post_id"], ["post.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("post_id", "character_id"),
    )


def downgrade() -> None:
    op.drop_table("post_character")
    op.drop_table("scrape_cursor")
    with op.batch_alter_table("post", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_post_updated_at"))
        batch_op.drop_index(batch_op.f("ix_post_state"))
        batch_op.drop_index(batch_op.f("ix_post_md5"))

    op.drop_table("post")
    with op.batch_alter_table("character", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_character_tag"))

    op.drop_table("character")
