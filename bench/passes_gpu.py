"""How a micro-batch of mixed lengths should run on the device (issue [3 of 8]): one forward pass padded to its
longest item, or length-sorted passes (`scheduler.batching.length_groups`) with a given fixed cost per pass.

The micro-batches are the ones the stack forms: the chunks of a generated corpus, split into ingest tasks as
`submit_ingest` splits them, and batched by `form_batch` (the oldest request whole, then items closest in length)
with eight requests in flight, at the settled size of 128 items and the 32768-token cap. Each variant runs all of
them on the full-size random-weight Qwen3-Embedding-4B; the variants alternate over `--rounds` rounds (drift of the
card's clocks falls on all of them), and the raw pass — all chunks length-sorted, batches of 128 — runs in each
round too. With `--packed`, a second copy of the model runs the same batches packed (one padding-free forward pass
per batch, `workers.backends.packed`), and the raw pass packed too, sorted and in corpus order; the vectors of both
copies are compared.

    python3 bench/passes_gpu.py --models /tmp/ragq-models --out $OUT
    python bench/passes_gpu.py --tiny --device cpu --docs 20 --out /tmp/out      # dry run of the logic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import build_all  # noqa: E402
from bench.stack_gpu import models_toml  # noqa: E402
from bench.urgent_cpu import make_corpus  # noqa: E402

ONE_PASS = 10**9


def stack_batches(requests: list[list[int]], max_items: int, max_tokens: int, in_flight: int) -> list[list[tuple[int, int]]]:
    """The micro-batches `form_batch` makes of these requests (item token lengths), `in_flight` at a time; each
    batch as [(request, item index)]."""
    from scheduler.batching import BACKGROUND, BatchLimits, Pending, form_batch

    limits = BatchLimits(max_items=max_items, max_tokens=max_tokens, urgent_items=8)
    left = {k: list(range(len(r))) for k, r in enumerate(requests)}
    waiting = list(range(len(requests)))
    active: list[int] = []
    batches = []
    while waiting or active:
        while waiting and len(active) < in_flight:
            active.append(waiting.pop(0))
        pending = [Pending(k, "embed", (), BACKGROUND, float(k), tuple((i, requests[k][i]) for i in left[k]))
                   for k in active]
        plan = form_batch(pending, "embed", limits)
        batch = []
        for key, indices in plan:
            batch += [(key, i) for i in indices]
            left[key] = [i for i in left[key] if i not in set(indices)]
        active = [k for k in active if left[k]]
        batches.append(batch)
    return batches


def _burn() -> None:
    os.nice(10)
    x = 0
    while True:
        x = (x * 31 + 7) % 1000003


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--overheads", default="256,512,1024,2048,4096")
    parser.add_argument("--sustain-s", type=float, default=0.0,
                        help="then run the stack batches (default passes) this long, rate and clocks per 5 s window")
    parser.add_argument("--budget-gib", type=float, default=0.0,
                        help="cap the process's device memory as the worker does (set_per_process_memory_fraction)")
    parser.add_argument("--ballast-gib", type=float, default=0.0,
                        help="device memory held by other resident models (a tensor of this size)")
    parser.add_argument("--cpu-load", type=int, default=0,
                        help="this many busy processes at nice 10 during the timings (as the chunking processes, "
                             "Postgres and the consumers load the host during an ingestion)")
    parser.add_argument("--packed", action="store_true", help="also run every batch packed (padding-free)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    from ragq.core.chunking import chunk_document, make_chunker
    from ragq.core.documents import load_document
    from workers.backends.loading import load_torch_model
    from workers.models import load_model_specs

    cuda = args.device.startswith("cuda")
    home = Path(tempfile.mkdtemp(prefix="ragq-passes-"))
    paths = build_all(args.models, "cuda" if cuda else "cpu", tiny=args.tiny, roles=("embed",))
    (home / "models.toml").write_text(models_toml({**paths, "rerank": Path("-"), "generate": Path("-")}, args.tiny))
    spec = load_model_specs(home / "models.toml")["embed"]
    from transformers import AutoTokenizer

    chunker = make_chunker(AutoTokenizer.from_pretrained(spec.path), spec.chunk_tokens)
    if cuda and args.budget_gib:
        index = torch.device(args.device).index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(args.budget_gib * 2**30 / total, index)
    ballast = torch.empty(int(args.ballast_gib * 2**30), dtype=torch.uint8, device=args.device) \
        if args.ballast_gib else None
    model = load_torch_model(dataclasses.replace(spec, packed="off"), args.device)
    packed_model = load_torch_model(dataclasses.replace(spec, packed="on"), args.device) if args.packed else None
    if packed_model is not None and not packed_model.packed:
        raise SystemExit("--packed: the model could not be switched to packed forward passes (see the log)")
    # ingest tasks as submit_ingest makes them: 8 documents or ~8192 tokens of text each
    texts: list[list[str]] = [[]]
    docs_in_task, tokens_in_task = 0, 0
    for path in make_corpus(home / "corpus", args.docs, 1):
        doc = load_document(path)
        chunks = [c.embed_text for c in chunk_document(doc.document, chunker, spec.name, doc.document_id)]
        if docs_in_task >= 8 or tokens_in_task >= 8192:
            texts.append([])
            docs_in_task, tokens_in_task = 0, 0
        texts[-1] += chunks
        docs_in_task += 1
        tokens_in_task += sum(model.count_tokens(chunks))
    lengths = [model.count_tokens(t) for t in texts]
    formed = stack_batches(lengths, 128, spec.max_batch_tokens, 8)
    batches = [[texts[k][i] for k, i in b] for b in formed]
    batch_lengths = [[lengths[k][i] for k, i in b] for b in formed]
    every = [t for request in texts for t in request]
    every_len = [n for request in lengths for n in request]
    ordered = [t for _, t in sorted(zip(every_len, every))]
    raw_batches = [ordered[i:i + 128] for i in range(0, len(ordered), 128)]
    chunks = len(every)
    print(f"{chunks} chunks in {len(texts)} tasks; {len(batches)} stack batches "
          f"(mean {chunks / len(batches):.1f} items), {len(raw_batches)} raw batches", flush=True)

    from scheduler.batching import length_groups, padded_tokens

    variants: dict[str, Any] = {"one pass": ONE_PASS, **{f"passes, overhead {o}": int(o) for o in args.overheads.split(",")}}
    real = sum(every_len)
    efficiency = {name: real / sum(sum(padded_tokens([b[i] for i in g]) for g in length_groups(b, o))
                                   for b in batch_lengths) for name, o in variants.items()}
    passes = {name: sum(len(length_groups(b, o)) for b in batch_lengths) for name, o in variants.items()}
    rates: dict[str, list[float]] = {name: [] for name in [*variants, "raw (sorted, 128)"]}
    raw_in_order = [every[i:i + 128] for i in range(0, len(every), 128)]
    packed_runs = {"packed (stack batches)": batches, "raw packed (sorted, 128)": raw_batches,
                   "raw packed (corpus order, 128)": raw_in_order} if packed_model is not None else {}
    rates.update({name: [] for name in packed_runs})
    agreement = None
    if packed_model is not None:   # the same vectors from both paths (bf16 on a GPU: not bit-equal)
        import numpy as np

        a, b = np.array(model.run(batches[0], {})), np.array(packed_model.run(batches[0], {}))
        agreement = float((a * b).sum(axis=1).min())
        print(f"packed vs padded vectors: lowest cosine {agreement:.5f} over {len(a)} chunks", flush=True)

    phases: dict[str, dict[str, float]] = {}

    def timed(run_batches: list[list[str]], name: str = "", runner: Any = None) -> float:
        runner = runner or model
        sums: dict[str, float] = {}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in run_batches:
            for key, value in runner.execute(b, {}).phases.items():
                sums[key] = sums.get(key, 0.0) + value
        phases[name] = sums   # the last round's
        if cuda:
            torch.cuda.synchronize()
        return sum(len(b) for b in run_batches) / (time.perf_counter() - t0)

    model.run(batches[0], {})   # warm-up
    if packed_model is not None:
        packed_model.run(batches[0], {})
    import multiprocessing

    burners = [multiprocessing.get_context("spawn").Process(target=_burn, daemon=True) for _ in range(args.cpu_load)]
    for b in burners:
        b.start()
    for r in range(args.rounds):
        for name, overhead in variants.items():
            model.spec = dataclasses.replace(spec, pass_overhead_tokens=overhead, fit_pass_overhead=False)
            rates[name].append(timed(batches, name))
            print(f"round {r + 1} {name}: {rates[name][-1]:.1f} chunks/s", flush=True)
        model.spec = dataclasses.replace(spec, pass_overhead_tokens=ONE_PASS, fit_pass_overhead=False)
        rates["raw (sorted, 128)"].append(timed(raw_batches, "raw (sorted, 128)"))
        print(f"round {r + 1} raw: {rates['raw (sorted, 128)'][-1]:.1f} chunks/s", flush=True)
        for name, run_batches in packed_runs.items():
            rates[name].append(timed(run_batches, name, packed_model))
            print(f"round {r + 1} {name}: {rates[name][-1]:.1f} chunks/s", flush=True)
    sustained = []
    if args.sustain_s > 0:   # does the card hold its rate over a stack-length run (clocks, power)?
        import subprocess

        model.spec = spec
        t_end = time.perf_counter() + args.sustain_s
        while time.perf_counter() < t_end:
            rate = timed(batches[: max(1, len(batches) // 2)])
            query = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                                    "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() \
                if cuda else ""
            sustained.append({"chunks_per_s": rate, "sm_clock_power_temp": query})
            print(f"sustained: {rate:.1f} chunks/s  {query}", flush=True)
    for b in burners:
        b.terminate()
    raw = max(rates["raw (sorted, 128)"])
    results = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "docs": args.docs, "chunks": chunks,
        "mean_tokens": real / chunks, "stack_batches": len(batches), "rates": rates,
        "cpu_load": args.cpu_load, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "budget_gib": args.budget_gib,
        "ballast_gib": args.ballast_gib if ballast is not None else 0.0,
        "fitted_pass_overhead_tokens": model.pass_costs.overhead_tokens(), "phases_ms": phases, "real_over_padded": efficiency, "forward_passes": passes, "sustained": sustained,
        "packed_vs_padded_lowest_cosine": agreement,
    }
    (args.out / "passes.json").write_text(json.dumps(results, indent=2))
    print("\n| variant | forward passes | real / padded tokens | best chunks/s | / raw |\n|---|---|---|---|---|")
    for name in rates:
        best = max(rates[name])
        count = len(packed_runs[name]) if name in packed_runs else passes.get(name, len(raw_batches))
        print(f"| {name} | {count} | {efficiency.get(name, 1.0):.3f} | {best:.1f} "
              f"| {best / raw:.3f} |")
    print(f"pass overhead fitted from all the batches above: {model.pass_costs.overhead_tokens()} tokens")
    for name, sums in phases.items():
        if name:
            print(f"phases of {name} (ms, all batches): " + " ".join(f"{k} {v:.0f}" for k, v in sums.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
