"""faces

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 22:52:19.147853
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "face",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("post_id", sa.BigInteger(), nullable=False),
        sa.Column("detector", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("x", sa.Integer(), nullable=False),
        sa.Column("y", sa.Integer(), nullable=False),
        sa.Column("w", sa.Integer(), nullable=False),
        sa.Column("h", sa.Integer(), nullable=False),
        sa.Column("crop_left", sa.Integer(), nullable=False),
        sa.Column("crop_top", sa.Integer(), nullable=False),
        sa.Column("crop_right", sa.Integer(), nullable=False),
        sa.Column("crop_bottom", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("phash", sa.String(length=16), nullable=True),
        sa.Column("duplicate_of", sa.Integer(), nullable=True),
        sa.Column("label", sa.String(length=255), nullable=True),
        sa.Column("label_source", sa.String(length=16), nullable=True),
        sa.Column("split", sa.String(length=8), nullable=True),
        sa.Column("suggestion", sa.String(length=255), nullable=True),
        sa.Column("suggestion_score", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["post_id"], ["post.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("face", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_face_label"), ["label"], unique=False)
        batch_op.create_index(batch_op.f("ix_face_phash"), ["phash"], unique=False)
        batch_op.create_index(batch_op.f("ix_face_post_id"), ["post_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_face_sha256"), ["sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_face_split"), ["split"], unique=False)
        batch_op.create_index(batch_op.f("ix_face_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_face_updated_at"), ["updated_at"], unique=False)

    with op.batch_alter_table("post", schema=None) as batch_op:
        batch_op.add_column(sa.Column("faces", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("post", schema=None) as batch_op:
        batch_op.drop_column("faces")

    with op.batch_alter_table("face", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_face_updated_at"))
        batch_op.drop_index(batch_op.f("ix_face_state"))
        batch_op.drop_index(batch_op.f("ix_face_split"))
        batch_op.drop_index(batch_op.f("ix_face_sha256"))
        batch_op.drop_index(batch_op.f("ix_face_post_id"))
        batch_op.drop_index(batch_op.f("ix_face_phash"))
        batch_op.drop_index(batch_op.f("ix_face_label"))

    op.drop_table("face")
