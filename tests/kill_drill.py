"""Kill drill: SIGKILL a real worker in the middle of an ingestion, again and again; after the last restart every
job must complete with no chunk missing and none duplicated, and a question must still get an answer. Then a
replacement round: a tenth of the documents edited and the corpus ingested again, with `--replace-kills` more
kills; after it exactly one version of each document is stored (the edited ones' new version), no chunk twice.

Runs in its own process with its own embedded Redis and Postgres (the Celery app is process-wide):

    python -m tests.kill_drill --kills 20 --docs 240 --home /tmp/drill

Prints a JSON summary; exits 1 if a check fails. tests/test_reliability.py runs it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.drills import (  # noqa: E402
    Busy, drill_services, finish_job, job_integrity, kill_hard, start_worker, stop, version_integrity, wait_ready,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--docs", type=int, default=240)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--replace-kills", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU beside the drill")
    args = parser.parse_args()
    from bench.urgent_cpu import make_corpus
    from ragq.client import Client

    settings, services = drill_services(args.home)
    busy = Busy(args.busy).__enter__()   # other work on the machine, for the drill's whole length
    rng = random.Random(args.seed)
    name = "drill"
    log = args.home / "worker.log"
    summary: dict[str, Any] = {"kills": 0, "restored": 0}
    try:
        client = Client(settings)
        corpus = make_corpus(args.home / "corpus", args.docs, args.seed)
        job = client.submit_ingest(corpus).job_id
        for _ in range(args.kills):
            # the drill kills faster than a task can finish, so the oldest tasks die with the worker every time: as a
            # message that kills its worker would. Lift the poison cap (RAGQ_MAX_DELIVERIES) above the kills here;
            # tests/test_reliability.py tests the cap itself.
            proc = start_worker(args.home, name, log, RAGQ_MAX_DELIVERIES="1000")
            wait_ready(client.app, proc, name)
            time.sleep(rng.uniform(0.5, 2.0))  # mid-ingestion: tasks reserved, batches in the engine
            if client.job_status(job)["status"] not in ("queued", "running"):
                summary["finished_before_all_kills"] = True
                stop(proc)
                break
            summary["orphans"] = summary.get("orphans", 0) + kill_hard(proc)
            summary["kills"] += 1
        import redis

        broker = redis.Redis.from_url(client.endpoints.broker_url)
        starts = [int(broker.get(k) or 0) for k in broker.scan_iter("ragq:deliveries:*")]
        summary["most_starts_of_one_task"] = max(starts, default=0)
        proc = start_worker(args.home, name, log, RAGQ_MAX_DELIVERIES="1000")
        try:
            wait_ready(client.app, proc, name)
            status = finish_job(client, job)
            reply = client.ask("Which worker keeps the urgent questions fast?", timeout_s=120)
            summary.update(job_integrity(client, job, args.docs, status))
            edited = sorted(rng.sample(corpus, max(1, args.docs // 10)))
            for path in edited:   # the replacement round: a tenth of the documents change
                path.write_text(path.read_text().replace("## Section 1", f"Revised: {path.stem} v2.\n\n## Section 1"))
            again = client.submit_ingest(corpus).job_id
            for _ in range(args.replace_kills):
                time.sleep(rng.uniform(0.3, 1.0))
                if client.job_status(again)["status"] not in ("queued", "running"):
                    break
                summary["orphans"] = summary.get("orphans", 0) + kill_hard(proc)
                summary["replace_kills"] = summary.get("replace_kills", 0) + 1
                proc = start_worker(args.home, name, log, RAGQ_MAX_DELIVERIES="1000")
                wait_ready(client.app, proc, name)
            replaced = finish_job(client, again)
        finally:
            stop(proc)
        summary["restored"] = log.read_text(errors="replace").count("put back")
        first_ok = summary["ok"]
        summary.update(version_integrity(client, corpus, edited, replaced))
        summary["answer"] = bool(reply.get("answer"))
        summary["ok"] = first_ok and summary["ok"] and summary["answer"] and not summary.get("orphans")
    finally:
        busy.__exit__(None, None, None)
        services.down()
    print(json.dumps(summary))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
