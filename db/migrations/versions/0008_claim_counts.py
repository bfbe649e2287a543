"""claim counts: deliveries of a step a row claimed with no outcome yet (db.claims, WAIFU_MAX_ATTEMPTS)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 15:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NOT NULL with a server default: existing rows start at 0; a plain ADD COLUMN on SQLite and PostgreSQL
    for table in ("post", "face"):
        op.add_column(table, sa.Column("claims", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    for table in ("post", "face"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("claims")
