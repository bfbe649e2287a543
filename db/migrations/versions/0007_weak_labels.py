"""weak supervision: the margin of an inferred label, and the doubt about a tag label (train.weak)

The label source `inferred` needs no schema change: `face.label_source` is a plain String(16).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 13:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable columns without a default: a plain ALTER TABLE ADD COLUMN on both databases, no table copy
    op.add_column("face", sa.Column("inferred_margin", sa.Float(), nullable=True))
    op.add_column("face", sa.Column("doubt", sa.Text(), nullable=True))
    op.add_column("face", sa.Column("doubt_score", sa.Float(), nullable=True))
    op.create_index("ix_face_doubt_score", "face", ["doubt_score"], unique=False)


def downgrade() -> None:
    # an inferred label is only a guess: it goes back to what the rules say it was, ambiguous
    op.execute("UPDATE face SET label = NULL, label_source = 'ambiguous' WHERE label_source = 'inferred'")
    op.drop_index("ix_face_doubt_score", table_name="face")
    with op.batch_alter_table("face", schema=None) as batch_op:
        batch_op.drop_column("doubt_score")
        batch_op.drop_column("doubt")
        batch_op.drop_column("inferred_margin")
