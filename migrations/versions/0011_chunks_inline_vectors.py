"""chunks keep a vector inline while the row fits a page (toast_tuple_target 8160, the most Postgres allows).

At the default target (~2 KB) a 1,024-dimension vector (4 KB) is moved out of line into the TOAST table, and every
distance an exact search computes (or an HNSW scan re-checks) first fetches it from there: on this project's CPU
that made an exact search of a 10,000-chunk collection 2-3x slower than with the vectors inline (BENCHMARKS.md,
bench/search_toast_cpu.py). With the target at a page, Postgres toasts the chunk's text first and moves a vector out
only where the row still does not fit (2,000 dimensions with a long text). Rows written before this keep their
storage until they are rewritten (re-ingested, or `VACUUM FULL chunks`).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE chunks SET (toast_tuple_target = 8160)")


def downgrade() -> None:
    op.execute("ALTER TABLE chunks RESET (toast_tuple_target)")
