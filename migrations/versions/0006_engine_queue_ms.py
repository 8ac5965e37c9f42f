"""stage_timings.engine_queue_ms: the part of queue_ms spent waiting in the engine (the rest is the broker)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("stage_timings", sa.Column("engine_queue_ms", sa.Float))


def downgrade() -> None:
    op.drop_column("stage_timings", "engine_queue_ms")
