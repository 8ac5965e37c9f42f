"""Task leases on the Redis broker: a killed worker's tasks come back at once, a live worker's never expire.

kombu's Redis transport emulates acks: a delivered message stays in the `unacked` hash, indexed by delivery time in
the `unacked_index` sorted set, until the task acks it (ragq acks late, after the task). Any consumer puts back the
entries older than the visibility timeout. Left alone, that means a task of a SIGKILLed worker waits the whole
visibility timeout (an hour by default) before it runs again, and a task that runs longer than the timeout runs
twice. So each Celery consumer of a ragq worker keeps a lease:

- it records each task's delivery tag under its worker name as it receives it (Celery's task_received signal),
  and every `interval_s` refreshes the index entries of those still unacked to now, so they never look expired
  while it lives (acked ones leave the record);
- when a worker of the same name starts again (one worker per device and name), it first puts the tags its dead
  predecessor recorded back on their queues, before it consumes anything.

- every `interval_s` one consumer (a Redis lock, kombu's own `unacked_mutex`) also puts back the unacked messages
  whose index entry nobody has refreshed for `orphan_after_s` (a minute by default): a live ragq consumer refreshes
  its own every `interval_s`, so such a message belongs to no living consumer. That covers a worker that never
  comes back, and a delivery its worker was killed with before it could record it in its lease (the broker moves a
  message to `unacked` before Celery's `task_received` fires; on a busy host that window is wide enough for the
  kill drill to hit it).

Consumers of Celery's default profile (`RAGQ_CELERY_PROFILE=celery-defaults`) keep no leases and run no sweep; do
not mix the two profiles on one broker (the sweep would put back what such a consumer holds after a minute).

Bringing tasks back at once has a risk: a message that kills its worker (a poison message) would come back with
every restart, for ever. `DeliveryCounter` counts the starts of each attempt of a task (its id and retry number) in
Redis; the task base class (`workers.celery_app.RagqTask`) fails an attempt that has started more than
`RAGQ_MAX_DELIVERIES` times, with an error that says so, instead of running it again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

UNACKED_HASH = "unacked"          # kombu.transport.redis.Channel.unacked_key
UNACKED_INDEX = "unacked_index"   # kombu.transport.redis.Channel.unacked_index_key
UNACKED_MUTEX = "unacked_mutex"  # kombu.transport.redis.Channel.unacked_mutex_key
UNACKED_MUTEX_EXPIRE_S = 300      # kombu.transport.redis.Channel.unacked_mutex_expire
LEASE_TTL_S = 7 * 24 * 3600


def lease_key(worker_name: str) -> str:
    return f"ragq:leases:{worker_name}"


def held_delivery_tags() -> list[str]:
    """Delivery tags of the tasks this process's Celery worker has reserved or is running."""
    from celery.worker import state

    tags = []
    for request in list(state.reserved_requests) + list(state.active_requests):
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag is not None:
            tags.append(str(tag))
    return tags


