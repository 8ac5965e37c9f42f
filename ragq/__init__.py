"""ragq: a RAG stack as Celery jobs on GPUs too small to hold every model at once."""

__version__ = "0.1.0"
