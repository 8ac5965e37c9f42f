"""8-bit weights against bf16 on one card, side by side in one run (issue [5 of 7]): random-weight models of the
real shapes (Qwen3-Embedding-4B, Qwen3-Reranker-0.6B, Qwen3-4B), each loaded as ragq loads it (`quantize` none,
fp8, int8).

- formats: one decode-shaped MLP (2560 -> 9728 -> 2560, as Qwen3-4B's) replayed in a CUDA graph, at 1 and 16 rows,
  for bf16 and torchao's candidate formats (FP8 with per-row dynamic activations, FP8 weight-only, INT8
  weight-only, INT8 with dynamic activations): what `fp8`/`int8` were chosen from;
- fidelity against bf16 on the same inputs: embeddings' cosine (lowest over `--chunks` chunks), reranker scores'
  Spearman rank correlation over `--lists` lists of 20 passages (lowest and mean), generator's next-token logits
  cosine over 256 positions (lowest and mean) and greedy top-1 agreement;
- the decode loop (CUDA graphs, continuous batching): tokens/s for 1 and 16 sequences (1,024-token prompts, 256 new
  tokens), weights bytes, sleep + wake with sequences in flight (the wake moves the quantized bytes).

    python3 bench/quant_gpu.py --models /tmp/ragq-models --out $OUT
    python bench/quant_gpu.py --tiny --device cpu --formats int8 --out /tmp/q   # the logic, on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode_gpu import copy_rates, prompts, run_loop, sleep_wake, sync  # noqa: E402
from bench.models import build_all  # noqa: E402

WORDS = ("ingestion queue worker embedding vector search rerank answer budget card memory batch urgent background "
         "document chunk latency throughput index postgres redis celery model weights decode prefill cache token "
         "stream question source report alert playbook tuner device host pinned graph").split()


def texts(count: int, seed: int, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) for _ in range(count)]


def free(*objects: Any) -> None:
    import torch

    for obj in objects:
        if hasattr(obj, "unload"):
            obj.unload()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load(role: str, path: Path, quantize: str, device: str, **kw: Any) -> Any:
    from workers.backends.loading import load_torch_model
    from workers.models import ModelSpec

    kinds = {"embed": "last", "rerank": "qwen3", "generate": "causal"}
    spec = ModelSpec(role=role, path=path, name=f"{role}-{quantize}", kind=kinds[role], quantize=quantize,
                     dtype="bfloat16" if device.startswith("cuda") else "auto", **kw)
    t0 = time.perf_counter()
    model = load_torch_model(spec, device)
    sync(device)
    return model, time.perf_counter() - t0


FORMAT_ROWS = ("bf16", "fp8 dynamic rows", "fp8 weight-only", "int8 weight-only", "int8 dynamic",
               "bf16 compiled", "fp8 dynamic rows compiled", "fp8 weight-only compiled", "int8 weight-only compiled",
               "int8 weight-only compiled max-autotune")


def _format_config(name: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig, PerRow,
    )

    base = name.removesuffix(" max-autotune").removesuffix(" compiled")
    return {"bf16": None, "fp8 dynamic rows": Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            "fp8 weight-only": Float8WeightOnlyConfig(), "int8 weight-only": Int8WeightOnlyConfig(),
            "int8 dynamic": Int8DynamicActivationInt8WeightConfig()}[base]


def pass_timing(forward: Any, base: Any, rows: int, hidden: int, inner: int, device: str) -> dict[str, float]:
    """The MLP on an ingestion-sized pass (`rows` tokens, compute-bound: what an embed or rerank micro-batch is),
    eager calls as the packed passes run: microseconds a call, TFLOP/s, lowest cosine against bf16."""
    import torch

    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        cosine = float(torch.nn.functional.cosine_similarity(base(x).float(), forward(x).float(), dim=-1).min())
        for _ in range(3):
            forward(x)
        sync(device)
        calls = 20
        t0 = time.perf_counter()
        for _ in range(calls):
            forward(x)
        sync(device)
    us = (time.perf_counter() - t0) / calls * 1e6
    return {"pass_rows": rows, "us_pass": us, "tflops_pass": 2 * rows * hidden * inner * 2 / (us * 1e-6) / 1e12,
            "cosine_pass": cosine}


def format_row(name: str, device: str, tiny: bool, pass_rows: int = 6400) -> dict[str, Any]:
    """One MLP of Qwen3-4B's shape in one format: on an ingestion-sized pass of `pass_rows` tokens first (eager
    calls), then its forward at 1 and 16 rows replayed in a CUDA graph (compiled by inductor first for the
    "compiled" rows): microseconds, weight bytes read per second, cosine against bf16. A part that fails records
    its error; the rows before it stay."""
    import torch
    from torchao.quantization import quantize_

    from workers.backends.quantize import leaves_bytes

    hidden, inner = (64, 128) if tiny else (2560, 9728)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(hidden, inner, bias=False), torch.nn.SiLU(),
                               torch.nn.Linear(inner, hidden, bias=False)).to(device, torch.bfloat16)
    import copy

    mlp = copy.deepcopy(base)
    config = _format_config(name)
    if config is not None:
        quantize_(mlp, config)
    row: dict[str, Any] = {"weights_bytes": leaves_bytes(mlp)}
    mode = "max-autotune-no-cudagraphs" if name.endswith("max-autotune") else None
    forward = torch.compile(mlp, fullgraph=True, dynamic=False, mode=mode) if "compiled" in name else mlp
    if pass_rows:   # before the graphs: a failed capture leaves the CUDA context unusable
        try:
            row.update(pass_timing(forward, base, 64 if tiny else pass_rows, hidden, inner, device))
        except Exception as exc:  # noqa: BLE001 - a format that cannot run a pass: its error is the result
            row["pass_error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(json.dumps(row), flush=True)   # what the row has so far, should the graphs below kill the process
    for rows in (1, 16):
        x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
        with torch.inference_mode():
            t0 = time.perf_counter()
            y = forward(x)
            row[f"first_call_s_{rows}"] = time.perf_counter() - t0
            row[f"cosine_{rows}"] = float(torch.nn.functional.cosine_similarity(
                base(x).float(), y.float(), dim=-1).min())
            if not device.startswith("cuda"):
                continue
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    forward(x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward(x)
            for _ in range(10):
                graph.replay()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(200):
                graph.replay()
            sync(device)
            us = (time.perf_counter() - t0) / 200 * 1e6
            row[f"us_{rows}"] = us
            row[f"weight_gb_per_s_{rows}"] = row["weights_bytes"] / (us * 1e-6) / 1e9
    return row


def formats(device: str, tiny: bool, pass_rows: int = 6400) -> dict[str, Any]:
    """Each format's row in its own process: a failed graph capture leaves its CUDA context unusable."""
    import subprocess

    out: dict[str, Any] = {}
    for name in FORMAT_ROWS:
        cmd = [sys.executable, __file__, "--format-row", name, "--device", device, "--out", "/tmp",
               "--pass-rows", str(pass_rows)]
        done = subprocess.run(cmd + (["--tiny"] if tiny else []), capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        error = done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else f"exit {done.returncode}"
        out[name] = json.loads(lines[-1]) if lines else {}
        if done.returncode != 0:   # the part that failed; what the row measured before it stays
            out[name]["error"] = error
        print(f"format {name}: {out[name]}", flush=True)
    return out


def run_batches(model: Any, items: list[Any], params: dict[str, Any], size: int) -> list[Any]:
    """As the engine feeds a model: micro-batches of `size`."""
    out: list[Any] = []
    for i in range(0, len(items), size):
        out.extend(model.execute(items[i:i + size], params).outputs)
    return out


def fidelity_embed(path: Path, fmts: list[str], device: str, chunks: int) -> dict[str, Any]:
    import torch

    items = texts(chunks, seed=1, words=160)
    model, _ = load("embed", path, "none", device, max_length=512, batch_size=64)
    ref = torch.tensor(run_batches(model, items, {"kind": "document"}, 64))
    free(model)
    out: dict[str, Any] = {}
    for q in fmts:
        model, load_s = load("embed", path, q, device, max_length=512, batch_size=64)
        got = torch.tensor(run_batches(model, items, {"kind": "document"}, 64))
        cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
        out[q] = {"chunks": chunks, "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                  "weights_bytes": model.nbytes, "load_s": load_s}
        free(model)
        print(f"embed {q}: {out[q]}", flush=True)
    return out


def _ranks(values: Any) -> Any:
    import torch

    order = torch.argsort(values)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    return ranks


def spearman(a: Any, b: Any) -> float:
    import torch

    ra, rb = _ranks(a.double()), _ranks(b.double())
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def fidelity_rerank(path: Path, fmts: list[str], device: str, lists: int) -> dict[str, Any]:
    import torch

    queries = texts(lists, seed=2, words=12)
    passages = texts(lists * 20, seed=3, words=120)
    pairs = [(queries[i // 20], passages[i]) for i in range(lists * 20)]
    model, _ = load("rerank", path, "none", device, max_length=512, batch_size=64)
    ref = torch.tensor(run_batches(model, pairs, {}, 20))
    free(model)
    out: dict[str, Any] = {}
    for q in fmts:
        model, load_s = load("rerank", path, q, device, max_length=512, batch_size=64)
        got = torch.tensor(run_batches(model, pairs, {}, 20))
        rho = [spearman(ref[i * 20:(i + 1) * 20], got[i * 20:(i + 1) * 20]) for i in range(lists)]
        out[q] = {"lists": lists, "spearman_min": min(rho), "spearman_mean": statistics.mean(rho),
                  "score_abs_diff_max": float((ref - got).abs().max()), "weights_bytes": model.nbytes,
                  "load_s": load_s}
        free(model)
        print(f"rerank {q}: {out[q]}", flush=True)
    return out


def logits_of(model: Any, batch: list[list[int]], device: str) -> Any:
    import torch

    ids = torch.tensor(batch, device=device)
    with torch.inference_mode():
        return model.model(input_ids=ids).logits.float().cpu()


def generator_rows(path: Path, fmts: list[str], device: str, args: argparse.Namespace,
                   rates: dict[str, float]) -> dict[str, Any]:
    """Logits against bf16 over 256 positions (4 prompts of 64 tokens), then the decode loop's rows per format."""
    import torch

    out: dict[str, Any] = {}
    ref = None
    for q in ["none", *fmts]:
        model, load_s = load("generate", path, q, device, max_length=args.prompt, max_new_tokens=args.new,
                             extra={"decode_slots": 16})
        vocab = model.model.config.vocab_size
        batch = prompts(4, 64, vocab, seed=11)
        logits = logits_of(model, batch, device).reshape(-1, vocab)
        row: dict[str, Any] = {"load_s": load_s, "weights_bytes": model.nbytes - model.loop.kv_bytes,
                               "kv_bytes": model.loop.kv_bytes}
        if ref is None:
            ref = logits
        else:
            cos = torch.nn.functional.cosine_similarity(ref, logits, dim=-1)
            row.update(positions=int(cos.numel()), logits_cosine_min=float(cos.min()),
                       logits_cosine_mean=float(cos.mean()),
                       top1_agreement=float((ref.argmax(-1) == logits.argmax(-1)).float().mean()))
        model.loop.eos = set()   # random weights: every sequence runs its full length
        d2d = rates.get("d2d_bytes_per_s") or 0.0
        row["bound_tokens_per_s"] = d2d / row["weights_bytes"] if d2d else 0.0
        for b in (1, 16):
            work = prompts(b, args.prompt, vocab, seed=b)
            run_loop(model, work, min(args.new, 8))          # capture this bucket's graph, warm up
            row[f"loop_{b}"] = run_loop(model, work, args.new)
        row["sleep_wake"] = sleep_wake(model, vocab, args.prompt, device, rates)
        row["stable_addresses"] = getattr(model, "stable", None) is not None
        out["bf16" if q == "none" else q] = row
        print(f"generate {q}: " + json.dumps({k: v for k, v in row.items()}), flush=True)
        free(model)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--formats", default="fp8,int8")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--lists", type=int, default=50)
    parser.add_argument("--parts", default="embed,rerank,generate,formats")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pass-rows", type=int, default=6400,
                        help="tokens of the formats' ingestion-sized pass (32 chunks of ~200 tokens); 0: none")
    parser.add_argument("--format-row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pass_rows < 0:
        parser.error(f"--pass-rows must be >= 0 (0: no ingestion-sized pass), not {args.pass_rows}")
    if args.format_row:
        print(json.dumps(format_row(args.format_row, args.device, args.tiny, args.pass_rows)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    import torchao
    import transformers

    cuda = args.device.startswith("cuda")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                               "transformers": transformers.__version__, "torchao": torchao.__version__,
                               "date": time.strftime("%Y-%m-%d")}
    fmts = args.formats.split(",")
    parts = args.parts.split(",")
    save = lambda: (args.out / "quant.json").write_text(json.dumps(results, indent=2))  # noqa: E731
    roles = tuple(r for r in ("embed", "rerank", "generate") if r in parts)
    paths = build_all(args.models, "cuda" if cuda else "cpu", tiny=args.tiny, roles=roles)
    results["rates"] = rates = copy_rates(args.device)
    if "embed" in parts:
        results["embed"] = fidelity_embed(paths["embed"], fmts, args.device, args.chunks)
        save()
    if "rerank" in parts:
        results["rerank"] = fidelity_rerank(paths["rerank"], fmts, args.device, args.lists)
        save()
    if "generate" in parts:
        results["generate"] = generator_rows(paths["generate"], fmts, args.device, args, rates)
        save()
    if "formats" in parts:
        results["formats"] = formats(args.device, args.tiny, args.pass_rows)
        save()
    gen = results.get("generate", {})
    if "bf16" in gen:
        for q in fmts:
            if q in gen:
                print(f"decode 1 sequence {q} / bf16: "
                      f"{gen[q]['loop_1']['tokens_per_s'] / gen['bf16']['loop_1']['tokens_per_s']:.2f}; "
                      f"16: {gen[q]['loop_16']['tokens_per_s'] / gen['bf16']['loop_16']['tokens_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
