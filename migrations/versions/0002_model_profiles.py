"""model_profiles: measured weights bytes and activation peaks per model, device kind and dtype

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_profiles",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("device_kind", sa.String(200), primary_key=True),
        sa.Column("dtype", sa.String(16), primary_key=True),
        sa.Column("weights_bytes", sa.BigInteger, nullable=False),
        sa.Column("activations", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )


def downgrade() -> None:
    op.drop_table("model_profiles")
