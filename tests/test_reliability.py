"""Faults with real processes: a worker SIGKILLed mid-ingestion again and again (tests/kill_drill.py, in its own
process with its own Redis and Postgres), and the task leases that bring a killed worker's tasks back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


# 20 worker starts and a 240-document ingestion. The drill waits on progress, not a clock: a start gets 180 s, a job
# fails only after 240 s without a document done, so a loaded machine slows it instead of failing it; the bound
# here only catches a hang. `pytest --drill-busy 2` runs the drills with two busy processes beside them.
@pytest.mark.timeout(5400)
def test_a_worker_sigkilled_mid_ingestion_20_times_loses_and_duplicates_nothing(tmp_path: Path, drill_busy: int
                                                                                ) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.kill_drill", "--kills", "20", "--docs", "240", "--home", str(tmp_path / "h"),
         "--busy", str(drill_busy)],
        cwd=ROOT, capture_output=True, text=True, timeout=5400, stdin=subprocess.DEVNULL,
    )
    assert result.stdout.strip(), result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["kills"] == 20 and not summary.get("finished_before_all_kills"), summary
    assert summary["restored"] >= 1, summary          # restarts put back what the killed worker held
    assert summary["job_status"] == "completed" and summary["documents_done"] == 240, summary
    assert summary["chunks_stored"] == summary["distinct_document_seq"] and not summary["documents_incomplete"]
    assert summary["answer"] and summary["orphans"] == 0, summary
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.timeout(1800)
def test_two_workers_share_an_ingestion_and_a_killed_ones_tasks_go_to_the_other(tmp_path: Path, drill_busy: int
                                                                               ) -> None:
    """tests/share_drill.py: workers alpha and beta (as on two hosts) on one Redis and Postgres; alpha is killed
    while it holds tasks and never comes back; beta's sweep puts them back and beta finishes the job."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.share_drill", "--docs", "80", "--home", str(tmp_path / "h"),
         "--busy", str(drill_busy)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL,
    )
    assert result.stdout.strip(), result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["alpha_held_at_kill"] > 0 and summary["beta_put_back"] >= 1, summary
    assert summary["both_worked"], summary
    assert summary["job_status"] == "completed" and summary["documents_done"] == 80, summary
    assert summary["chunks_stored"] == summary["distinct_document_seq"] and not summary["documents_incomplete"]
    assert summary["answer"] and summary["orphans"] == 0, summary
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("fault", ["redis", "postgres"])
@pytest.mark.timeout(1800)
def test_an_outage_mid_ingestion_loses_nothing_and_the_worker_reconnects(tmp_path: Path, fault: str,
                                                                         drill_busy: int) -> None:
    """tests/outage_drill.py: Redis restarted (append-only file) or Postgres away for 10 s in the middle of an
    80-document ingestion, with the worker running throughout."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.outage_drill", "--fault", fault, "--docs", "80", "--outage-s", "10",
         "--home", str(tmp_path / "h"), "--busy", str(drill_busy)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL,
    )
    assert result.stdout.strip(), result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["worker_survived"], summary                       # reconnected, not restarted
    assert summary["job_status"] == "completed" and summary["documents_done"] == 80, summary
    assert summary["chunks_stored"] == summary["distinct_document_seq"] and not summary["documents_incomplete"]
    assert summary["answer"] and summary["second_job"] == "completed", summary
    if fault == "redis":   # tasks queued and reserved when it stopped were there when it came back (and the job
        # could not have completed without them)
        assert summary["queued_after_restart"] + summary["unacked_after_restart"] > 0, summary
    else:                  # timing rows of the outage were buffered and written afterwards
        assert summary["timing_rows_during_outage"] > 0, summary
    assert result.returncode == 0, result.stderr[-4000:]


def test_a_lease_keeps_a_long_task_from_looking_expired_and_forgets_acked_ones(settings, client) -> None:  # type: ignore[no-untyped-def]
    import time

    import redis

    from workers.leases import UNACKED_HASH, UNACKED_INDEX, TaskLeases, lease_key

    broker = client.endpoints.broker_url
    r = redis.Redis.from_url(broker)
    old = time.time() - 7200  # delivered two hours ago: past any visibility timeout
    r.hset(UNACKED_HASH, mapping={"lease-test-running": "[]", "lease-test-done-x": "[]"})
    r.zadd(UNACKED_INDEX, {"lease-test-running": old, "lease-test-done-x": old})
    leases = TaskLeases(client.app, broker, "lease-test@host")
    try:
        leases.hold("lease-test-running")
        leases.hold("lease-test-done")        # acked meanwhile: no longer in the broker's unacked hash
        leases.refresh()
        assert r.zscore(UNACKED_INDEX, "lease-test-running") > time.time() - 5   # fresh: kombu will not restore it
        assert {m.decode() for m in r.smembers(lease_key("lease-test@host"))} == {"lease-test-running"}
        assert r.zscore(UNACKED_INDEX, "lease-test-done-x") == old               # not ours: left alone
    finally:
        leases.stop()
        r.hdel(UNACKED_HASH, "lease-test-running", "lease-test-done-x")
        r.zrem(UNACKED_INDEX, "lease-test-running", "lease-test-done-x")
    assert not r.exists(lease_key("lease-test@host"))  # a clean stop leaves no lease behind


def test_an_unacked_message_no_lease_names_goes_back_after_the_orphan_delay(settings, client) -> None:  # type: ignore[no-untyped-def]
    """A consumer killed after the broker handed it a message but before it recorded it in its lease: no lease
    names it; the sweep of any live worker puts it back once nobody has refreshed it for the orphan delay."""
    import json
    import subprocess
    import sys
    import time

    import redis

    from workers.leases import UNACKED_HASH, UNACKED_INDEX, TaskLeases

    broker = client.endpoints.broker_url
    r = redis.Redis.from_url(broker)
    queue = "ragq-sweep-test"
    r.delete(queue)
    take = (  # a consumer that takes one message and dies without acking or closing its channel
        "import os, sys\nfrom kombu import Connection\n"
        "with Connection(sys.argv[1]) as c:\n"
        "    q = c.SimpleQueue(sys.argv[2])\n"
        "    q.put({'n': int(sys.argv[3])})\n"
        "    m = q.get(timeout=10)\n"
        "    print(m.delivery_tag, flush=True)\n"
        "    os._exit(0)\n")
    tags = [subprocess.run([sys.executable, "-c", take, broker, queue, str(n)], capture_output=True, text=True,
                           check=True, timeout=60).stdout.strip() for n in (1, 2)]
    assert all(r.hexists(UNACKED_HASH, tag) for tag in tags) and r.llen(queue) == 0
    r.zadd(UNACKED_INDEX, {tags[1]: time.time() + 3600}, xx=True)   # the second: refreshed (a live lease)
    leases = TaskLeases(client.app, broker, "sweep-test@host", orphan_after_s=60.0,
                        clock=lambda: time.time() + 61)     # a minute on: the first has not been refreshed since
    try:
        assert leases.sweep() == 1
        assert not r.hexists(UNACKED_HASH, tags[0]) and r.zscore(UNACKED_INDEX, tags[0]) is None
        assert r.hexists(UNACKED_HASH, tags[1])                     # refreshed: left with its consumer
        back = [json.loads(m) for m in r.lrange(queue, 0, -1)]
        assert len(back) == 1 and back[0]["properties"]["delivery_info"]["routing_key"] == queue
        assert leases.sweep() == 0                                  # once
    finally:
        r.hdel(UNACKED_HASH, *tags)
        r.zrem(UNACKED_INDEX, *tags)
        r.delete(queue)


def test_orphan_delay_must_leave_a_live_worker_time_to_refresh() -> None:
    from ragq.core.settings import Settings

    assert Settings(lease_interval_s=10).orphan_after == 60
    assert Settings(lease_interval_s=30).orphan_after == 180
    with pytest.raises(ValueError, match=r"RAGQ_ORPHAN_AFTER_S \(20\) must be at least 3 lease intervals"):
        Settings(lease_interval_s=10, orphan_after_s=20)


def test_a_pickle_message_is_refused_and_not_redelivered(worker, client) -> None:  # type: ignore[no-untyped-def]
    import time

    import redis

    result = client.app.send_task("ragq.probe", args=["pickled"], serializer="pickle", queue="background")
    deadline = time.monotonic() + 30
    log = ""
    while time.monotonic() < deadline:
        log = worker.log_path.read_text(errors="replace")
        if "pickle" in log and ("ContentDisallowed" in log or "untrusted content" in log):
            break
        time.sleep(0.5)
    assert "untrusted content" in log or "ContentDisallowed" in log, log[-3000:]
    time.sleep(2)
    r = redis.Redis.from_url(client.endpoints.broker_url)
    assert r.llen("background") == 0                      # not left on the queue
    assert not any(result.id.encode() in (v or b"") for v in r.hvals("unacked"))  # nor held for redelivery
    assert result.state == "PENDING"                       # and never run


def test_the_worker_never_logs_the_broker_password(worker, client) -> None:  # type: ignore[no-untyped-def]
    from urllib.parse import unquote, urlsplit

    password = unquote(urlsplit(client.endpoints.broker_url).password or "")
    assert len(password) >= 24   # the embedded Redis always has one
    assert client.ask("which queue is urgent?", timeout_s=120)  # the worker has connected, logged its banner, worked
    log = worker.log_path.read_text(errors="replace")
    assert "redis://" in log and password not in log


def _settled(result, timeout_s: float = 60) -> str:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and result.state in ("PENDING", "STARTED", "RECEIVED"):
        time.sleep(0.2)
    return str(result.state)


def test_a_message_that_killed_its_worker_too_often_fails_visibly_instead_of_running_again(worker, client) -> None:  # type: ignore[no-untyped-def]
    """The delivery counter says this attempt already started RAGQ_MAX_DELIVERIES times (its worker died each
    time, as the kill drill shows a restarted worker takes such tasks back): it fails with an error that says so,
    is acked, and its counter is cleared."""
    import uuid

    import redis

    from workers.leases import delivery_key

    r = redis.Redis.from_url(client.endpoints.broker_url)
    task_id = str(uuid.uuid4())
    r.set(delivery_key(task_id, 0), 5)   # RAGQ_MAX_DELIVERIES defaults to 5
    result = client.app.send_task("ragq.probe", args=["poison"], task_id=task_id, queue="background")
    assert _settled(result) == "FAILURE"
    error = str(result.result)
    assert "started 6 times without finishing" in error and "RAGQ_MAX_DELIVERIES=5" in error, error
    assert not r.exists(delivery_key(task_id, 0))
    assert not any(task_id.encode() in (v or b"") for v in r.hvals("unacked"))   # acked: never comes back

    fine = client.app.send_task("ragq.probe", args=["fine"], queue="background")   # an ordinary task runs once
    assert _settled(fine) == "SUCCESS" and fine.result["tag"] == "fine"
    assert not r.exists(delivery_key(fine.id, 0))


def test_a_task_that_always_fails_ends_failed_with_its_error_once_not_redelivered(worker, client) -> None:  # type: ignore[no-untyped-def]
    import time

    import redis

    result = client.app.send_task("ragq.ingest_documents", args=["no-such-job", "not a list of documents"],
                                  queue="background")
    assert _settled(result) == "FAILURE"
    assert "TypeError" in type(result.result).__name__ + str(result.result) or result.traceback, result.result
    time.sleep(3)
    r = redis.Redis.from_url(client.endpoints.broker_url)
    assert not any(result.id.encode() in (v or b"") for v in r.hvals("unacked"))
    assert r.llen("background") == 0
    received = worker.log_path.read_text(errors="replace").count(f"ragq.ingest_documents[{result.id}] received")
    assert received == 1   # one delivery: no redelivery loop


def test_a_question_whose_caller_timed_out_never_reaches_the_device(worker, client, settings, db_engine) -> None:  # type: ignore[no-untyped-def]
    """The urgent consumer's threads all busy (probes sleeping 6 s), a question asked with a 1.5 s timeout: the
    caller gets QuestionTimeout, and when the threads free up the question's tasks are dropped (Celery's expires
    at the question's deadline), so no urgent embed runs for it."""
    import time
    from datetime import datetime, timezone

    from sqlalchemy import text

    from ragq.core.errors import QuestionTimeout

    since = datetime.now(timezone.utc)
    blockers = [client.app.send_task("ragq.probe", args=[f"block-{i}", 6.0], queue="urgent")
                for i in range(settings.urgent_concurrency)]
    time.sleep(1.0)   # the probes hold every urgent thread
    with pytest.raises(QuestionTimeout):
        client.ask("does a late question still run?", timeout_s=1.5)
    for blocker in blockers:
        blocker.get(timeout=60)
    time.sleep(3.0)   # the question's first task has been taken off the queue and dropped by now
    with db_engine.connect() as conn:
        embeds = conn.execute(text("SELECT count(*) FROM stage_timings WHERE stage = 'embed' AND priority = 'urgent' "
                                   "AND outcome = 'ok' AND finished_at > :since"), {"since": since}).scalar_one()
    assert embeds == 0
    log = worker.log_path.read_text(errors="replace")
    assert "ragq.query.embed" in log and ("expired" in log.lower() or "revoked" in log.lower())
    assert client.ask("and an ordinary question?", timeout_s=60)["answer"] is not None   # the queue moves on


