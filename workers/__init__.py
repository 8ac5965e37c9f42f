"""Doing: the Celery app and config, worker start-up, the per-device engine, model backends, timing sink."""
