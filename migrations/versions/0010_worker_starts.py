"""worker_starts: one row per `ragq worker` consumer start (the background and the urgent consumer each): when it
started, how long until it consumed, its start-up phases; `ragq report` shows restarts from it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_starts",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("worker", sa.Text, nullable=False),
        sa.Column("device", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("consuming_s", sa.Float, nullable=False, comment="from the process's start to consuming"),
        sa.Column("phases", JSONB, nullable=False, server_default="{}"),
        sa.Column("restored", sa.Integer, nullable=False, server_default="0",
                  comment="tasks a killed predecessor held, put back at this start"),
    )
    op.create_index("ix_worker_starts_started_at", "worker_starts", ["started_at"])


def downgrade() -> None:
    op.drop_index("ix_worker_starts_started_at", "worker_starts")
    op.drop_table("worker_starts")
