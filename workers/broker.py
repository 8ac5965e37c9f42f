"""kombu's Redis transport, with one fault taken out: closing a channel after the broker went away must not kill
the worker.

When the connection to Redis breaks while tasks are in flight (late acks), Celery's consumer closes the old
channel, and the channel's close tries to put its unacknowledged messages back (`restore_unacked_once`) through a
connection that is already released: kombu 5.7 raises AttributeError ('NoneType' object has no attribute
'hostname') from there, Celery calls it unrecoverable and the whole worker shuts down (the outage drill,
tests/outage_drill.py, caught it about one restart in two under load). Here that restore is skipped with a
warning instead: those messages stay in the broker's unacked set, their tasks are still running in this worker and
ack them when they finish, and what is never acked comes back through the task leases (workers/leases.py).
Selected by `broker_transport` in workers/celery_app.py."""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    def restore_unacked_once(self, stderr: Any = None) -> Any:
        try:
            return super().restore_unacked_once(stderr)
        except Exception as exc:  # noqa: BLE001 - the connection is gone; the leases restore later
            log.warning("broker connection lost with tasks in flight; leaving them to finish or to their lease "
                        "(%s: %s)", type(exc).__name__, exc)
            return None


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
