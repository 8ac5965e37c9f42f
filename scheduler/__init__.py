"""Pure decisions: budgets, residency, batching. No I/O, no Celery, no torch imports."""
