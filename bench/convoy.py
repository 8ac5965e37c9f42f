"""How much Python work on other threads slows the device loop (the GIL "convoy"): one embedding micro-batch
through the engine, timed alone and while task-like threads run in the worker process, with the engine
  - "thread":  in the worker process (ragq before the engine process), at Python's default switch interval
               and at 0.5 ms;
  - "process": in its own process behind EngineClient (ragq now).

Each task-like thread loops over what ingest task threads do between engine calls: count tokens with the
transformers tokenizer, format vectors for pgvector, dump JSON; then waits on "I/O" (a short sleep).

    python3 bench/convoy.py --models /tmp/ragq-models --out $OUT
    python bench/convoy.py --tiny --device cpu --out /tmp/out
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import build_all  # noqa: E402


def texts_of(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [w for w in (ROOT / "ragq" / "samples" / "gpu-memory.md").read_text().split() if w.isalpha()]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def busy_thread(stop: threading.Event, spec: Any, texts: list[str], io_ms: float, counter: list[int]) -> None:
    from pgvector import Vector

    from workers.backends.tokens import count_tokens

    vector = [random.random() for _ in range(1024)]
    while not stop.is_set():
        count_tokens(spec, texts)
        for _ in texts:
            Vector._to_db(vector)
        json.dumps({"items": [{"text": t} for t in texts]})
        counter[0] += 1
        time.sleep(io_ms / 1000.0)


def embed_engine(models_file: Path, device: str) -> Any:
    """The engine with the embedder alone and no budget pressure (a picklable factory for the engine process)."""
    from workers.backends import load_model
    from workers.engine import Engine, EngineConfig
    from workers.models import load_model_specs

    specs = {"embed": load_model_specs(models_file)["embed"]}
    return Engine(device, specs, load_model, 2**40, config=EngineConfig(report_interval_s=0))


def time_batches(engine: Any, batch: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.run("embed", batch)  # returns once the vectors are on the host
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--words", type=int, default=150)
    parser.add_argument("--threads", default="0,2,8")
    parser.add_argument("--io-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from bench.stack_gpu import models_toml
    from workers.backends.tokens import count_tokens
    from workers.engine_process import EngineClient
    from workers.models import load_model_specs

    cuda = args.device.startswith("cuda")
    paths = build_all(args.models, "cuda" if cuda else "cpu", tiny=args.tiny)
    models_file = (args.out / "models.toml").resolve()
    models_file.write_text(models_toml(paths, args.tiny))
    spec = load_model_specs(models_file)["embed"]
    batch = texts_of(args.batch, args.words)
    task_texts = texts_of(32, args.words, seed=1)
    rows = []
    for mode, interval_ms in (("thread", 5.0), ("thread", 0.5), ("process", 5.0)):
        sys.setswitchinterval(interval_ms / 1000.0)
        if mode == "thread":
            engine = embed_engine(models_file, args.device).start()
        else:
            engine = EngineClient(args.device, {"embed": spec}, embed_engine, (models_file, args.device),
                                  token_counter=count_tokens)
        time_batches(engine, batch, 3)  # load and warm up
        for n in (int(x) for x in args.threads.split(",")):
            stop = threading.Event()
            counter = [0]
            threads = [threading.Thread(target=busy_thread, args=(stop, spec, task_texts, args.io_ms, counter))
                       for _ in range(n)]
            for thread in threads:
                thread.start()
            time.sleep(0.5 if n else 0.0)
            t0 = time.perf_counter()
            times = time_batches(engine, batch, args.repeats)
            elapsed = time.perf_counter() - t0
            stop.set()
            for thread in threads:
                thread.join()
            row = {"engine": mode, "switch_interval_ms": interval_ms, "threads": n,
                   "batch_ms_p50": statistics.median(times), "batch_ms_max": max(times),
                   "thread_loops_per_s": counter[0] / elapsed}
            rows.append(row)
            print(json.dumps(row), flush=True)
        engine.stop()
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__, "cpu_cores": os.cpu_count(), "batch": args.batch, "words": args.words,
               "io_ms": args.io_ms, "rows": rows}
    (args.out / "convoy.json").write_text(json.dumps(results, indent=2))
    base = rows[0]["batch_ms_p50"]
    print("| engine | switch interval ms | task-like threads | task loops/s | batch p50 ms | x alone |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['engine']} | {row['switch_interval_ms']} | {row['threads']} | {row['thread_loops_per_s']:.0f} "
              f"| {row['batch_ms_p50']:.1f} | {row['batch_ms_p50'] / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
