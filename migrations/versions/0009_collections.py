"""doc_keys: documents by collection and key. A key (the source as given, normalised, or one the caller chose) names
the current version (a content-addressed document) within its collection; ingesting the key again with other
content switches it to the new version in one transaction. Existing documents get the collection "default" and
their source as key (the newest document of a source, where several were ingested); nothing is re-embedded.
jobs/job_items.chunks_reused: chunks of a new version whose vectors came from the version it replaced;
jobs.collection, jobs.sync_keys, jobs.synced_at: a job's collection, and for `ragq ingest --sync` the keys of its
inputs (the collection's other keys are forgotten once it finishes).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "doc_keys",
        sa.Column("collection", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("document_id", sa.String(64), sa.ForeignKey("documents.id"), nullable=False),
        sa.Column("job_id", sa.String(36)),
        sa.Column("item_id", sa.BigInteger, comment="the submission that wrote it: a later one wins a race"),
        sa.Column("ingested_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("collection", "key"),
    )
    op.create_index("ix_doc_keys_document_id", "doc_keys", ["document_id"])
    op.execute("""
        INSERT INTO doc_keys (collection, key, document_id, ingested_at)
        SELECT DISTINCT ON (coalesce(source, name, id)) 'default', coalesce(source, name, id), id, created_at
        FROM documents ORDER BY coalesce(source, name, id), created_at DESC
    """)
    op.add_column("jobs", sa.Column("chunks_reused", sa.Integer, nullable=False, server_default="0"))
    op.add_column("job_items", sa.Column("chunks_reused", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("collection", sa.Text))
    # `ragq ingest --sync`: the keys the job's inputs name; once it finishes, the collection's other keys go
    op.add_column("jobs", sa.Column("sync_keys", JSONB))
    op.add_column("jobs", sa.Column("synced_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("jobs", "synced_at")
    op.drop_column("jobs", "sync_keys")
    op.drop_column("jobs", "collection")
    op.drop_column("job_items", "chunks_reused")
    op.drop_column("jobs", "chunks_reused")
    op.drop_index("ix_doc_keys_document_id", "doc_keys")
    op.drop_table("doc_keys")
