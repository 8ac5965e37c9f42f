"""device_samples (device memory over time) and alerts (firing and resolved states)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_samples",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("worker", sa.String(200)),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("used_bytes", sa.BigInteger, nullable=False),
        sa.Column("budget_bytes", sa.BigInteger, nullable=False),
        sa.Column("total_bytes", sa.BigInteger),
        sa.Column("resident", sa.Text, comment="models in device memory, comma-separated"),
    )
    op.create_index("ix_device_samples_ts", "device_samples", ["ts"])
    op.create_index("ix_device_samples_worker_device_ts", "device_samples", ["worker", "device", "ts"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(300), nullable=False, comment="what it is about: a worker's device, a stage"),
        sa.Column("severity", sa.String(16), nullable=False, comment="warning | major | critical"),
        sa.Column("state", sa.String(16), nullable=False, comment="pending | firing | resolved"),
        sa.Column("value", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, comment="the condition first held"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, comment="the condition last held"),
        sa.Column("fired_at", sa.DateTime(timezone=True)),
        sa.Column("resolved_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_alerts_rule_subject_state", "alerts", ["rule", "subject", "state"])
    op.create_index("ix_alerts_started_at", "alerts", ["started_at"])


def downgrade() -> None:
    op.drop_table("alerts")
    op.drop_table("device_samples")
