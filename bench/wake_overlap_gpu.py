"""A rerank beside the generator's asynchronous wake (issue [2 of 7]), outside the stack: how much the wake's copy
slows the rerank that runs meanwhile, in one run on one card. The question path does this: an urgent question's
generator is woken at its embed (RAGQ_PREWARM_GENERATOR) while its search and rerank run.

Reports: the rerank alone; the rerank beside the wake (from the wake's submission to the scores on the host); the
wake's own time (submission to copies done) alone and beside the rerank; checks that the woken weights equal the
host copy and that the scores beside the wake equal those alone.

    python3 bench/wake_overlap_gpu.py --models /tmp/m --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import build_all  # noqa: E402
from bench.stack_gpu import models_toml  # noqa: E402

DOC = ("Redis is the broker of the urgent and background queues; Postgres with pgvector stores the chunks, their "
       "vectors and the timings of every stage. The GPU worker keeps the embedder, the reranker and the generator "
       "under one memory budget and wakes each from pinned host memory when its work comes. ")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=17)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.reps < 1 or args.candidates < 1:
        parser.error("--reps and --candidates must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from workers.backends.loading import load_torch_model
    from workers.models import load_model_specs

    device = args.device

    def sync() -> None:
        torch.cuda.synchronize(device)

    paths = build_all(args.models, "cuda", roles=("embed", "rerank", "generate"))
    home = Path(tempfile.mkdtemp(prefix="ragq-wake-"))
    (home / "models.toml").write_text(models_toml(paths, False, 256))
    specs = load_model_specs(home / "models.toml")
    rerank = load_torch_model(specs["rerank"], device)
    gen = load_torch_model(specs["generate"], device)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "stable_addresses": gen.stable is not None,
                               "generator_bytes": gen.nbytes}
    items = [[f"question {i}: which settings keep urgent questions fast", DOC * 3] for i in range(args.candidates)]
    results["rerank_tokens"] = sum(rerank.count_tokens(items))
    for _ in range(3):
        reference = rerank.run(items, {})

    def timed_rerank() -> float:
        sync()
        t0 = time.perf_counter()
        rerank.run(items, {})
        return (time.perf_counter() - t0) * 1000.0

    leaves = gen._leaves()
    probe = sorted(range(len(leaves)), key=lambda i: leaves[i].get().numel())[-1:] + [0, len(leaves) - 1]
    before = {i: leaves[i].get().detach().to("cpu", copy=True) for i in probe}
    gen.sleep()
    sync()
    results["rerank_alone_ms"] = [timed_rerank() for _ in range(args.reps)]
    print(f"rerank alone: {statistics.median(results['rerank_alone_ms']):.1f} ms "
          f"({results['rerank_tokens']} tokens)", flush=True)
    row: dict[str, Any] = {"wake_alone_ms": [], "rerank_beside_ms": [], "wake_beside_ms": [], "submit_ms": []}
    for rep in range(args.reps):
        sync()
        t0 = time.perf_counter()
        ready = gen.wake(asynchronous=True)
        ready.wait()
        sync()
        row["wake_alone_ms"].append((time.perf_counter() - t0) * 1000.0)
        if rep == 0:
            leaves = gen._leaves()
            row["weights_equal"] = all(torch.equal(leaves[i].get().cpu(), before[i]) for i in probe)
        gen.sleep()
        sync()
        t0 = time.perf_counter()
        ready = gen.wake(asynchronous=True)
        t1 = time.perf_counter()
        scores = rerank.run(items, {})
        t2 = time.perf_counter()
        ready.wait()
        sync()
        t3 = time.perf_counter()
        row["submit_ms"].append((t1 - t0) * 1000.0)
        row["rerank_beside_ms"].append((t2 - t1) * 1000.0)
        row["wake_beside_ms"].append((t3 - t0) * 1000.0)
        if rep == 0:
            row["scores_max_diff"] = max(abs(a - b) for a, b in zip(scores, reference))
        gen.sleep()
        sync()
    row["median"] = {k: statistics.median(v) for k, v in row.items() if isinstance(v, list)}
    print(f"beside the wake: {row['median']}, weights equal {row['weights_equal']}, "
          f"scores differ by {row['scores_max_diff']}", flush=True)
    results["beside_wake"] = row
    (args.out / "wake-overlap.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
