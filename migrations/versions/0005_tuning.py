"""tuning_knobs (live knob values and their last move), tuning_actions (the audit trail), device busy time

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tuning_knobs",
        sa.Column("name", sa.String(300), primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("last_direction", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_moved_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "tuning_actions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("knob", sa.String(300), nullable=False),
        sa.Column("before", sa.Float),
        sa.Column("after", sa.Float),
        sa.Column("symptom", sa.String(64), nullable=False),
        sa.Column("evidence", JSONB, nullable=False),
    )
    op.create_index("ix_tuning_actions_ts", "tuning_actions", ["ts"])
    op.add_column("device_samples", sa.Column("busy_ms", sa.Float, comment="device compute time since the last sample"))
    op.add_column("device_samples", sa.Column("interval_ms", sa.Float, comment="time since the last sample"))


def downgrade() -> None:
    op.drop_column("device_samples", "interval_ms")
    op.drop_column("device_samples", "busy_ms")
    op.drop_table("tuning_actions")
    op.drop_table("tuning_knobs")
