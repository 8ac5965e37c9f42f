"""Streamed asks against their replies on the CPU (issue [2 of 7]): how long after its reply a streamed `ask`
returns, side by side in one run: ragq's `Client.ask_stream` (the reply's waiter wakes the stream's reader) and
the reader as it was before round 2 session 7 (it looked for the reply only between blocking reads of 20 ms, which
Redis ends at its next 100 ms tick when nothing is written). A real embedded Redis and Postgres and a real
`ragq worker --device cpu` with tiny Qwen3 models (embed and generate).

    python bench/stream_tail_cpu.py --asks 8 --out bench/results/stream-tail-cpu-2026-12-04.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def old_stream(client: Any, question: str) -> dict[str, Any]:
    """The reader before the wake entry: it checks the reply only between blocking reads."""
    from ragq.core.streams import new_stream_key, read_pieces

    key = new_stream_key()
    box: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: box.update(reply=client.ask(question, timeout_s=60, stream=key)))
    waiter.start()
    last, sent = "0-0", ""
    while True:
        if not waiter.is_alive():
            answer = box["reply"]["answer"]
            if answer == sent or not answer.startswith(sent):
                break
        last, pieces = read_pieces(client._redis, key, last, 20)
        sent += "".join(pieces)
    client._redis.delete(key)
    return box["reply"]


def new_stream(client: Any, question: str) -> dict[str, Any]:
    return [part for part in client.ask_stream(question, timeout_s=60)][-1]  # type: ignore[return-value]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--asks", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.asks < 1:
        parser.error(f"--asks must be at least 1, not {args.asks}")
    from ragq.client import Client
    from ragq.demo import QUESTIONS, sample_paths
    from tests.drills import drill_services, start_worker, stop, wait_ready
    from tests.tinymodels import build_qwen3

    home = Path(tempfile.mkdtemp(prefix="ragq-stream-tail-"))
    models = home / "models.toml"
    models.write_text(f'[embed]\npath = "{build_qwen3(home / "embed", causal=False, seed=1)}"\npooling = "last"\n'
                      f'[generate]\npath = "{build_qwen3(home / "lm", causal=True, seed=2)}"\nmax_new_tokens = 64\n')
    settings, services = drill_services(home / "h")
    proc = None
    rows: dict[str, list[dict[str, float]]] = {"ragq": [], "before": []}
    try:
        client = Client(settings)
        proc = start_worker(home / "h", "tail", home / "worker.log", RAGQ_MODELS=str(models))
        wait_ready(client.app, proc, "tail")
        client.wait_for_job(client.submit_ingest(sample_paths()).job_id, timeout_s=300)
        new_stream(client, QUESTIONS[0])   # warm
        for i in range(args.asks):
            for name, ask in (("ragq", new_stream), ("before", old_stream)):
                t0 = time.perf_counter()
                reply = ask(client, QUESTIONS[i % len(QUESTIONS)])
                total = (time.perf_counter() - t0) * 1000.0
                rows[name].append({"streamed_ms": total, "reply_ms": reply["total_ms"],
                                   "tail_ms": total - reply["total_ms"]})
                print(name, rows[name][-1], flush=True)
    finally:
        if proc is not None:
            stop(proc)
        services.down()
    summary = {name: {"tail_ms_p50": statistics.median(r["tail_ms"] for r in v),
                      "tail_ms_max": max(r["tail_ms"] for r in v)} for name, v in rows.items()}
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
