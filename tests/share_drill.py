"""Share drill: two workers under different names (as on two hosts) on one Redis and Postgres share one ingestion;
one is SIGKILLed while it holds tasks and never comes back; the other finishes the job, the dead one's tasks
coming back to it through the orphan sweep (workers/leases.py), and every document is stored once, whole.

Runs in its own process with its own embedded Redis and Postgres (the Celery app is process-wide):

    python -m tests.share_drill --docs 80 --home /tmp/share

Prints a JSON summary; exits 1 if a check fails. tests/test_reliability.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.drills import Busy, drill_services, finish_job, job_integrity, kill_hard, start_worker, stop, wait_ready  # noqa: E402

# a quicker sweep than the default minute, so that the drill is short: a lease refreshed every 2 s, a message
# nobody refreshed for 10 s goes back
FAST = {"RAGQ_LEASE_INTERVAL_S": "2", "RAGQ_ORPHAN_AFTER_S": "10"}


def finished(home: Path, name: str) -> int:
    """Ingest tasks the worker's log says it finished."""
    log = home / f"worker-{name}.log"
    if not log.exists():
        return 0
    return sum("ragq.ingest_documents[" in line and "succeeded" in line
               for line in log.read_text(errors="replace").splitlines())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--docs", type=int, default=80)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU beside the drill")
    args = parser.parse_args()
    import redis

    from bench.urgent_cpu import make_corpus
    from ragq.client import Client
    from workers.leases import lease_key

    settings, services = drill_services(args.home)
    busy = Busy(args.busy).__enter__()
    host = os.uname().nodename
    summary: dict[str, Any] = {}
    procs: dict[str, Any] = {}
    try:
        client = Client(settings)
        broker = redis.Redis.from_url(client.endpoints.broker_url)
        for name in ("alpha", "beta"):
            procs[name] = start_worker(args.home, name, args.home / f"worker-{name}.log", **FAST)
        for name, proc in procs.items():
            wait_ready(client.app, proc, name)
        corpus = make_corpus(args.home / "corpus", args.docs, args.seed)
        job = client.submit_ingest(corpus, batch_docs=2).job_id
        deadline = time.monotonic() + 600
        held: set[bytes] = set()
        while time.monotonic() < deadline and not held:   # kill alpha while it holds tasks, once both have worked
            status = client.job_status(job)
            if status["status"] not in ("queued", "running"):
                break
            if all(finished(args.home, name) for name in ("alpha", "beta")):   # each has finished a task
                held = broker.smembers(lease_key(f"alpha@{host}"))
            time.sleep(0.05)
        summary["alpha_held_at_kill"] = len(held)
        summary["orphans"] = kill_hard(procs.pop("alpha"))
        status = finish_job(client, job)
        summary.update(job_integrity(client, job, args.docs, status))
        log = (args.home / "worker-beta.log").read_text(errors="replace")
        summary["beta_put_back"] = log.count("no consumer had refreshed")
        # what each worker finished (its log: a killed worker's timing rows still buffered are lost with it)
        done = {n: finished(args.home, n) for n in ("alpha", "beta")}
        summary["ingest_tasks_logged"] = done
        summary["both_worked"] = all(done.values())
        summary["unacked_left"] = broker.hlen("unacked")
        reply = client.ask("Which worker keeps the urgent questions fast?", timeout_s=120)
        summary["answer"] = bool(reply.get("answer") or reply.get("sources"))
        summary["ok"] = (summary["ok"] and summary["alpha_held_at_kill"] > 0 and summary["beta_put_back"] >= 1
                         and summary["both_worked"] and not summary["orphans"] and summary["answer"])
    finally:
        for proc in procs.values():
            stop(proc)
        busy.__exit__(None, None, None)
        services.down()
    print(json.dumps(summary, default=str))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
