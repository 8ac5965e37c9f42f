"""Alembic environment and versions for ragq's Postgres schema."""
