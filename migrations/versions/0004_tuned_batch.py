"""model_profiles.tuned_batch: the background batch size the tuner settled on, so a restart starts there

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("model_profiles", sa.Column("tuned_batch", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("model_profiles", "tuned_batch")
