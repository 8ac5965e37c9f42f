"""`ragq eval` on this CPU (issue [4 of 7]): a BEIR folder through a real `ragq worker --device cpu` with the default
models, idle and with busy processes beside it; beside each, the same embedder alone embedding the same chunks in
the same run (its best batch of 32, as many torch threads as the worker's engine), for the ingestion ratio; and the
recall of the first n passages (what the tuner's "fewer passages" move leaves the generator).

    python bench/eval_cpu.py --dataset ../shared/data/eval/business-reports --busy 0,2 --out out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.restart_cpu import spin, start, until_consuming  # noqa: E402
from tests.drills import drill_services, stop  # noqa: E402


def embedder_alone(home: Path, collection: str) -> dict[str, float]:
    """The chunks the worker stored for the collection, embedded again by the same model in this process."""
    import torch
    from sqlalchemy import text

    from ragq.core.db import get_engine
    from ragq.core.settings import Settings
    from workers.backends.loading import load_torch_model
    from workers.models import default_embed_spec
    from workers.start import cpu_threads

    settings = Settings(home=home)
    threads = cpu_threads(settings)
    from ragq.core.services import ensure_services

    db = get_engine(ensure_services(settings).database_url)
    with db.connect() as conn:
        texts = list(conn.execute(text("SELECT c.text FROM doc_keys k JOIN chunks c ON c.document_id = k.document_id "
                                       "WHERE k.collection = :c"), {"c": collection}).scalars())
    model = load_torch_model(default_embed_spec(), "cpu")
    model.run(texts[:8], {})
    t0 = time.perf_counter()
    for i in range(0, len(texts), 32):
        model.run(texts[i:i + 32], {})
    seconds = time.perf_counter() - t0
    del model
    torch.set_num_threads(threads)
    return {"chunks": len(texts), "seconds": seconds, "threads": threads}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--busy", default="0,2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import ir_measures
    from ir_measures import R

    from ragq.client import Client
    from ragq.evaluation import evaluate, load_dataset

    levels = [int(b) for b in args.busy.split(",")]
    if len(levels) > 1:   # one process per level: Celery's app is bound to one broker per process
        merged: dict[str, Any] = {}
        for busy in levels:
            part = args.out.with_suffix(f".{busy}busy.json")
            subprocess.run([sys.executable, __file__, "--dataset", str(args.dataset), "--busy", str(busy),
                            "--out", str(part)], check=True)
            data = json.loads(part.read_text())
            merged = {**data, "runs": {**merged.get("runs", {}), **data["runs"]}}
            part.unlink()
        args.out.write_text(json.dumps(merged, indent=2))
        return 0
    dataset = load_dataset(args.dataset)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(),
                           "dataset": str(args.dataset.resolve()), "runs": {}}
    for busy in (int(b) for b in args.busy.split(",")):
        home = Path(tempfile.mkdtemp(prefix="ragq-eval-"))
        settings, services = drill_services(home)
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
        for s in spinners:
            s.start()
        try:
            client = Client(settings)
            proc = start(Path(__file__).resolve().parent.parent, home, "eval", home / "worker.log")
            try:
                until_consuming(client.app, proc, "eval")
                result = evaluate(client, args.dataset, timeout_s=3600)
            finally:
                stop(proc)
            alone = embedder_alone(home, result["collection"])
            ranked = {s: {q: {p: float(100 - i) for i, p in enumerate(r)} for q, r in run.items()}
                      for s, run in result.pop("runs").items()}
            cut = {str(m): v for m, v in ir_measures.calc_aggregate(
                [R @ 1, R @ 3, R @ 5, R @ 10], dataset.qrels, ranked["ragq"]).items()}
            result.pop("per_query")
            row = {**result, "embedder_alone": alone,
                   "ingest_over_embedder_alone": result["ingest"]["seconds"] / alone["seconds"],
                   "recall_of_first_n": cut}
            out["runs"][f"{busy} busy"] = row
            print(f"{busy} busy: nDCG@10 ragq {result['measures']['ragq']['nDCG@10']:.4f} exact "
                  f"{result['measures']['exact']['nDCG@10']:.4f} bm25 {result['measures']['bm25']['nDCG@10']:.4f}; "
                  f"ingest {result['ingest']['seconds']:.1f} s vs embedder alone {alone['seconds']:.1f} s; "
                  f"latency p50 {result['latency_ms']['p50']:.0f} ms", flush=True)
        finally:
            for s in spinners:
                s.kill()
            services.down()
            shutil.rmtree(home, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
