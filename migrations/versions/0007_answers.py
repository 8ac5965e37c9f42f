"""answers: background questions (`ragq questions FILE`), one row per question of a job of kind "questions"

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "answers",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("question", sa.Text, nullable=False),
        sa.Column("label", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("answer", sa.Text),
        sa.Column("mode", sa.String(16)),
        sa.Column("sources", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("error", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_answers_job_id", "answers", ["job_id", "seq"])


def downgrade() -> None:
    op.drop_index("ix_answers_job_id", table_name="answers")
    op.drop_table("answers")
