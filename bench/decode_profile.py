"""Where a decode step's device time goes (issue [2 of 7]): the loop's step for 1 and 16 sequences under torch's
profiler (CUDA kernel time by kernel, eager), and the graph-replayed step time of variants side by side: the
loop as shipped (decode attention on the key/value heads, fused RMSNorm) against transformers' SDPA and norms,
attention over a width rounded up from the longest sequence; SDPA's backends; torch.compile.

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

from bench.decode_gpu import prompts, sync  # noqa: E402
from bench.models import build_all  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/m"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compile-plain", action="store_true", help="also time torch.compile on ordinary tensors")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from torch.profiler import ProfilerActivity, profile

    from workers.backends.decode import Sequence
    from workers.backends.fastpaths import fuse_norms, use_decode_attention
    from workers.backends.loading import load_torch_model
    from workers.models import ModelSpec

    path = build_all(args.models, "cuda" if args.device.startswith("cuda") else "cpu", tiny=args.tiny,
                     roles=("generate",))["generate"]
    spec = ModelSpec(role="generate", path=path, name="qwen3-4b", max_length=1024, max_new_tokens=256,
                     dtype="bfloat16", extra={"decode_slots": 16})
    gen = load_torch_model(spec, args.device)
    loop = gen.loop
    loop.eos = set()
    vocab = gen.model.config.vocab_size
    out: dict[str, object] = {}
    if args.compile_plain:
        # torch.compile of the step on a generator whose weights and cache are ordinary allocations (not carved
        # from one stable range): what fusing the step's small kernels is worth, before making it coexist
        plain = load_torch_model(ModelSpec(role="generate", path=path, name="qwen3-4b", max_length=1024,
                                           max_new_tokens=256, dtype="bfloat16",
                                           extra={"decode_slots": 16, "keep_addresses": "off"}), args.device)
        plain.loop.eos = set()
        for b in (1, 16):
            sequences = [Sequence(key=i, prompt=p, max_new=250) for i, p in enumerate(prompts(b, 900, vocab, b))]
            for s in sequences:
                plain.loop.add(s)
            while len(plain.loop.running) < b or plain.loop.prefilling:
                plain.loop.step()
            for name, on in (("plain", False), ("plain compiled", True)):
                plain.loop.compile_step = on
                plain.loop._graphs.clear()
                t0 = time.perf_counter()
                try:
                    plain.loop.step()
                except Exception as exc:  # noqa: BLE001
                    out[f"graph step ms, b={b}, {name}"] = f"failed: {exc}"[:300]
                    continue
                first = time.perf_counter() - t0
                sync(args.device)
                t0 = time.perf_counter()
                for _ in range(20):
                    plain.loop.step()
                sync(args.device)
                out[f"graph step ms, b={b}, {name}"] = (time.perf_counter() - t0) / 20 * 1000.0
                out[f"first step s, b={b}, {name}"] = first
                print(f"{name} b={b}: {out[f'graph step ms, b={b}, {name}']:.2f} ms (first {first:.1f} s)", flush=True)
            for s in sequences:
                plain.loop.cancel(s.key)
            plain.loop.step()
        plain.unload()
        del plain
        import torch

        torch.cuda.empty_cache()
    for b in (1, 16):
        sequences = [Sequence(key=i, prompt=p, max_new=250) for i, p in enumerate(prompts(b, 900, vocab, b))]
        for s in sequences:
            loop.add(s)
        while len(loop.running) < b or loop.prefilling:
            loop.step()
        from torch.nn.attention import SDPBackend

        def attention(packed: bool) -> None:
            if packed:
                use_decode_attention(gen.model)
            else:
                gen.model.set_attn_implementation("sdpa")

        variants = {"as shipped (packed GQA, fused norms)": {},
                    "transformers' SDPA (repeat kv)": {"attention": False},
                    "transformers' norms": {"norms": False},
                    "neither (the previous loop)": {"attention": False, "norms": False},
                    "rounded 256": {"width_round": 256},
                    "efficient attention": {"sdpa_backends": [SDPBackend.EFFICIENT_ATTENTION]},
                    "compiled": {"compile_step": True}}
        for name, settings in variants.items():
            defaults = {"width_round": 0, "sdpa_backends": None, "compile_step": False}
            settings = dict(settings)
            attention(settings.pop("attention", True))
            fuse_norms(gen.model, settings.pop("norms", True))
            for key, value in {**defaults, **settings}.items():
                setattr(loop, key, value)
            loop._graphs.clear()
            t0 = time.perf_counter()
            try:
                loop.step()   # capture (and compile)
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                out[f"graph step ms, b={b}, {name}"] = f"failed: {exc}"[:300]
                print(f"{name} b={b} failed: {exc}", flush=True)
                continue
            first = time.perf_counter() - t0
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(20):
                loop.step()
            sync(args.device)
            out[f"graph step ms, b={b}, {name}"] = (time.perf_counter() - t0) / 20 * 1000.0
            out[f"first step s, b={b}, {name}"] = first
            print(f"{name} b={b}: {out[f'graph step ms, b={b}, {name}']:.2f} ms (first {first:.1f} s)", flush=True)
        attention(True)
        fuse_norms(gen.model, True)
        for key, value in {"width_round": 0, "sdpa_backends": None, "compile_step": False}.items():
            setattr(loop, key, value)
        loop.full_width = True
        loop.graphs_on = False
        loop.width_round = 0
        loop.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                loop.step()
        table = prof.key_averages().table(sort_by="cuda_time_total" if args.device.startswith("cuda")
                                          else "cpu_time_total", row_limit=18, max_name_column_width=60)
        (args.out / f"profile_b{b}.txt").write_text(table)
        print(f"--- eager step, b={b}\n{table}", flush=True)
        loop.graphs_on = args.device.startswith("cuda")
        for s in sequences:
            loop.cancel(s.key)
        loop.step()
    (args.out / "profile.json").write_text(json.dumps(out, indent=2))
    for key, value in out.items():
        print(f"{key}: {value if isinstance(value, str) else round(value, 2)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
