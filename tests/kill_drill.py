"""Kill drill: SIGKILL a real worker in the middle of an ingestion, again and again; after the last restart every
job must complete with no chunk missing and none duplicated, and a question must still get an answer.

Runs in its own process with its own embedded Redis and Postgres (the Celery app is process-wide):

    python -m tests.kill_drill --kills 20 --docs 240 --home /tmp/drill

Prints a JSON summary; exits 1 if a check fails. tests/test_reliability.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def start_worker(home: Path, name: str, log: Path) -> subprocess.Popen[bytes]:
    from tests.conftest import ragq_env

    return subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", "cpu", "--name", name],
                            env=ragq_env(home), stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            stdin=subprocess.DEVNULL, cwd=ROOT)


def wait_ready(app: Any, proc: subprocess.Popen[bytes], name: str, timeout_s: float = 180) -> None:
    names = [f"{name}@{os.uname().nodename}", f"{name}-urgent@{os.uname().nodename}"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited {proc.returncode}")
        if len(app.control.ping(destination=names, timeout=0.5)) == len(names):
            return
    raise RuntimeError("worker not ready")


def kill_hard(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL the worker's main process (no clean shutdown, no acks); its children (engine process, urgent
    consumer) must die with it. Returns how many outlived it (then killed here, and counted as a failure)."""
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    for child in alive:
        child.kill()
    return len(alive)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--docs", type=int, default=240)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    from sqlalchemy import text

    from bench.urgent_cpu import make_corpus
    from ragq.client import Client
    from ragq.services import EmbeddedServices
    from ragq.settings import Settings

    args.home.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=args.home)
    services = EmbeddedServices(settings)
    services.up()
    rng = random.Random(args.seed)
    name = "drill"
    log = args.home / "worker.log"
    summary: dict[str, Any] = {"kills": 0, "restored": 0}
    try:
        client = Client(settings)
        job = client.submit_ingest(make_corpus(args.home / "corpus", args.docs, args.seed)).job_id
        for _ in range(args.kills):
            proc = start_worker(args.home, name, log)
            wait_ready(client.app, proc, name)
            time.sleep(rng.uniform(0.5, 2.0))  # mid-ingestion: tasks reserved, batches in the engine
            if client.job_status(job)["status"] not in ("queued", "running"):
                summary["finished_before_all_kills"] = True
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
                break
            summary["orphans"] = summary.get("orphans", 0) + kill_hard(proc)
            summary["kills"] += 1
        proc = start_worker(args.home, name, log)
        try:
            wait_ready(client.app, proc, name)
            status = client.wait_for_job(job, timeout_s=900)
            reply = client.ask("Which worker keeps the urgent questions fast?", timeout_s=120)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        with client.db.connect() as conn:
            rows = conn.execute(text("""
                SELECT count(c.id) AS n, count(DISTINCT (c.document_id, c.seq)) AS distinct_seq
                FROM job_items i LEFT JOIN chunks c ON c.document_id = i.document_id
                WHERE i.job_id = :job"""), {"job": job}).mappings().one()
            per_doc = conn.execute(text("""
                SELECT i.document_id, i.chunks, count(c.id) AS stored, min(c.seq) AS lo, max(c.seq) AS hi
                FROM job_items i LEFT JOIN chunks c ON c.document_id = i.document_id
                WHERE i.job_id = :job GROUP BY 1, 2"""), {"job": job}).mappings().all()
        log_text = log.read_text(errors="replace")
        summary["restored"] = log_text.count("put back")
        incomplete = [dict(r) for r in per_doc if not (r["stored"] == r["chunks"] and r["lo"] == 0
                                                     and r["hi"] == r["chunks"] - 1)]
        summary.update({
            "job_status": status["status"], "documents_done": status["documents_done"], "docs": args.docs,
            "chunks_stored": int(rows["n"]), "distinct_document_seq": int(rows["distinct_seq"]),
            "documents_incomplete": incomplete[:5], "answer": bool(reply.get("answer")),
        })
        ok = (status["status"] == "completed" and status["documents_done"] == args.docs and not incomplete
              and rows["n"] == rows["distinct_seq"] and summary["answer"] and not summary.get("orphans"))
        summary["ok"] = ok
    finally:
        services.down()
    print(json.dumps(summary))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
