"""The generator's decode loop against transformers' `generate` (eager dynamic cache, and static cache compiled),
in one run on one card (issue [2 of 7]): random-weight Qwen3-4B in bf16, 1,024-token prompts, 256 new tokens,
greedy, eos ignored so every sequence runs its full length.

Reports, side by side: tokens/s for 1 and 16 sequences (end to end from submission, and decode steps alone), the
bound (weights bytes / the device-to-device copy rate measured here), the loop without graphs, graph capture
times, greedy agreement with `generate` on short prompts, and a sleep + wake with sequences in flight (the wake,
the recapture, the first step after it, against bytes / the pinned host-to-device rate measured here).

    python3 bench/decode_gpu.py --models /tmp/ragq-models --out $OUT
    python bench/decode_gpu.py --tiny --device cpu --prompt 64 --new 16 --out /tmp/out   # dry run of the logic
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import build_all  # noqa: E402


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_rates(device: str) -> dict[str, float]:
    """Device-to-device (bytes read + written per second) and pinned host-to-device rates, median of 10."""
    import torch

    if not device.startswith("cuda"):
        return {"d2d_bytes_per_s": 0.0, "h2d_bytes_per_s": 0.0}
    n = 2 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    host = torch.empty(n // 2, dtype=torch.uint8, pin_memory=True)
    out = {}
    ops = {"d2d_bytes_per_s": (lambda: b.copy_(a), 2 * n),
           "h2d_bytes_per_s": (lambda: b[: n // 2].copy_(host, non_blocking=True), n // 2)}
    for name, (op, nbytes) in ops.items():
        times = []
        for _ in range(12):
            sync(device)
            t0 = time.perf_counter()
            op()
            sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = nbytes / statistics.median(times[2:])
    ops.clear()
    torch.cuda.empty_cache()
    return out


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    low, high = (1000, vocab - 1000) if vocab > 4000 else (10, vocab - 10)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(count)]


def run_loop(gen: Any, batch: list[list[int]], new: int) -> dict[str, float]:
    """All of `batch` submitted at once; end-to-end tokens/s, and the decode steps' rate once all are running."""
    from workers.backends.decode import Sequence

    loop = gen.loop
    sequences = [Sequence(key=i, prompt=list(p), max_new=new) for i, p in enumerate(batch)]
    sync(str(gen.device))
    waited0, steps0 = loop.counters["wait_ms"], loop.counters["steps"]
    t0 = time.perf_counter()
    for s in sequences:
        loop.add(s)
    full_steps, full_s = 0, 0.0
    all_running = 0.0
    while any(s.done is None for s in sequences):
        together = len(loop.running) == len(batch) and not loop.prefilling
        if together and not all_running:
            all_running = time.perf_counter() - t0
        t_step = time.perf_counter()
        loop.step()          # launches a step and reads one (the one before it, with overlap): a step's time
        if together and all(s.done is None for s in sequences):
            full_steps += 1
            full_s += time.perf_counter() - t_step
    total = time.perf_counter() - t0
    tokens = sum(len(s.generated) for s in sequences)
    return {"tokens": tokens, "seconds": total, "tokens_per_s": tokens / total, "all_running_s": all_running,
            "decode_tokens_per_s": (full_steps * len(batch) / full_s) if full_s else 0.0,
            "step_ms": (full_s / full_steps * 1000.0) if full_steps else 0.0,
            # of a step, the host waiting for the card's tokens (the rest: launches, text)
            "wait_ms_per_step": (loop.counters["wait_ms"] - waited0) / max(1, loop.counters["steps"] - steps0)}


