"""Idle `ask` latency over many sequential questions, through the whole stack on the CPU.

Real embedded Redis and Postgres under HOME, a real `ragq worker --device cpu` (all-MiniLM-L6-v2), the sample
corpus ingested, 10 warm-up questions, then N timed ones (client-measured). Prints one JSON line.

    python bench/idle_ask.py --home /tmp/idle --questions 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ragq.client import Client  # noqa: E402
from ragq.core.services import EmbeddedServices  # noqa: E402
from ragq.core.settings import Settings  # noqa: E402
from ragq.demo import sample_paths, wait_until_consuming  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    if args.questions < 1:
        parser.error("--questions must be at least 1")
    settings = Settings(home=args.home)
    services = EmbeddedServices(settings)
    services.up()
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, RAGQ_HOME=str(args.home), RAGQ_METRICS_PORT="0", PYTHONPATH=root)
    log_path = args.home / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", "cpu", "--name", "idle"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        client = Client(settings)
        wait_until_consuming(worker, log_path)
        client.wait_for_job(client.submit_ingest(sample_paths()).job_id, timeout_s=300)
        for _ in range(10):
            client.ask("How long does a model take to wake?", timeout_s=30)
        ms = []
        for i in range(args.questions):
            t0 = time.perf_counter()
            client.ask(f"How long does a model take to wake? ({i})", timeout_s=30)
            ms.append((time.perf_counter() - t0) * 1000.0)
        ms.sort()
        n = len(ms)
        print(json.dumps({"questions": n, "p50_ms": round(statistics.median(ms), 1),
                          "p95_ms": round(ms[int(0.95 * (n - 1))], 1), "p99_ms": round(ms[int(0.99 * (n - 1))], 1),
                          "max_ms": round(ms[-1], 1)}))
    finally:
        worker.terminate()
        worker.wait(60)
        services.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
