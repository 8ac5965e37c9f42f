"""Outage drills: the embedded Redis or Postgres stopped in the middle of an ingestion, then started again, while
a real worker keeps running. After it comes back the job must complete with every chunk stored once, the worker
must be the same process (it reconnected, it was not restarted), and a question must get an answer.

    python -m tests.outage_drill --fault redis --docs 80 --home /tmp/drill
    python -m tests.outage_drill --fault postgres --docs 80 --outage-s 15 --home /tmp/drill

redis:    queued and reserved tasks live in Redis (append-only file): they must survive its restart; the worker's
          consumers and the client reconnect.
postgres: ingest tasks meet OperationalError and retry with backoff; timing rows made during the outage are kept
          in the worker's buffer and written when Postgres is back.
Runs in its own process with its own embedded Redis and Postgres; prints a JSON summary; exits 1 if a check fails.
tests/test_reliability.py runs both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.drills import Busy, drill_services, finish_job, job_integrity, start_worker, stop, wait_ready  # noqa: E402,E501


def wait_progress(client: Any, job: str, timeout_s: float = 300) -> dict[str, Any]:
    """Until some of the job's documents are done and some are not: the fault then lands mid-ingestion."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.job_status(job)
        if status["documents_done"] > 0:
            return status
        time.sleep(0.2)
    raise RuntimeError("the ingestion made no progress")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--fault", choices=("redis", "postgres"), required=True)
    parser.add_argument("--docs", type=int, default=80)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU beside the drill")
    args = parser.parse_args()
    from sqlalchemy import text

    from bench.urgent_cpu import make_corpus
    from ragq.client import Client

    settings, services = drill_services(args.home)
    busy = Busy(args.busy).__enter__()   # other work on the machine, for the drill's whole length
    name = "outage"
    log = args.home / "worker.log"
    summary: dict[str, Any] = {"fault": args.fault}
    try:
        client = Client(settings)
        proc = start_worker(args.home, name, log)
        try:
            wait_ready(client.app, proc, name)
            job = client.submit_ingest(make_corpus(args.home / "corpus", args.docs, args.seed)).job_id
            before = wait_progress(client, job)
            summary["done_before_fault"] = before["documents_done"]
            outage_start = datetime.now(timezone.utc)
            if args.fault == "redis":
                import redis

                r = redis.Redis.from_url(client.endpoints.broker_url)
                summary["queued_before_fault"] = r.llen("background")
                summary["unacked_before_fault"] = r.hlen("unacked")
                summary["stopped_pid"] = services.stop_redis()
                time.sleep(args.outage_s)
                services.start_redis()
                summary["queued_after_restart"] = r.llen("background")
                summary["unacked_after_restart"] = r.hlen("unacked")
            else:
                summary["stopped_pid"] = services.stop_postgres()
                time.sleep(args.outage_s)
                services.start_postgres()
            outage_end = datetime.now(timezone.utc)
            status = finish_job(client, job)
            reply = client.ask("Which worker keeps the urgent questions fast?", timeout_s=120)
            # a new submission after the fault: the client publishes again
            second = client.submit_ingest(make_corpus(args.home / "corpus2", 4, args.seed + 1)).job_id
            second_status = finish_job(client, second)
            summary["worker_survived"] = proc.poll() is None
            time.sleep(3)   # the sink's next flush
        finally:
            stop(proc)
        summary.update(job_integrity(client, job, args.docs, status))
        with client.db.connect() as conn:
            summary["timing_rows_during_outage"] = conn.execute(text(
                "SELECT count(*) FROM stage_timings WHERE finished_at BETWEEN :a AND :b"),
                {"a": outage_start, "b": outage_end}).scalar_one()
        summary["answer"] = bool(reply.get("answer"))
        summary["second_job"] = second_status["status"]
        summary["ok"] = bool(summary["ok"] and summary["answer"] and summary["worker_survived"]
                             and second_status["status"] == "completed")
        if args.fault == "redis":   # what was queued or reserved came back with Redis
            summary["ok"] = summary["ok"] and summary["queued_after_restart"] + summary["unacked_after_restart"] > 0
        else:                       # rows made while the database was away were written later
            summary["ok"] = summary["ok"] and summary["timing_rows_during_outage"] > 0
    finally:
        busy.__exit__(None, None, None)
        services.down()
    print(json.dumps(summary, default=str))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
