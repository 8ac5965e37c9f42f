"""Urgent questions under ingestion load, on the CPU, through the whole stack (issue [3 of 8]).

Real embedded Redis and Postgres, a real `ragq worker --device cpu` (all-MiniLM-L6-v2), two Celery profiles side
by side in one run:

  ragq             priority queue order, prefetch 1, late acks, ingest tasks sized to about one micro-batch
  celery-defaults  round-robin queue order, prefetch 4, early acks (Celery's defaults), same tasks
  ...+large-tasks  the same with one ingest task per 32 documents (tasks many micro-batches long)

For each: `ask` latency (client-measured, sequential questions) while idle and while a large ingestion saturates
the worker, and the ingestion throughput of that job from submission to completion (questions included). Writes a JSON file and prints a markdown table.

    python bench/urgent_cpu.py --docs 800 --questions 30 --out bench/results/urgent-cpu-2026-11-27.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ragq.demo import QUESTIONS, sample_paths  # noqa: E402
from ragq.core.services import EmbeddedServices  # noqa: E402
from ragq.core.settings import Settings  # noqa: E402

WORDS = ("the worker queue batch model memory urgent background question answer chunk vector index search rerank "
         "embed generate latency throughput budget residency pinned host device card load wake sleep evict").split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def make_corpus(folder: Path, docs: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(docs):
        sections = []
        for s in range(3):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
                         for _ in range(rng.randint(6, 12))]
            sections.append(f"## Section {s} of document {d} ({seed})\n\n" + " ".join(sentences))
        path = folder / f"doc-{seed}-{d}.md"
        path.write_text(f"# Document {d}\n\n" + "\n\n".join(sections) + "\n")
        paths.append(path)
    return paths


def start_worker(home: Path, profile: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, RAGQ_HOME=str(home), RAGQ_CELERY_PROFILE=profile)
    return subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", "cpu", "--name", profile],
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115


def ask_many(client: Any, count: int, timeout_s: float, busy_job: str | None = None,
             collection: str | None = None) -> tuple[list[float], int]:
    """Sequential questions (in `collection`, default the default one); with `busy_job`, only those answered while
    that job was still running count, and asking stops when it finishes (so 'loaded' numbers are never partly
    idle)."""
    from ragq.core.errors import QuestionTimeout

    latencies, timeouts = [], 0
    for i in range(count):
        t0 = time.perf_counter()
        try:
            client.ask(QUESTIONS[i % len(QUESTIONS)], timeout_s=timeout_s, top_k=3, collection=collection)
            elapsed = (time.perf_counter() - t0) * 1000.0
        except QuestionTimeout:
            timeouts += 1
            continue
        if busy_job is not None and client.job_status(busy_job)["status"] != "running":
            break
        latencies.append(elapsed)
    return latencies, timeouts


def run_profile(client: Any, home: Path, variant: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from ragq.demo import stop_worker, wait_until_consuming
    from workers.celery_app import app

    profile, _, sizing = variant.partition("+")
    base = client.settings
    if sizing == "large-tasks":  # one task per 32 documents, whatever their size
        client.settings = base.model_copy(update={"ingest_batch_docs": 32, "ingest_task_tokens": 10**9})
    app.control.purge()
    log = home / f"worker-{variant}.log"
    worker = start_worker(home, profile, log)
    try:
        wait_until_consuming(worker, log)
        client.wait_for_job(client.submit_ingest(sample_paths()).job_id, timeout_s=300)
        client.ask(QUESTIONS[0], timeout_s=60)  # warm: model loaded, connections open
        idle, idle_timeouts = ask_many(client, args.questions, args.timeout)
        corpus = make_corpus(home / f"corpus-{profile}", args.docs, seed)
        submission = client.submit_ingest(corpus)
        t0 = time.perf_counter()
        time.sleep(args.settle)  # let the backlog build and the worker saturate
        loaded, loaded_timeouts = ask_many(client, args.questions, args.timeout, busy_job=submission.job_id)
        during = client.job_status(submission.job_id)
        still_running = during["status"] not in ("completed", "completed_with_errors", "failed")
        status = client.wait_for_job(submission.job_id, timeout_s=1800)
        elapsed = time.perf_counter() - t0
    finally:
        client.settings = base
        app.control.purge()
        stop_worker(worker)
    return {
        "profile": variant, "idle_ms": idle, "loaded_ms": loaded,
        "idle_p50": statistics.median(idle), "idle_p95": percentile(idle, 0.95),
        "loaded_p50": statistics.median(loaded) if loaded else float("nan"),
        "loaded_p95": percentile(loaded, 0.95), "loaded_max": max(loaded) if loaded else float("nan"),
        "loaded_first": loaded[0] if loaded else float("nan"), "loaded_questions": len(loaded),
        "timeouts": idle_timeouts + loaded_timeouts,
        "ingest_chunks_per_s": status["chunks_total"] / elapsed, "ingest_chunks": status["chunks_total"],
        "ingest_s": elapsed, "ingestion_still_running_after_questions": still_running,
        "documents_done_during_questions": during["documents_done"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=800)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--profiles", default="ragq,celery-defaults,ragq+large-tasks,celery-defaults+large-tasks")
    parser.add_argument("--out", type=Path, default=Path("bench/results/urgent-cpu.json"))
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ragq-bench-"))
    settings = Settings(home=home)
    services = EmbeddedServices(settings)
    services.up()
    from ragq.client import Client

    client = Client(settings)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, no GPU",
                               "docs": args.docs, "questions": args.questions,
                               "worker_concurrency": settings.worker_concurrency, "profiles": {}}
    try:
        for n, profile in enumerate(args.profiles.split(",")):
            results["profiles"][profile] = run_profile(client, home, profile, args, seed=n + 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
            print(json.dumps({k: v for k, v in results["profiles"][profile].items() if not k.endswith("_ms")}),
                  flush=True)
    finally:
        services.down()
        shutil.rmtree(home, ignore_errors=True)
    print("\n| profile | idle p50 ms | idle p95 ms | loaded p50 ms | loaded p95 ms | loaded max ms | first loaded ms "
          "| p95 loaded/idle | timeouts | ingest chunks/s |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["profiles"].items():
        print(f"| {name} | {r['idle_p50']:.0f} | {r['idle_p95']:.0f} | {r['loaded_p50']:.0f} | {r['loaded_p95']:.0f} "
              f"| {r['loaded_max']:.0f} | {r['loaded_first']:.0f} | {r['loaded_p95'] / r['idle_p95']:.1f}x "
              f"| {r['timeouts']} | {r['ingest_chunks_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
