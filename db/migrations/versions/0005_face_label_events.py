"""face label events (undo of manual cleaning) and the indexes of the web page's faces grid

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# the faces grid filters by label source or by character (label or suggestion) or by probability, and
# pages by id: each filter finds its page through an index instead of reading every face
FACE_INDEXES = {
    "ix_face_source_state_id": ["label_source", "state", "id"],
    "ix_face_suggestion": ["suggestion"],
    "ix_face_suggestion_score": ["suggestion_score"],
}


def upgrade() -> None:
    op.create_table(
        "face_label_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("face_id", sa.Integer(), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("before_state", sa.String(length=16), nullable=False),
        sa.Column("before_label", sa.String(length=255), nullable=True),
        sa.Column("before_source", sa.String(length=16), nullable=True),
        sa.Column("after_state", sa.String(length=16), nullable=False),
        sa.Column("after_label", sa.String(length=255), nullable=True),
        sa.Column("after_source", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["face_id"], ["face.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("face_label_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_face_label_event_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_face_label_event_face_id"), ["face_id"], unique=False)
    for name, columns in FACE_INDEXES.items():  # plain CREATE INDEX: the face table is never copied
        op.create_index(name, "face", columns, unique=False)


def downgrade() -> None:
    for name in FACE_INDEXES:
        op.drop_index(name, table_name="face")
    with op.batch_alter_table("face_label_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_face_label_event_face_id"))
        batch_op.drop_index(batch_op.f("ix_face_label_event_action"))
    op.drop_table("face_label_event")
