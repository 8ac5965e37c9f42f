"""Where an urgent question's embed and rerank passes go on the card (issue [2 of 7]): the stack's models
(bench/stack_gpu.py's models file), with RMSNorm fused (the default) and as transformers' modules, each pass timed
to the card's end, then profiled (torch.profiler: the kernels with the most device time, the kernel count, and the
device's busy time against the wall time).

    python3 bench/stage_profile_gpu.py --models /tmp/m --out $OUT
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
from bench.wake_overlap_gpu import DOC  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ragq.demo import QUESTIONS
    from workers.backends.loading import load_torch_model
    from workers.models import load_model_specs

    paths = build_all(args.models, "cuda", roles=("embed", "rerank", "generate"))
    home = Path(tempfile.mkdtemp(prefix="ragq-profile-"))
    (home / "models.toml").write_text(models_toml(paths, False, 256))
    specs = load_model_specs(home / "models.toml")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d")}
    cases = {
        "embed 1 query": ("embed", [QUESTIONS[0]], {"kind": "query"}),
        "embed 8 queries": ("embed", [QUESTIONS[i % len(QUESTIONS)] for i in range(8)], {"kind": "query"}),
        "rerank 17": ("rerank", [[QUESTIONS[0], DOC * 3] for _ in range(17)], {}),
        # an ingestion micro-batch: 128 chunks of ~250 tokens (what the tuner settles near on this card)
        "embed 128 chunks": ("embed", [f"chunk {i}: " + DOC * 4 for i in range(128)], {}),
    }
    import dataclasses

    for role, norms in (("embed", "on"), ("embed", "off"), ("rerank", "on"), ("rerank", "off")):
        spec = dataclasses.replace(specs[role], extra={**specs[role].extra, "fused_norms": norms})
        model = load_torch_model(spec, args.device)
        results[f"{role}_packed"] = model.packed
        for case, (case_role, items, params) in cases.items():
            if case_role != role:
                continue
            name = f"{case}, fused norms {norms}"
            for _ in range(3):
                model.run(items, params)
            times = []
            for _ in range(10):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.run(items, params)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1000.0)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    model.run(items, params)
                torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = sorted((e for e in events if e.device_time_total > 0 and e.device_type.name == "CUDA"),
                             key=lambda e: -e.device_time_total)
            device_ms = sum(e.device_time_total for e in kernels) / 1000.0 / 3
            top = [(e.key[:90], round(e.device_time_total / 1000.0 / 3, 3), e.count // 3) for e in kernels[:15]]
            cpu_top = sorted(events, key=lambda e: -e.cpu_time_total)[:12]
            results[name] = {"wall_ms": times, "wall_ms_median": statistics.median(times),
                             "kernel_ms_per_call": device_ms, "kernels_per_call": sum(e.count for e in kernels) / 3,
                             "top_kernels": top,
                             "top_cpu": [(e.key[:90], round(e.cpu_time_total / 1000.0 / 3, 3), e.count // 3)
                                         for e in cpu_top]}
            print(f"{name}: wall {statistics.median(times):.1f} ms, kernels {device_ms:.1f} ms "
                  f"({results[name]['kernels_per_call']:.0f} a call)", flush=True)
            for key, ms, count in top[:8]:
                print(f"   {ms:8.3f} ms  x{count:<5} {key}", flush=True)
            for key, ms, count in results[name]["top_cpu"][:8]:
                print(f"   cpu {ms:8.3f} ms  x{count:<5} {key}", flush=True)
        model.unload()
        del model
        torch.cuda.empty_cache()
    (args.out / "stage-profile.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
