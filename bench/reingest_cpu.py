"""Re-ingesting a corpus with a tenth of its documents edited (issue [3 of 7]): only the changed chunks are embedded
again, and the second ingest takes a fraction of the first. Real embedded Redis and Postgres, a real
`ragq worker --device cpu` (all-MiniLM-L6-v2), both ingests in one run.

    python bench/reingest_cpu.py --docs 200 --out bench/results/reingest-cpu-2026-12-03.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.urgent_cpu import make_corpus, start_worker  # noqa: E402
from ragq.core.services import EmbeddedServices  # noqa: E402
from ragq.core.settings import Settings  # noqa: E402


def embedded_items(client: Any, job_id: str) -> int:
    from sqlalchemy import text

    with client.db.connect() as conn:
        return int(conn.execute(text("SELECT coalesce(sum(items), 0) FROM stage_timings "
                                     "WHERE job_id = :j AND stage = 'embed'"), {"j": job_id}).scalar())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--edited", type=float, default=0.10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from ragq.client import Client
    from ragq.demo import stop_worker, wait_until_consuming

    home = Path(tempfile.mkdtemp(prefix="ragq-reingest-"))
    services = EmbeddedServices(Settings(home=home))
    services.up()
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "docs": args.docs, "edited_fraction": args.edited}
    try:
        client = Client(Settings(home=home))
        log = home / "worker.log"
        worker = start_worker(home, "ragq", log)
        try:
            wait_until_consuming(worker, log, timeout_s=300)
            corpus = make_corpus(home / "corpus", args.docs, 11)
            rounds = {}
            for name in ("first", "edited"):
                if name == "edited":
                    for path in random.Random(3).sample(corpus, int(args.docs * args.edited)):
                        text = path.read_text()
                        path.write_text(text.replace("## Section 2", "An added sentence of this revision.\n\n"
                                                                     "## Section 2"))
                t0 = time.perf_counter()
                job = client.submit_ingest(corpus).job_id
                status = client.wait_for_job(job, timeout_s=3600)
                rounds[name] = {"seconds": time.perf_counter() - t0, "chunks": status["chunks_total"],
                                "chunks_added": status["chunks_added"], "chunks_reused": status["chunks_reused"],
                                "chunks_embedded": embedded_items(client, job), "status": status["status"]}
                print(name, rounds[name], flush=True)
        finally:
            stop_worker(worker)
        result["rounds"] = rounds
        result["time_ratio"] = rounds["edited"]["seconds"] / rounds["first"]["seconds"]
        result["documents_stored"] = len(client.documents())
    finally:
        services.down()
        shutil.rmtree(home, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    first, edited = result["rounds"]["first"], result["rounds"]["edited"]
    print(f"| ingest | seconds | chunks | embedded | reused |\n|---|---|---|---|---|\n"
          f"| first | {first['seconds']:.1f} | {first['chunks']} | {first['chunks_embedded']} | {first['chunks_reused']} |\n"
          f"| {args.edited:.0%} edited | {edited['seconds']:.1f} | {edited['chunks']} | {edited['chunks_embedded']} "
          f"| {edited['chunks_reused']} |\n\ntime ratio {result['time_ratio']:.3f}, "
          f"{result['documents_stored']} documents stored")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