def run_hf(gen: Any, batch: list[list[int]], new: int, static: bool) -> dict[str, float]:
    import torch

    ids = torch.tensor(batch, device=gen.device)
    kwargs: dict[str, Any] = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
                              "temperature": None, "top_p": None, "top_k": None, "pad_token_id": 0}
    if static:
        kwargs["cache_implementation"] = "static"
    sync(str(gen.device))
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = gen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    sync(str(gen.device))
    seconds = time.perf_counter() - t0
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def agreement(gen: Any, vocab: int, device: str) -> dict[str, Any]:
    """Greedy tokens of the loop and of `generate` (eager) on 4 short prompts together: the first divergence."""
    import torch

    batch = prompts(4, 64, vocab, seed=7)
    loop_out = []
    from workers.backends.decode import Sequence

    sequences = [Sequence(key=i, prompt=p, max_new=32) for i, p in enumerate(batch)]
    for s in sequences:
        gen.loop.add(s)
    while any(s.done is None for s in sequences):
        gen.loop.step()
    loop_out = [s.generated for s in sequences]
    hf = []
    for p in batch:
        ids = torch.tensor([p], device=device)
        with torch.inference_mode():
            out = gen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                     min_new_tokens=32, do_sample=False, temperature=None, top_p=None, top_k=None,
                                     pad_token_id=0)
        hf.append(out[0, 64:].tolist())
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
             for x, y in zip(loop_out, hf)]
    return {"first_divergence": first, "compared": [min(len(x), len(y)) for x, y in zip(loop_out, hf)],
            "equal_rows": sum(f == min(len(x), len(y)) for f, x, y in zip(first, loop_out, hf)), "rows": 4}


def sleep_wake(gen: Any, vocab: int, prompt: int, device: str, rates: dict[str, float]) -> dict[str, float]:
    """8 sequences mid-decode; the generator sleeps and wakes; the first step after the wake recaptures."""
    from workers.backends.decode import Sequence

    count = min(8, gen.loop.slots)
    sequences = [Sequence(key=i, prompt=p, max_new=64) for i, p in enumerate(prompts(count, prompt, vocab, seed=3))]
    for s in sequences:
        gen.loop.add(s)
    while len(gen.loop.running) < count or gen.loop.prefilling:
        gen.loop.step()
    steps = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        gen.loop.step()
        sync(device)   # with overlap a step returns before the one it launched is done
        steps.append((time.perf_counter() - t0) * 1000.0)
    weights = gen.nbytes - gen.loop.kv_bytes
    kv_in_use = sum(s.cached for s in gen.loop.running) * gen.loop.kv_bytes / (gen.loop.slots * (gen.loop.context + 1))
    sync(device)
    t0 = time.perf_counter()
    gen.sleep()
    sync(device)
    t1 = time.perf_counter()
    gen.wake()
    sync(device)
    t2 = time.perf_counter()
    captures = gen.loop.counters["capture_ms"]
    gen.loop.step()
    sync(device)
    t3 = time.perf_counter()
    recapture_ms = gen.loop.counters["capture_ms"] - captures
    while any(s.done is None for s in sequences):
        gen.loop.step()
    h2d = rates.get("h2d_bytes_per_s") or 0.0
    bound_ms = (weights + kv_in_use) / h2d * 1000.0 if h2d else 0.0
    return {"sleep_ms": (t1 - t0) * 1000.0, "wake_ms": (t2 - t1) * 1000.0,
            "first_step_after_wake_ms": (t3 - t2) * 1000.0, "recapture_ms": recapture_ms,
            "step_ms": statistics.median(steps), "weights_bytes": weights, "kv_in_use_bytes": kv_in_use,
            "bytes_over_pinned_rate_ms": bound_ms,
            "wake_plus_first_step_over_bound_plus_step": ((t3 - t1) * 1000.0) / (bound_ms + statistics.median(steps))
            if bound_ms else 0.0}


VARIANTS: dict[str, dict[str, str]] = {
    "compiled": {},                                  # the default on a CUDA card (split attention kernels)
    "sdpa": {"attention": "sdpa"},                   # the same with torch's SDPA for decode attention
    "decoder": {"compile": "off"},
    "modules": {"decoder": "off"},
    "serial": {"overlap": "off"},                    # the default, each step read before the next is launched
}


