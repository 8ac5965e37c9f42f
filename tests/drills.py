"""Helpers shared by the drills (tests/kill_drill.py, tests/outage_drill.py): a real worker started and stopped as
a user runs it, and the checks that a job came through a fault whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def start_worker(home: Path, name: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    from tests.conftest import ragq_env

    return subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", "cpu", "--name", name],
                            env=ragq_env(home, **env), stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
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


def drill_services(home: Path) -> tuple[Any, Any]:
    """(settings, services) of a drill's own home, with its embedded Redis and Postgres up."""
    from ragq.core.services import EmbeddedServices
    from ragq.core.settings import Settings

    home.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=home)
    services = EmbeddedServices(settings)
    services.up()
    return settings, services


def finish_job(client: Any, job: str, stall_s: float = 240.0, poll_s: float = 0.5) -> dict[str, Any]:
    """Wait for a job as long as it moves: fail only after `stall_s` with no document done, not after a fixed
    time, so a drill on a busy machine takes longer instead of failing."""
    last, moved = None, time.monotonic()
    while True:
        status = client.job_status(job)
        if status["status"] in ("completed", "completed_with_errors", "failed"):
            return status
        progress = (status["documents_done"], status["documents_failed"], status.get("chunks_total"))
        if progress != last:
            last, moved = progress, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            raise RuntimeError(f"job {job} made no progress for {stall_s:.0f} s: {status}; broker: "
                               f"{broker_state(client)}")
        time.sleep(poll_s)


def broker_state(client: Any) -> dict[str, Any]:
    """Where a stalled job's messages are: queued, unacked (and how long since refreshed), named by a lease."""
    import redis

    from workers.leases import UNACKED_HASH, UNACKED_INDEX

    r = redis.Redis.from_url(client.endpoints.broker_url)
    now = time.time()
    leases = {k.decode(): sorted(m.decode() for m in r.smembers(k)) for k in r.scan_iter("ragq:leases:*")}
    return {
        "queued": {q: r.llen(q) for q in ("background", "urgent")},
        "unacked": r.hlen(UNACKED_HASH),
        "unacked_age_s": [round(now - score) for _, score in r.zrange(UNACKED_INDEX, 0, -1, withscores=True)],
        "leases": leases,
    }


class Busy:
    """`count` processes spinning on the CPU beside a drill (as other work on a shared host), for its duration."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
                      for _ in range(self.count)]
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def job_integrity(client: Any, job: str, docs: int, status: dict[str, Any]) -> dict[str, Any]:
    """Every document of the job stored whole, each chunk once: no gap in sequence numbers, no (document, seq)
    twice. Returns the summary fields and `ok`."""
    from sqlalchemy import text

    with client.db.connect() as conn:
        rows = conn.execute(text("""
            SELECT count(c.id) AS n, count(DISTINCT (c.document_id, c.seq)) AS distinct_seq
            FROM job_items i LEFT JOIN chunks c ON c.document_id = i.document_id
            WHERE i.job_id = :job"""), {"job": job}).mappings().one()
        per_doc = conn.execute(text("""
            SELECT i.document_id, i.chunks, count(c.id) AS stored, min(c.seq) AS lo, max(c.seq) AS hi
            FROM job_items i LEFT JOIN chunks c ON c.document_id = i.document_id
            WHERE i.job_id = :job GROUP BY 1, 2"""), {"job": job}).mappings().all()
    incomplete = [dict(r) for r in per_doc if not (r["stored"] == r["chunks"] and r["lo"] == 0
                                                 and r["hi"] == r["chunks"] - 1)]
    summary = {
        "job_status": status["status"], "documents_done": status["documents_done"], "docs": docs,
        "chunks_stored": int(rows["n"]), "distinct_document_seq": int(rows["distinct_seq"]),
        "documents_incomplete": incomplete[:5],
    }
    summary["ok"] = (status["status"] == "completed" and status["documents_done"] == docs and not incomplete
                     and rows["n"] == rows["distinct_seq"])
    return summary


def version_integrity(client: Any, corpus: list[Any], edited: list[Any], status: dict[str, Any]) -> dict[str, Any]:
    """After a replacement round: every document's key names one version, the edited ones' new version (its
    chunks carry the edit), no version no key names is left, and no (document, seq) is stored twice."""
    from sqlalchemy import text

    from ragq.core.keys import path_key

    with client.db.connect() as conn:
        keys = dict(conn.execute(text("SELECT key, document_id FROM doc_keys WHERE collection = 'default'")).all())
        orphans = conn.execute(text("SELECT count(*) FROM documents d WHERE NOT EXISTS "
                                    "(SELECT 1 FROM doc_keys k WHERE k.document_id = d.id)")).scalar()
        twice = conn.execute(text("SELECT count(*) - count(DISTINCT (document_id, seq)) FROM chunks")).scalar()
        revised = set(conn.execute(text(
            "SELECT k.key FROM doc_keys k JOIN chunks c ON c.document_id = k.document_id "
            "WHERE c.text LIKE '%Revised: doc-%'")).scalars())
    wanted = {path_key(p) for p in corpus}
    summary = {"replace_status": status["status"], "chunks_reused": status.get("chunks_reused"),
               "keys": len(keys), "stale_versions": int(orphans), "chunks_twice": int(twice),
               "edited": len(edited), "edited_current": len(revised & {path_key(p) for p in edited})}
    summary["ok"] = (status["status"] == "completed" and set(keys) == wanted and orphans == 0 and twice == 0
                     and revised == {path_key(p) for p in edited})
    return summary
