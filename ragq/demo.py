"""`ragq demo`: the whole stack on the embedded default, end to end, in one command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ragq.client import Client
from ragq.core.services import EmbeddedServices
from ragq.core.settings import Settings
from ragq.replies import print_reply
from tasks.diagnostics import probe
from workers.leases import urgent_consumers

SAMPLES = Path(__file__).parent / "samples"
QUESTIONS = (
    "How long does it take to wake an 8 GB model from pinned host memory?",
    "Which Celery settings keep urgent questions from waiting behind ingestion?",
    "How many dimensions can pgvector index?",
)


def sample_paths() -> list[Path]:
    return sorted(p for p in SAMPLES.iterdir() if p.suffix in (".json", ".md", ".txt"))


def start_worker(settings: Settings, log_path: Path, name: str = "demo") -> subprocess.Popen[bytes]:
    env = dict(os.environ, RAGQ_HOME=str(settings.home))
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "ragq.cli", "worker", "--device", "cpu", "--name", name, "--loglevel", "INFO"],
        stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
    )


def wait_until_consuming(worker: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 180.0) -> None:
    """Wait until the worker runs a probe task from each queue (so both consumers consume, not merely started)."""
    from celery.exceptions import TimeoutError as CeleryTimeout


    results = [probe.apply_async(("ready",), queue=queue, expires=timeout_s) for queue in ("urgent", "background")]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with code {worker.returncode}; see {log_path}")
        try:
            results[0].get(timeout=1.0)
            results.pop(0)
            if not results:
                return
        except CeleryTimeout:
            continue
    raise RuntimeError(f"the worker did not start consuming within {timeout_s:.0f}s; see {log_path}")


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: finish running tasks
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)


def run_demo(settings: Settings, console: Console, keep_services: bool = False) -> int:
    services = EmbeddedServices(settings)
    before = services.status()
    t0 = time.monotonic()
    endpoints = services.up()
    started = [name for name in ("redis", "postgres") if before[name] == "stopped"]
    console.print(f"[bold]services[/] under {settings.home}: "
                  f"{', '.join(started) + ' started' if started else 'already running'} "
                  f"({time.monotonic() - t0:.1f}s)")
    log_path = settings.run_dir / "demo-worker.log"
    client = Client(settings, endpoints)
    running = urgent_consumers(client._redis)
    worker = None if running else start_worker(settings, log_path)
    try:
        t0 = time.monotonic()
        if worker is None:
            console.print(f"[bold]worker[/] reusing the {running} worker(s) already consuming this broker (none "
                          "started); answers come from everything ingested under this RAGQ_HOME")
        else:
            wait_until_consuming(worker, log_path)
            console.print(f"[bold]worker[/] demo@cpu started, consuming urgent,background ({time.monotonic() - t0:.1f}s;"
                          f" log {log_path})")
        t0 = time.monotonic()
        submission = client.submit_ingest(sample_paths())
        status = client.wait_for_job(submission.job_id, timeout_s=600)
        console.print(
            f"[bold]ingest[/] {status['documents_done']} documents → {status['chunks_total']} chunks, "
            f"{status['chunks_added']} new ({time.monotonic() - t0:.1f}s; job {submission.job_id})"
        )
        for failure in status["failed"]:
            console.print(f"[red]failed:[/] {failure['path']}: {failure['error']}")
        replies = []
        for question in QUESTIONS:
            console.rule()
            reply = client.ask(question, timeout_s=120, top_k=3)
            replies.append(reply)
            print_reply(reply, console)
        console.rule()
        console.print(_summary(replies))
        return 0 if not status["failed"] else 1
    finally:
        if worker is not None:
            stop_worker(worker)
        if not keep_services and started:
            stopped = services.down() if len(started) == 2 else _stop_some(services, started)
            console.print(f"[bold]stopped[/] what the demo started: {', '.join(started)} "
                          f"(pids {', '.join(str(p) for p in stopped.values() if p)})")


def _stop_some(services: EmbeddedServices, names: list[str]) -> dict[str, int | None]:
    stopped: dict[str, int | None] = {}
    if "redis" in names:
        stopped["redis_pid"] = services.stop_redis()
    if "postgres" in names:
        stopped["postgres_pid"] = services.stop_postgres()
    return stopped


def _summary(replies: list[dict[str, object]]) -> Table:
    table = Table(title="per-stage timing over the demo's questions (ms, mean)", title_justify="left")
    for column in ("stage", "queue", "load", "compute"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in ("embed", "search", "rerank", "generate"):
        rows = [r["timings"][stage] for r in replies if stage in r["timings"]]  # type: ignore[index]
        if rows:
            table.add_row(stage, *(f"{sum(t[k] for t in rows) / len(rows):.1f}"  # type: ignore[index]
                                   for k in ("queue_ms", "load_ms", "compute_ms")))
    return table
