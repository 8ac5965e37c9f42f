"""The job graph: Celery tasks for ingestion (background) and questions (urgent chains)."""
