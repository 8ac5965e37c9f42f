"""The Celery app: two queues with their own exchanges, priority order, late acks, JSON only.

Measured on Celery 5.7 / kombu 5.7 with Redis: with `queue_order_strategy=priority` and prefetch 1 an urgent task
waits for at most the tasks a worker already reserved; with the default round-robin order it interleaves with
background work. Per-message priority is not relied on (on Redis 0 is highest and "no priority" counts as 0).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.signals import before_task_publish
from kombu import Exchange, Queue

from ragq.core.errors import PoisonMessage

if TYPE_CHECKING:
    from ragq.core.services import Endpoints
    from ragq.core.settings import Settings
    from workers.runtime import WorkerRuntime

URGENT_QUEUE = "urgent"
BACKGROUND_QUEUE = "background"
SENT_AT_HEADER = "ragq_sent_at"
# a question's stages after the first go to the queue of the urgent consumer that took the first one, so its
# prewarm of the next stage's model and its "next stage expected" protection help the GPU that runs them
DIRECT_PREFIX = "urgent."


def direct_queue(worker_name: str) -> str:
    """The urgent consumer `worker_name`'s own queue (consumed ahead of the shared urgent queue)."""
    return f"{DIRECT_PREFIX}{worker_name}"


TASK_MODULES = ["tasks.ingest", "tasks.query", "tasks.questions", "tasks.diagnostics", "tasks.maintenance"]


class RagqCelery(Celery):
    """Celery with a slot for the worker's runtime (engine, database, timing sink), set by `ragq worker`."""

    runtime: WorkerRuntime | None = None

    def require_runtime(self) -> WorkerRuntime:
        if self.runtime is None:
            raise RuntimeError("ragq tasks run only inside `ragq worker` (no runtime in this process)")
        return self.runtime


class RagqTask(Task):  # type: ignore[misc]
    """Base of every ragq task: an attempt that has started more than RAGQ_MAX_DELIVERIES times without finishing
    (its worker died each time) fails with PoisonMessage instead of running again (workers/leases.py)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        runtime = self.app.runtime
        request = self.request
        if runtime is not None and not request.called_directly and request.id:
            starts = runtime.deliveries.arrive(request.id, request.retries or 0)
            if starts > runtime.deliveries.limit:
                raise PoisonMessage(
                    f"task {self.name}[{request.id}] started {starts} times without finishing (its worker died "
                    f"each time); failed instead of run again (RAGQ_MAX_DELIVERIES={runtime.deliveries.limit})")
        return super().__call__(*args, **kwargs)

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        runtime = self.app.runtime
        if runtime is not None and not self.request.called_directly:
            runtime.deliveries.finished(task_id, self.request.retries or 0)
        super().after_return(status, retval, task_id, args, kwargs, einfo)


app = RagqCelery("ragq", include=TASK_MODULES, task_cls=RagqTask)


def celery_config(settings: Settings, endpoints: Endpoints, consumer: bool = False) -> dict[str, Any]:
    """`consumer`: for a worker's consumers (late acks, channels holding unacked messages); clients, beat and
    Flower only publish or read."""
    return {
        "broker_url": endpoints.broker_url,
        "result_backend": endpoints.result_backend,
        "task_queues": (
            Queue(URGENT_QUEUE, Exchange(URGENT_QUEUE, type="direct"), routing_key=URGENT_QUEUE),
            Queue(BACKGROUND_QUEUE, Exchange(BACKGROUND_QUEUE, type="direct"), routing_key=BACKGROUND_QUEUE),
        ),
        "task_default_queue": BACKGROUND_QUEUE,
        "task_default_exchange": BACKGROUND_QUEUE,
        "task_default_routing_key": BACKGROUND_QUEUE,
        "task_routes": {
            "ragq.ingest_documents": {"queue": BACKGROUND_QUEUE},
            "ragq.query.*": {"queue": URGENT_QUEUE},
        },
        # consumers: kombu's Redis transport minus a crash when the broker goes away with tasks in flight
        # (workers/broker.py); the others keep kombu's own (Flower, for one, tells brokers apart by that name)
        "broker_transport": "workers.broker:Transport"
        if consumer and endpoints.broker_url.startswith("redis://") else None,
        "broker_transport_options": {
            "queue_order_strategy": "priority",
            "visibility_timeout": settings.visibility_timeout_s,
        },
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": 24 * 3600,
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        # ragq logs through its own handler on stderr; Celery's stdout redirection would swallow those lines
        "worker_redirect_stdouts": False,
        "timezone": "UTC",
        "enable_utc": True,
    }


def celery_defaults_config(settings: Settings, endpoints: Endpoints, consumer: bool = False) -> dict[str, Any]:
    """Celery's own defaults for queue order, prefetch and acks (the baseline the benchmarks compare with)."""
    config = celery_config(settings, endpoints, consumer)
    config.update(
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_acks_late=False, task_reject_on_worker_lost=False, worker_prefetch_multiplier=4,
    )
    return config


def configure_app(settings: Settings, endpoints: Endpoints, consumer: bool = False) -> RagqCelery:
    if settings.celery_profile == "celery-defaults":
        app.conf.update(celery_defaults_config(settings, endpoints, consumer))
    else:
        app.conf.update(celery_config(settings, endpoints, consumer))
    app.conf.beat_schedule = {
        "ragq-evaluate-alerts": {
            "task": "ragq.evaluate_alerts", "schedule": settings.alert_interval_s,
            "options": {"queue": URGENT_QUEUE, "expires": settings.alert_interval_s},
        },
    }
    if settings.tune_interval_s > 0:
        app.conf.beat_schedule["ragq-tune"] = {
            "task": "ragq.tune", "schedule": settings.tune_interval_s,
            "options": {"queue": URGENT_QUEUE, "expires": settings.tune_interval_s},
        }
    return app


@before_task_publish.connect
def _stamp_sent_time(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Every message carries its publish time so the worker can tell queue time from run time."""
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, time.time())
