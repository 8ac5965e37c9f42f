"""initial schema: documents, chunks (pgvector), jobs, job_items, stage_timings, model_events

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import VECTOR
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _now() -> sa.TextClause:
    return sa.text("now()")


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "documents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("source", sa.Text),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("meta", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now()),
    )
    op.create_table(
        "chunks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("document_id", sa.String(64), sa.ForeignKey("documents.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("headings", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("embed_model", sa.String(200), nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("embedding", VECTOR(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now()),
    )
    op.create_index("ix_chunks_document_id", "chunks", ["document_id"])
    # The default CPU embedder (all-MiniLM-L6-v2, 384 dims) gets its HNSW cosine index here; other embedders get
    # theirs from ragq.core.db.ensure_vector_index (same naming) when their first vectors are written.
    op.execute(
        "CREATE INDEX IF NOT EXISTS ix_chunks_hnsw_all_minilm_l6_v2_fa870ee1_384 ON chunks "
        "USING hnsw ((embedding::vector(384)) vector_cosine_ops) WHERE embed_model = 'all-MiniLM-L6-v2'"
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("documents_total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("documents_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("documents_failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("chunks_total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("chunks_added", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now()),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_table(
        "job_items",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("document_id", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("chunks", sa.Integer, nullable=False, server_default="0"),
        sa.Column("chunks_added", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now()),
    )
    op.create_index("ix_job_items_job_id", "job_items", ["job_id"])
    op.create_table(
        "stage_timings",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36)),
        sa.Column("task_id", sa.String(64)),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("model", sa.String(200)),
        sa.Column("worker", sa.String(200)),
        sa.Column("device", sa.String(32)),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False, server_default="0"),
        sa.Column("items", sa.Integer, nullable=False, server_default="0"),
        sa.Column("tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("enqueued_at", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("queue_ms", sa.Float, nullable=False, server_default="0"),
        sa.Column("load_ms", sa.Float, nullable=False, server_default="0"),
        sa.Column("compute_ms", sa.Float, nullable=False, server_default="0"),
        sa.Column("vram_peak_bytes", sa.BigInteger),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_stage_timings_job_id", "stage_timings", ["job_id"])
    op.create_index("ix_stage_timings_finished_at", "stage_timings", ["finished_at"])
    op.create_index("ix_stage_timings_stage_model", "stage_timings", ["stage", "model"])
    op.create_table(
        "model_events",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False, server_default=_now()),
        sa.Column("worker", sa.String(200)),
        sa.Column("device", sa.String(32)),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("bytes", sa.BigInteger),
        sa.Column("ms", sa.Float),
        sa.Column("reason", sa.Text),
    )
    op.create_index("ix_model_events_ts", "model_events", ["ts"])


def downgrade() -> None:
    for table in ("model_events", "stage_timings", "job_items", "jobs", "chunks", "documents"):
        op.drop_table(table)
