"""scrape cursor: whether a tag's walk back reached its oldest post (the deeper backfill of small characters)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 23:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # cursors from before do not know: false, so a small character's next poll may walk on back (and learn)
    op.add_column("scrape_cursor", sa.Column("history_done", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("scrape_cursor", schema=None) as batch_op:
        batch_op.drop_column("history_done")