def graph_us(fn: Any, calls: int = 10, replays: int = 200) -> float:
    """Microseconds a call of `fn`, `calls` of them captured in one CUDA graph, median of `replays` replays."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(times)


def split_attention_rows(device: str, context: int, rows: int) -> dict[str, Any]:
    """One row count of `split_attention_check`."""
    import torch
    import torch.nn.functional as F

    from workers.backends.split_attention import SplitAttention

    heads, kv_heads, dim = 32, 8, 128
    slots = max(rows, 16)
    keys = torch.randn(slots, kv_heads, context + 1, dim, device=device, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    q = torch.randn(rows, heads, 1, dim, device=device, dtype=torch.bfloat16)
    k_new = torch.randn(rows, kv_heads, 1, dim, device=device, dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    positions = torch.randint(context // 2, context, (rows,), device=device)
    positions[0] = context - 1
    row_ids = torch.arange(rows, device=device)
    kernel = SplitAttention(rows, heads, kv_heads, dim, context, torch.device(device))
    got = kernel(q, k_new, v_new, keys, values, positions, row_ids, dim ** -0.5).double()
    errors = []
    for i in range(rows):
        p = int(positions[i])
        ref = F.scaled_dot_product_attention(q[i].reshape(kv_heads, heads // kv_heads, dim).double(),
                                             keys[i, :, :p + 1].double(), values[i, :, :p + 1].double(),
                                             scale=dim ** -0.5).reshape(-1)
        errors.append(float((got[i, 0] - ref).norm() / ref.norm()))
    columns = torch.arange(context + 1, device=device)

    def sdpa() -> None:   # as the loop ran it: the two cache writes, a mask, SDPA on the key/value heads
        keys[row_ids, :, positions] = k_new[:, :, 0]
        values[row_ids, :, positions] = v_new[:, :, 0]
        mask = (columns[None, :] <= positions[:, None])[:, None, None, :]
        F.scaled_dot_product_attention(q.reshape(rows, kv_heads, heads // kv_heads, dim), keys[:rows],
                                       values[:rows], attn_mask=mask, scale=dim ** -0.5)

    timings = {"sdpa_us": graph_us(sdpa),
               "split_us": graph_us(lambda: kernel(q, k_new, v_new, keys, values, positions, row_ids, dim ** -0.5))}
    kv_bytes = float(sum(int(p) + 1 for p in positions) * kv_heads * dim * 2 * 2)
    return {"splits": kernel.splits, "max_relative_error": max(errors), **timings,
            "split_kv_read_tb_s": kv_bytes / (timings["split_us"] * 1e-6) / 1e12}


def split_attention_check(device: str, context: int) -> dict[str, Any]:
    """The split kernels against SDPA (float64 reference) on Qwen3-4B's shapes, and one layer's attention timed
    both ways (the kernels with their cache write; SDPA on the key/value heads over the whole width with a mask,
    as the loop ran it, plus the two cache writes), in CUDA graphs."""
    out: dict[str, Any] = {}
    for rows in (1, 4, 16):
        out[f"rows={rows}"] = split_attention_rows(device, context, rows)
        print(f"split attention, {rows} rows: {out[f'rows={rows}']}", flush=True)
    return out


def check_variants(parser: argparse.ArgumentParser, variants: str) -> None:
    unknown = [v for v in variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the loop's rows and the sleep/wake only")
    parser.add_argument("--variants", default="compiled",
                        help="comma-separated loop variants, each loaded in turn and timed in this run: compiled "
                             "(the default: ragq's decoder, elementwise parts compiled, split attention), sdpa (the "
                             "same with SDPA's attention), serial (the default without overlap: each step read before the "
                             "next is launched), decoder (ragq's decoder, "
                             "eager parts), modules (transformers' modules in the loop, as before)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    check_variants(parser, args.variants)
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from workers.backends.loading import load_torch_model
    from workers.models import ModelSpec

    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    import transformers

    results["transformers"] = transformers.__version__
    path = build_all(args.models, "cuda" if args.device.startswith("cuda") else "cpu", tiny=args.tiny,
                     roles=("generate",))["generate"]
    results["rates"] = rates = copy_rates(args.device)
    if args.device.startswith("cuda"):
        results["split_attention"] = split_attention_check(args.device, args.prompt + args.new)
    batches = [int(b) for b in args.batches.split(",")]
    rows: dict[str, dict[str, Any]] = {}
    gen = None
    for variant in [v for v in args.variants.split(",") if v]:
        if gen is not None:   # the previous variant's weights and cache go before the next loads
            gen.unload()
            del gen
            torch.cuda.empty_cache()
        extra: dict[str, Any] = {"decode_slots": max(batches), **VARIANTS[variant]}
        spec = ModelSpec(role="generate", path=path, name="qwen3-4b", max_length=args.prompt,
                         max_new_tokens=args.new, dtype="bfloat16", extra=extra)
        t0 = time.perf_counter()
        gen = load_torch_model(spec, args.device)
        results[f"load_s, {variant}"] = time.perf_counter() - t0
        gen.loop.eos = set()   # random weights: run every sequence its full length
        vocab = gen.model.config.vocab_size
        weights = gen.nbytes - gen.loop.kv_bytes
        results["weights_bytes"], results["kv_bytes"] = weights, gen.loop.kv_bytes
        d2d = rates["d2d_bytes_per_s"]
        # one read of the weights per step at the copy's rate (a copy's bytes read + written: the memory's traffic)
        results["bound_tokens_per_s"] = d2d / weights if d2d else 0.0
        print(f"{variant}: loaded in {results[f'load_s, {variant}']:.1f} s; weights {weights / 2**30:.2f} GiB, "
              f"KV cache {gen.loop.kv_bytes / 2**30:.2f} GiB, copy {d2d / 1e12:.2f} TB/s (read+write), bound "
              f"{results['bound_tokens_per_s']:.0f} tokens/s", flush=True)
        results[f"agreement, {variant}"] = agreement(gen, vocab, args.device)
        print("greedy agreement with generate:", results[f"agreement, {variant}"], flush=True)
        for b in batches:
            batch = prompts(b, args.prompt, vocab, seed=b)
            run_loop(gen, batch[:b], min(args.new, 8))        # capture this bucket's graph, warm up
            name = f"ragq loop ({variant}), graphs, {b}"
            rows[name] = run_loop(gen, batch, args.new)
            print(f"{name}: {rows[name]}", flush=True)
        results[f"graph_captures, {variant}"] = dict(gen.loop.counters)
        results[f"sleep_wake, {variant}"] = sleep_wake(gen, vocab, args.prompt, args.device, rates)
        print("sleep/wake:", results[f"sleep_wake, {variant}"], flush=True)
        results[f"stable_addresses, {variant}"] = gen.stable is not None
    assert gen is not None
    if args.quick:
        results["rows"] = rows
        print_rows(results, rows)
        (args.out / "decode.json").write_text(json.dumps(results, indent=2))
        return 0
    gen.loop.graphs_on = False
    gen.loop._graphs.clear()
    rows["ragq loop, no graphs, 1"] = run_loop(gen, prompts(1, args.prompt, vocab, seed=1), min(args.new, 64))
    print(f"ragq loop eager b=1: {rows['ragq loop, no graphs, 1']}", flush=True)
    gen.loop.release()   # free the KV cache for transformers' own runs
    for b in batches:
        batch = prompts(b, args.prompt, vocab, seed=b)
        rows[f"HF generate eager, {b}"] = run_hf(gen, batch, args.new if b > 1 else min(args.new, 128), False)
        print(f"HF eager b={b}: {rows[f'HF generate eager, {b}']}", flush=True)
        if not args.skip_static:
            t0 = time.perf_counter()
            run_hf(gen, batch, args.new, True)  # compiles for this shape (the cache's length is part of it)
            compile_s = time.perf_counter() - t0
            rows[f"HF generate static, {b}"] = {**run_hf(gen, batch, args.new, True), "first_call_s": compile_s}
            print(f"HF static b={b}: {rows[f'HF generate static, {b}']}", flush=True)
    results["rows"] = rows
    (args.out / "decode.json").write_text(json.dumps(results, indent=2))
    print_rows(results, rows)
    return 0


def print_rows(results: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{results['device']} torch {results['torch']} transformers {results['transformers']}")
    print(f"bound {results['bound_tokens_per_s']:.0f} tokens/s (weights {results['weights_bytes'] / 2**30:.2f} GiB)")
    print(f"{'path':40} {'tokens/s':>9} {'decode tok/s':>12} {'step ms':>8}")
    for name, row in rows.items():
        print(f"{name:40} {row['tokens_per_s']:9.1f} {row.get('decode_tokens_per_s', 0):12.1f} "
              f"{row.get('step_ms', 0):8.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
