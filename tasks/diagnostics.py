"""A probe task for checking queue order and liveness: records when it started, sleeps, returns."""

from __future__ import annotations

import time

from workers.celery_app import app


@app.task(name="ragq.probe", bind=True)
def probe(self, tag: str, sleep_s: float = 0.0) -> dict[str, object]:  # type: ignore[no-untyped-def]
    started = time.time()
    if sleep_s > 0:
        time.sleep(min(sleep_s, 60.0))
    return {"tag": tag, "started": started, "finished": time.time(), "worker": self.request.hostname}