def test_the_consumer_watchdog_restarts_a_consumer_that_stopped_fetching_then_exits(client) -> None:  # type: ignore[no-untyped-def]
    """Messages waiting on its queue, a free slot, nothing received for the stall time: first Celery's reconnect is
    triggered in the consumer's event loop, then, still stalled, the process exits to be started again. Busy,
    recently active or with nothing waiting, it is left alone."""
    import redis

    from workers.leases import ConsumerWatchdog

    queue = "watchdog-test-queue"
    r = redis.Redis.from_url(client.endpoints.broker_url)
    now = [1000.0]
    exits: list[bool] = []
    busy = [0]

    class Hub:
        def __init__(self) -> None:
            self.calls: list = []

        def call_soon(self, fn) -> None:  # type: ignore[no-untyped-def]
            self.calls.append(fn)

    class Consumer:
        hub = Hub()

    dog = ConsumerWatchdog(client.endpoints.broker_url, "dog@host", [queue], concurrency=2, stall_after_s=30,
                           exit_fn=lambda: exits.append(True), busy_fn=lambda: busy[0], clock=lambda: now[0])
    dog.consumer = Consumer()
    try:
        r.delete(queue)
        now[0] += 60
        dog.check()
        assert not Consumer.hub.calls and not exits            # nothing waiting: idle, not stalled
        r.rpush(queue, "m")
        busy[0] = 2
        dog.check()
        assert not Consumer.hub.calls                           # every slot busy: not stalled
        busy[0] = 0
        dog.received()
        now[0] += 10
        dog.check()
        assert not Consumer.hub.calls                           # received 10 s ago
        now[0] += 30
        dog.check()                                             # stalled: reconnect through Celery
        assert len(Consumer.hub.calls) == 1 and not exits
        with pytest.raises(OSError, match="consumer stalled"):
            Consumer.hub.calls[0]()
        now[0] += 10
        dog.check()
        assert not exits                                        # give the reconnect its time
        now[0] += 30
        dog.check()
        assert exits == [True]                                  # still stalled: exit to be restarted
    finally:
        r.delete(queue)


