"""stage_timings.first_token_ms: a generate stage's time from its start to the answer's first streamed piece

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("stage_timings", sa.Column("first_token_ms", sa.Float))


def downgrade() -> None:
    op.drop_column("stage_timings", "first_token_ms")
