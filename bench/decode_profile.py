"""Where a decode step's device time goes (issue [2 of 7]): for each way the loop can run a step — ragq's decoder with
its elementwise parts compiled (the default on a CUDA card), the same eager, transformers' modules — the graph-
replayed step time for 1 and 16 sequences side by side, and torch's profiler over eager steps (CUDA kernel time by
kernel, and how many kernels a step launches).

    python3 bench/decode_profile.py --models /tmp/m --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode_gpu import VARIANTS, check_variants, prompts, sync  # noqa: E402
from bench.models import build_all  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/m"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variants", default="compiled,decoder,modules")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    check_variants(parser, args.variants)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from workers.backends.decode import Sequence
    from workers.backends.loading import load_torch_model
    from workers.models import ModelSpec

    cuda = args.device.startswith("cuda")
    path = build_all(args.models, "cuda" if cuda else "cpu", tiny=args.tiny, roles=("generate",))["generate"]
    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, object] = {}
    for variant in args.variants.split(","):
        spec = ModelSpec(role="generate", path=path, name="qwen3-4b", max_length=1024, max_new_tokens=256,
                         dtype="bfloat16", extra={"decode_slots": max(batches), **VARIANTS[variant]})
        gen = load_torch_model(spec, args.device)
        loop = gen.loop
        loop.eos = set()
        vocab = gen.model.config.vocab_size
        for b in batches:
            sequences = [Sequence(key=i, prompt=p, max_new=250) for i, p in enumerate(prompts(b, 900, vocab, b))]
            for s in sequences:
                loop.add(s)
            while len(loop.running) < b or loop.prefilling:
                loop.step()
            loop.step()   # capture
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(20):
                loop.step()
            sync(args.device)
            key = f"{variant}, b={b}"
            out[f"graph step ms, {key}"] = (time.perf_counter() - t0) / 20 * 1000.0
            loop.graphs_on = False
            loop.full_width = True   # attend over the whole width, as the graphs do
            loop.step()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                for _ in range(3):
                    loop.step()
            events = prof.key_averages()
            kernels = [e for e in events if getattr(e, "device_type", None) is not None
                       and str(e.device_type).endswith("CUDA")]
            out[f"kernels a step, {key}"] = sum(e.count for e in kernels) / 3
            out[f"kernel ms a step, {key}"] = sum(e.self_device_time_total for e in kernels) / 3 / 1000.0
            table = events.table(sort_by="self_cuda_time_total" if cuda else "cpu_time_total", row_limit=25,
                                 max_name_column_width=70)
            (args.out / f"profile-{variant}-b{b}.txt").write_text(table)
            print(f"--- {key}: graph step {out[f'graph step ms, {key}']:.2f} ms, "
                  f"{out[f'kernels a step, {key}']:.0f} kernels, {out[f'kernel ms a step, {key}']:.2f} ms of "
                  f"kernel time a step (eager)\n{table}", flush=True)
            loop.graphs_on, loop.full_width = cuda, False
            for s in sequences:
                loop.cancel(s.key)
            loop.step()
        gen.unload()
        del gen, loop
        if cuda:
            torch.cuda.empty_cache()
    (args.out / "profile.json").write_text(json.dumps(out, indent=2))
    for key, value in out.items():
        print(f"{key}: {value if isinstance(value, str) else round(value, 2)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