class TaskLeases:
    def __init__(self, app: Any, broker_url: str, worker_name: str, interval_s: float = 10.0,
                 orphan_after_s: float = 60.0, clock: Any = time.time) -> None:
        import redis

        self.app = app
        self.worker_name = worker_name
        self.interval_s = interval_s
        self.orphan_after_s = orphan_after_s
        self.clock = clock
        self._unrestorable: set[str] = set()
        self.redis = redis.Redis.from_url(broker_url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def restore_previous(self) -> int:
        """Put the tasks a previous incarnation of this worker held back on their queues; returns how many."""
        key = lease_key(self.worker_name)
        tags = [t.decode() if isinstance(t, bytes) else str(t) for t in self.redis.smembers(key)]
        restored = 0
        if tags:
            with self.app.connection_for_write() as conn:
                qos = conn.default_channel.qos
                for tag in tags:
                    if self.redis.hexists(UNACKED_HASH, tag):
                        qos.restore_by_tag(tag)  # kombu's own restore: back on its queue, marked redelivered
                        restored += 1
        self.redis.delete(key)
        if restored:
            log.warning("worker %s: put back %d task(s) its previous run held when it stopped", self.worker_name,
                        restored)
        return restored

    def hold(self, tag: str) -> None:
        """Record a task this worker just received (Celery's task_received signal), before it can be lost."""
        key = lease_key(self.worker_name)
        self.redis.pipeline().sadd(key, tag).expire(key, LEASE_TTL_S).execute()

    def refresh(self) -> None:
        """Bump the index entries of the tasks still unacked to now; forget those acked (the broker's word)."""
        key = lease_key(self.worker_name)
        held = held_delivery_tags()
        if held:  # a safety net for a receipt the signal missed
            self.redis.sadd(key, *held)
        tags = [t.decode() if isinstance(t, bytes) else str(t) for t in self.redis.smembers(key)]
        if not tags:
            return
        pipe = self.redis.pipeline()
        for tag in tags:
            pipe.hexists(UNACKED_HASH, tag)
        live = [tag for tag, exists in zip(tags, pipe.execute()) if exists]
        done = sorted(set(tags) - set(live))
        pipe = self.redis.pipeline()
        if live:
            pipe.zadd(UNACKED_INDEX, {tag: time.time() for tag in live}, xx=True)
        if done:
            pipe.srem(key, *done)
        pipe.expire(key, LEASE_TTL_S)
        pipe.execute()

    def sweep(self, limit: int = 100) -> int:
        """Put back the unacked messages no consumer has refreshed for `orphan_after_s`; returns how many. One
        consumer at a time (kombu's lock for its own visibility-timeout restore); a message restored twice is not
        possible (kombu's restore is a transaction on the unacked hash)."""
        from kombu.transport.redis import Mutex, MutexHeld

        ceiling = self.clock() - self.orphan_after_s
        if not self.redis.zcount(UNACKED_INDEX, "-inf", ceiling):
            return 0
        restored = 0
        try:
            with Mutex(self.redis, UNACKED_MUTEX, UNACKED_MUTEX_EXPIRE_S):
                stale = self.redis.zrangebyscore(UNACKED_INDEX, "-inf", ceiling, start=0, num=limit)
                if not stale:
                    return 0
                with self.app.connection_for_write() as conn:
                    qos = conn.default_channel.qos
                    for tag in stale:
                        tag = tag.decode() if isinstance(tag, bytes) else str(tag)
                        if not self.redis.hexists(UNACKED_HASH, tag):
                            self.redis.zrem(UNACKED_INDEX, tag)   # acked meanwhile: kombu drops such entries too
                            continue
                        try:
                            qos.restore_by_tag(tag)
                            restored += 1
                        except Exception as exc:  # noqa: BLE001 - one unreadable entry must not stop the others
                            if tag not in self._unrestorable:
                                self._unrestorable.add(tag)
                                log.warning("worker %s: could not put back unacked message %s: %s",
                                            self.worker_name, tag, exc)
        except MutexHeld:
            return 0
        if restored:
            log.warning("worker %s: put back %d task(s) no consumer had refreshed for %.0fs (their worker is gone)",
                        self.worker_name, restored, self.orphan_after_s)
        return restored

    def start(self) -> TaskLeases:
        from celery.signals import task_received

        def on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
            tag = getattr(getattr(request, "message", None), "delivery_tag", None)
            if tag is not None:
                try:
                    self.hold(str(tag))
                except Exception as exc:
                    log.warning("worker %s: could not record task %s in its lease: %s", self.worker_name, tag, exc)

        task_received.connect(on_received, weak=False)

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.refresh()
                    self.sweep()
                except Exception as exc:  # the broker away for a moment: the next round tries again
                    log.warning("worker %s: could not refresh task leases: %s", self.worker_name, exc)

        self._thread = threading.Thread(target=loop, name="ragq-task-leases", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """A clean stop: Celery has acked or requeued what it held, so the lease goes."""
        self._stop.set()
        try:
            self.redis.delete(lease_key(self.worker_name))
        except Exception:
            pass


class ConsumerWatchdog:
    """Notices a consumer that has stopped taking work and restarts it.

    After a broker reconnect, Celery's consumer on the Redis transport can stay connected but never fetch again
    (the outage drill caught it: the urgent consumer took one task after Redis came back, then left the next one on
    its queue; Celery's issue tracker has the same report for several versions). The watchdog looks every
    `interval_s`: messages waiting on this consumer's queues, a free slot, and nothing received for `stall_after_s`
    mean a stall. The first time, it makes the consumer go through Celery's own reconnect (a connection error
    raised in its event loop); if it is still stalled `stall_after_s` later, the process exits (code 70) so that its
    parent (the urgent consumer's worker) or a supervisor starts it again, and its lease brings back what it held."""

    EXIT_CODE = 70

    def __init__(self, broker_url: str, worker_name: str, queues: list[str], concurrency: int,
                 stall_after_s: float = 30.0, interval_s: float = 5.0,
                 exit_fn: Any = None, busy_fn: Any = None, clock: Any = time.monotonic) -> None:
        import redis

        self.redis = redis.Redis.from_url(broker_url, socket_timeout=5)
        self.worker_name = worker_name
        self.queues = queues
        self.concurrency = concurrency
        self.stall_after_s = stall_after_s
        self.interval_s = interval_s
        self.clock = clock
        self.exit_fn = exit_fn or (lambda: os._exit(self.EXIT_CODE))
        self.busy_fn = busy_fn or (lambda: len(held_delivery_tags()))
        self.consumer: Any = None
        self.last_activity = clock()   # start, a receipt, or a restart of the consumer
        self.restarted = False
        self.restarts = 0
        self._stop = threading.Event()

    def received(self) -> None:
        self.last_activity = self.clock()
        self.restarted = False

    def stalled(self) -> bool:
        if self.clock() - self.last_activity < self.stall_after_s:
            return False
        if self.busy_fn() >= self.concurrency:
            return False
        pipe = self.redis.pipeline()
        for queue in self.queues:
            pipe.llen(queue)
        return sum(int(n) for n in pipe.execute()) > 0

    def check(self) -> None:
        if not self.stalled():
            return
        waiting = ", ".join(self.queues)
        if not self.restarted and self._restart_consumer():
            log.error("worker %s: messages wait on %s but its consumer has received nothing for %.0fs; making it "
                      "reconnect", self.worker_name, waiting, self.clock() - self.last_activity)
            self.restarted = True
            self.restarts += 1
            self.last_activity = self.clock()
            return
        log.error("worker %s: its consumer is still not fetching from %s; exiting (code %d) to be started again",
                  self.worker_name, waiting, self.EXIT_CODE)
        self.exit_fn()

    def _restart_consumer(self) -> bool:
        hub = getattr(self.consumer, "hub", None)
        if hub is None:
            return False

        def fail() -> None:   # inside the consumer's event loop: Celery's reconnect path takes it from here
            raise OSError("ragq: consumer stalled after a broker reconnect; reconnecting")

        hub.call_soon(fail)
        return True

    def start(self) -> ConsumerWatchdog:
        from celery.signals import task_received, worker_ready

        task_received.connect(lambda **_: self.received(), weak=False)
        worker_ready.connect(lambda sender=None, **_: setattr(self, "consumer", sender), weak=False)

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.check()
                except Exception as exc:  # the broker away: the reconnect is Celery's; look again later
                    log.debug("worker %s: watchdog could not look: %s", self.worker_name, exc)

        threading.Thread(target=loop, name="ragq-consumer-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


DELIVERY_TTL_S = 7 * 24 * 3600


def delivery_key(task_id: str, retries: int) -> str:
    return f"ragq:deliveries:{task_id}:{retries}"


class DeliveryCounter:
    """How many times each attempt of a task has started (kept in the broker's Redis, so it outlives a worker)."""

    def __init__(self, broker_url: str, limit: int) -> None:
        import redis

        self.redis = redis.Redis.from_url(broker_url, socket_timeout=5)
        self.limit = limit

    def arrive(self, task_id: str, retries: int) -> int:
        """Count a start; returns the count (1 if Redis cannot say: never refuse work for want of a counter)."""
        key = delivery_key(task_id, retries)
        try:
            with self.redis.pipeline() as pipe:
                pipe.incr(key)
                pipe.expire(key, DELIVERY_TTL_S)
                return int(pipe.execute()[0])
        except Exception as exc:  # noqa: BLE001 - the broker away for a moment
            log.warning("could not count the delivery of task %s: %s", task_id, exc)
            return 1

    def finished(self, task_id: str, retries: int) -> None:
        try:
            self.redis.delete(delivery_key(task_id, retries))
        except Exception as exc:  # noqa: BLE001 - the key expires by itself
            log.warning("could not clear the delivery count of task %s: %s", task_id, exc)


ALIVE_TTL_S = 3.0
ALIVE_SET = "ragq:alive"   # sorted set: urgent consumer -> until when its last beat holds


def alive_key(worker_name: str) -> str:
    return f"ragq:alive:{worker_name}"


def urgent_consumers(client: Any) -> int:
    """How many urgent consumers beat now (one round trip)."""
    return int(client.zcount(ALIVE_SET, time.time(), "+inf"))


class Heartbeat:
    """A key in the broker's Redis that lives while this consumer does (refreshed every second, gone 3 s after the
    process stops). A client waiting on a question whose stages are routed to this consumer's own queue looks at
    it: a missing key means the worker died mid-question, and the question is asked again elsewhere at once
    instead of waiting out its timeout."""

    def __init__(self, broker_url: str, worker_name: str, interval_s: float = 1.0, ttl_s: float = ALIVE_TTL_S) -> None:
        import redis

        self.redis = redis.Redis.from_url(broker_url, socket_timeout=2)
        self.key = alive_key(worker_name)
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._stop = threading.Event()

    def beat(self) -> None:
        name = self.key.removeprefix("ragq:alive:")
        with self.redis.pipeline() as pipe:
            pipe.set(self.key, str(os.getpid()), px=int(self.ttl_s * 1000))
            pipe.zadd(ALIVE_SET, {name: time.time() + self.ttl_s})
            pipe.zremrangebyscore(ALIVE_SET, "-inf", time.time() - 3600)   # long-gone workers
            pipe.execute()

    def start(self) -> Heartbeat:
        def loop() -> None:
            while True:
                try:
                    self.beat()
                except Exception as exc:  # noqa: BLE001 - the broker away: the next beat tries again
                    log.debug("heartbeat %s: %s", self.key, exc)
                if self._stop.wait(self.interval_s):
                    return

        threading.Thread(target=loop, name="ragq-heartbeat", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self.redis.delete(self.key)
            self.redis.zrem(ALIVE_SET, self.key.removeprefix("ragq:alive:"))
        except Exception:  # noqa: BLE001 - it expires by itself
            pass
