"""self-training loop: per model version, inferred labels trained on and changed after it, and its round

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 19:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # versions from before the loop do not know: NULL; their round is 0 (none was a follow-up)
    op.add_column("model_version", sa.Column("inferred_trained", sa.Integer(), nullable=True))
    op.add_column("model_version", sa.Column("inferred_changed", sa.Integer(), nullable=True))
    op.add_column("model_version", sa.Column("loop_round", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_column("loop_round")
        batch_op.drop_column("inferred_changed")
        batch_op.drop_column("inferred_trained")
