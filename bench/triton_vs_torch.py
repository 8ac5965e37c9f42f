"""The same workload through the Triton backend and the torch backend (issue [7 of 8]), side by side in one run.

A real tritonserver (from the nvidia-pytriton wheel, tests/triton_server.py) serves the model through ragq's
Python-backend model.py; the torch backend runs the same model in this process. Workload: embedding the chunks of
a generated corpus in micro-batches of --batch (the engine's background size), and generating --new-tokens for a
few prompts; rounds alternate between the backends. Reports rates and the Triton / torch ratio.

    python bench/triton_vs_torch.py --rounds 5 --out bench/results/triton-cpu-2026-11-27-s6.json
    # on a GPU machine with no package registry: bash bench/triton_carry.sh here, carry .carry/, and there
    python3 bench/triton_vs_torch.py --device cuda:0 --models /tmp/ragq-models --docs 200 --protocol http|grpc
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.urgent_cpu import make_corpus  # noqa: E402


def agree(want: list, got: list) -> dict[str, float]:
    """How far the Triton backend's outputs are from the torch backend's: the least cosine between vectors, or the
    share of identical texts."""
    if want and isinstance(want[0], list):
        import numpy as np

        a, b = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return {"min_cosine": float(cos.min()), "rows": len(want)}
    return {"identical": sum(w == g for w, g in zip(want, got)) / len(want), "rows": len(want)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--roles", default="embed,generate", help="which workloads to run (comma-separated)")
    parser.add_argument("--out", type=Path, default=Path("triton.json"))
    args = parser.parse_args()
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    if not roles or set(roles) - {"embed", "generate"}:
        parser.error(f"--roles {args.roles!r}: the workloads are embed and generate (comma-separated)")
    import torch

    from ragq.core.chunking import chunk_document, make_chunker
    from ragq.core.documents import load_document
    from tests.triton_server import TritonServer
    from workers.backends.loading import load_torch_model
    from workers.backends.triton_backend import load_triton_model
    from workers.models import ModelSpec, default_embed_spec

    home = Path(tempfile.mkdtemp(prefix="ragq-triton-"))
    if args.device == "cpu":
        from bench.oscillation import build_cpu_generator

        embed = dataclasses.replace(default_embed_spec(), batch_size=args.batch)
        generate = ModelSpec(role="generate", path=build_cpu_generator(home, 384, 4), name="generator",
                             max_new_tokens=args.new_tokens, batch_size=args.prompts)
    else:
        from bench.models import build_all

        paths = build_all(args.models, "cuda", roles=("embed", "generate"))
        embed = ModelSpec(role="embed", path=paths["embed"], name="qwen3-embedding-4b", kind="last", dim=1024,
                          batch_size=args.batch)
        generate = ModelSpec(role="generate", path=paths["generate"], name="qwen3-4b", max_new_tokens=args.new_tokens,
                             batch_size=args.prompts)
    from transformers import AutoTokenizer

    chunker = make_chunker(AutoTokenizer.from_pretrained(embed.path), embed.chunk_tokens)
    texts = [c.embed_text for p in make_corpus(home / "corpus", args.docs, 1)
             for c in chunk_document(load_document(p).document, chunker, embed.name, "d")]
    prompts = [f"Question {i}: which settings keep urgent questions fast?" for i in range(args.prompts)]
    server = TritonServer(home / "repository", home / "tritonserver.log").start()
    url = server.http_url if args.protocol == "http" else server.grpc_url
    os.environ["RAGQ_TRITON_REPOSITORY"] = str(server.repository)
    results: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "device": args.device,
                                  "device_name": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
                                  "cpu_cores": os.cpu_count(), "chunks": len(texts), "args": vars(args) | {
                                      "models": str(args.models), "out": str(args.out)}}
    try:
        workloads = ((embed, texts, {"kind": "document"}, "chunks"),
                     (generate, prompts, {"max_new_tokens": args.new_tokens}, "prompts"))
        for spec, items, params, unit in (w for w in workloads if w[0].role in roles):
            local = load_torch_model(spec, args.device)
            t0 = time.perf_counter()
            remote = load_triton_model(dataclasses.replace(spec, backend="triton", extra={"triton_url": url}),
                                       args.device)
            load_s = time.perf_counter() - t0
            size = spec.batch_size
            rates: dict[str, list[float]] = {"torch": [], "triton": []}
            # warm-up, and the check that both backends compute the same thing
            want, got = (model.run(items[:size], params) for model in (local, remote))
            agreement = agree(want, got)
            print(f"{spec.role}: Triton agrees with torch: {agreement}", flush=True)
            for _ in range(args.rounds):
                for name, model in (("torch", local), ("triton", remote)):
                    t0 = time.perf_counter()
                    for i in range(0, len(items), size):
                        model.run(items[i:i + size], params)
                    if args.device != "cpu":
                        torch.cuda.synchronize()
                    rates[name].append(len(items) / (time.perf_counter() - t0))
                    print(f"{spec.role} {name}: {rates[name][-1]:.2f} {unit}/s", flush=True)
            remote.unload()
            local.unload()
            best = {k: max(v) for k, v in rates.items()}
            results[spec.role] = {"unit": unit, "rates": rates, "best": best, "median": {k: statistics.median(v)
                                                                                    for k, v in rates.items()},
                                  "triton_over_torch": best["triton"] / best["torch"], "triton_load_s": load_s,
                                  "agreement": agreement}
            print(f"{spec.role}: triton / torch = {best['triton'] / best['torch']:.3f} (best of {args.rounds}); "
                  f"Triton load {load_s:.1f}s", flush=True)
    finally:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