def test_closing_a_channel_whose_broker_is_gone_does_not_kill_the_worker(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """kombu 5.7's restore at channel close raises AttributeError once the connection is released (the outage
    drill's crash); ragq's transport leaves those messages to finish or to their lease instead."""
    from kombu.transport import redis as kombu_redis

    from workers import broker
    from workers.celery_app import celery_config

    def broken(self, stderr=None):  # type: ignore[no-untyped-def]
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    monkeypatch.setattr(kombu_redis.QoS, "restore_unacked_once", broken)
    qos = broker.QoS.__new__(broker.QoS)
    assert qos.restore_unacked_once() is None            # swallowed, logged
    assert broker.Transport.Channel.QoS is broker.QoS
    from ragq.core.services import Endpoints
    from ragq.core.settings import Settings

    endpoints = Endpoints("redis://:pw@127.0.0.1:1/0", "redis://:pw@127.0.0.1:1/0", "x")
    assert celery_config(Settings(), endpoints, consumer=True)["broker_transport"] == "workers.broker:Transport"
    assert celery_config(Settings(), endpoints)["broker_transport"] is None   # clients, beat, Flower: kombu's own


@pytest.mark.timeout(300)
def test_a_killed_workers_children_die_with_it_at_once(ragq_home: Path, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the worker: its engine process, its urgent consumer and its chunking processes all end within
    seconds (the engine exits when its worker's pipe closes, the others by the parent-death signal), so a
    replacement need not wait for them (on a GPU machine the chunking processes outlived a killed worker)."""
    import signal
    import time

    import psutil

    from tests.drills import start_worker, wait_ready

    proc = start_worker(ragq_home, "orphans", tmp_path / "worker.log", RAGQ_CHUNK_PROCESSES="1")
    try:
        wait_ready(client.app, proc, "orphans")
        def command(child: psutil.Process) -> str:   # a short-lived helper may end (or be a zombie) meanwhile
            try:
                return " ".join(child.cmdline())
            except psutil.Error:
                return ""

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:   # the engine and the chunking process (both spawned), the consumer
            children = psutil.Process(proc.pid).children(recursive=True)
            if sum("spawn_main" in command(c) for c in children) >= 2:
                break
            time.sleep(0.2)
        assert sum("spawn_main" in command(c) for c in children) >= 2, [command(c) for c in children]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=20)
        gone_s = time.monotonic() - t0
        for child in alive:
            child.kill()
        assert not alive, [command(c) for c in alive]
        assert gone_s < 15, gone_s
    finally:
        if proc.poll() is None:
            proc.kill()
