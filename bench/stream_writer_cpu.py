"""The answer streams' writer thread on the CPU (issue [2 of 7]): the CPU time of the process (the same producer,
the writer thread differing) in the engine's process,
to stream 16 answers growing together (16 pieces every 4.4 ms, an H200's decode step at 16 rows), side by side in
one run: ragq's writer (the pieces of one stream queued together as one entry, a stream's expiry set once)
against one command per piece and an expiry per stream each flush (the writer before round 2 session 7). That
thread shares the GIL with the decode loop. Needs the embedded Redis (`ragq services up`).

    python bench/stream_writer_cpu.py --out bench/results/stream-writer-cpu-2026-12-04.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragq.core.streams import MAX_ENTRIES, TTL_S, StreamWriter, new_stream_key  # noqa: E402


class PerPieceWriter(StreamWriter):
    """One XADD per piece and an EXPIRE per stream at every flush."""

    def _run(self) -> None:
        import queue

        import redis

        client = redis.Redis.from_url(self.redis_url)
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pipe = client.pipeline(transaction=False)
            for key, piece in batch:
                pipe.xadd(key, {"p": piece}, maxlen=MAX_ENTRIES, approximate=True)
            for key in {key for key, _ in batch}:
                pipe.expire(key, TTL_S)
            pipe.execute()


def run(writer: StreamWriter, client: object, streams: int, steps: int, step_s: float) -> dict[str, float]:
    keys = [new_stream_key() for _ in range(streams)]
    t0 = time.perf_counter()
    next_at = t0
    for step in range(steps):
        for key in keys:
            writer(key, f"w{step} ")
        next_at += step_s
        time.sleep(max(0.0, next_at - time.perf_counter()))
    # wait until every stream holds its whole text
    want = "".join(f"w{s} " for s in range(steps))
    deadline = time.monotonic() + 30
    for key in keys:
        while time.monotonic() < deadline:
            text = "".join(f[b"p"].decode() for _, f in client.xrange(key))  # type: ignore[attr-defined]
            if text == want:
                break
            time.sleep(0.01)
    wall = time.perf_counter() - t0
    entries = sum(client.xlen(key) for key in keys)  # type: ignore[attr-defined]
    for key in keys:
        client.delete(key)  # type: ignore[attr-defined]
    return {"wall_s": wall, "entries": entries}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=4.4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if min(args.streams, args.steps, args.repeats) < 1 or args.step_ms < 0:
        parser.error("--streams, --steps and --repeats must be at least 1, --step-ms at least 0")
    import redis

    from ragq.core.settings import Settings
    from ragq.client import Client

    url = Client(Settings()).endpoints.broker_url
    client = redis.Redis.from_url(url)
    results: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "streams": args.streams, "steps": args.steps,
                                  "step_ms": args.step_ms}
    rows: dict[str, list[dict[str, float]]] = {"ragq": [], "per-piece": []}
    for _ in range(args.repeats):
        for name, cls in (("ragq", StreamWriter), ("per-piece", PerPieceWriter)):
            writer = cls(url)
            before = time.process_time()
            row = run(writer, client, args.streams, args.steps, args.step_ms / 1000.0)
            row["process_cpu_s"] = time.process_time() - before
            rows[name].append(row)
            print(name, row, flush=True)
    summary = {name: {"process_cpu_ms_per_step": statistics.median(r["process_cpu_s"] for r in v) * 1000 / args.steps,
                      "entries": statistics.median(r["entries"] for r in v)} for name, v in rows.items()}
    results["rows"], results["summary"] = rows, summary
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
