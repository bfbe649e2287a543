"""row claims (who works on a row, until when) and the perceptual-hash band index

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _bands(phash: str) -> list[tuple[int, int]]:
    value = int(phash, 16)
    return [(band, (value >> (8 * band)) & 0xFF) for band in range(8)]


def upgrade() -> None:
    for table in ("post", "face"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("claim_token", sa.String(length=64), nullable=True))
            batch_op.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "face_hash_band",
        sa.Column("band", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("value", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("face_id", sa.Integer(), nullable=False),
        sa.Column("phash", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(["face_id"], ["face.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("band", "value", "face_id"),
        sqlite_with_rowid=False,  # a band's range scan reads each phash in place
    )
    with op.batch_alter_table("face_hash_band", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_face_hash_band_face_id"), ["face_id"], unique=False)
    # faces that are ready already get their bands, so the first lookup after the upgrade sees them
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, phash FROM face WHERE state = 'ready' AND phash IS NOT NULL")).all()
    bands = [
        {"band": b, "value": v, "face_id": face_id, "phash": phash} for face_id, phash in rows for b, v in _bands(phash)
    ]
    if bands:
        conn.execute(
            sa.text(
                "INSERT INTO face_hash_band (band, value, face_id, phash) VALUES (:band, :value, :face_id, :phash)"
            ),
            bands,
        )


def downgrade() -> None:
    with op.batch_alter_table("face_hash_band", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_face_hash_band_face_id"))
    op.drop_table("face_hash_band")
    for table in ("face", "post"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("claimed_until")
            batch_op.drop_column("claim_token")
