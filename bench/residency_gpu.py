"""Residency benchmark (issue [2 of 8]): three full-size random-weight Qwen3 models on one card under a 16 GiB
budget, a mixed workload of queries (embed -> rerank 20 -> generate) and ingestion (embed 64 chunks), and three
policies side by side in one run:

  ragq        the engine: VRAM / pinned host / disk tiers, LRU with cooldown, prewarm of the next stage
  disk        load from disk on every stage change (unload the previous model)
  keepalive   keep at most 2 models loaded, least recently used unloaded to disk (as Ollama's keep-alive does)

It also measures pinned and pageable host-to-device bandwidth and each model's wake time against bytes/bandwidth.
Results: $OUT/residency.json and a markdown table on stdout.

    python bench/residency_gpu.py --models /tmp/ragq-models --out $OUT --jobs 30
    python bench/residency_gpu.py --tiny --device cpu --jobs 10   # a dry run of the logic on the CPU
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.models import build_all  # noqa: E402
from ragq.core.errors import DeviceOutOfMemory  # noqa: E402
from scheduler.batching import BACKGROUND, URGENT  # noqa: E402
from ragq.core.sizes import parse_size  # noqa: E402
from workers.backends.loading import load_torch_model  # noqa: E402
from workers.engine import Engine  # noqa: E402
from workers.observer import EventLog  # noqa: E402
from workers.models import ModelSpec  # noqa: E402

GiB = 2**30
WORDS = ("gpu worker loads the embedder reranker generator celery routes urgent questions ahead of background "
         "ingestion postgres stores chunks vectors pgvector hnsw index redis broker documents docling").split()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_jobs(n: int, seed: int) -> list[tuple[str, list[tuple[str, list[Any], dict[str, Any]]]]]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        if rng.random() < 0.7:
            q = text(rng, 12)
            docs = [text(rng, 120) for _ in range(20)]
            jobs.append(("query", [("embed", [q], {"kind": "query"}), ("rerank", [[q, d] for d in docs], {}),
                                   ("generate", ["Passages: " + " ".join(docs[:3]) + "\nQuestion: " + q],
                                    {"max_new_tokens": 16, "templated": True})]))
        else:
            jobs.append(("ingest", [("embed", [text(rng, 180) for _ in range(64)], {"kind": "document"})]))
    return jobs


def bandwidth(device: str) -> dict[str, float]:
    if not device.startswith("cuda"):
        return {"pinned_gbps": float("nan"), "pageable_gbps": float("nan")}
    nbytes = 2 * GiB
    result = {}
    for kind, pinned in (("pinned_gbps", True), ("pageable_gbps", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dev.copy_(host, non_blocking=pinned)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        result[kind] = nbytes / statistics.median(times) / 1e9
        del host, dev
    torch.cuda.empty_cache()
    return result


def spec_for(role: str, path: Path, tiny: bool) -> ModelSpec:
    batch = {"embed": 32, "rerank": 20, "generate": 4}[role]
    guess = None if tiny else {"embed": "7.5GiB", "rerank": "1.1GiB", "generate": "7.5GiB"}[role]  # as configured
    return ModelSpec(role=role, path=path, name=path.name, dtype="bfloat16", batch_size=batch, max_length=512,
                     kind={"embed": "last", "rerank": "qwen3", "generate": "causal"}[role], max_new_tokens=16,
                     estimate_bytes=parse_size(guess) if guess else None)


def wake_times(specs: dict[str, ModelSpec], device: str, pinned_gbps: float) -> list[dict[str, Any]]:
    rows = []
    for role, spec in specs.items():
        model = load_torch_model(spec, device)
        model.sleep()
        torch.cuda.empty_cache() if device.startswith("cuda") else None
        times = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            model.wake(asynchronous=False)
            sync(device)
            times.append(time.perf_counter() - t0)
            model.sleep()
        wake_s = statistics.median(times)
        ideal_s = model.nbytes / (pinned_gbps * 1e9)
        rows.append({"role": role, "model": spec.name, "bytes": model.nbytes, "wake_s": wake_s, "ideal_s": ideal_s,
                     "ratio": wake_s / ideal_s})
        model.unload()
    return rows


class LoadCounter:
    def __init__(self, device: str) -> None:
        self.device = device
        self.loads = 0
        self.load_s = 0.0

    def load(self, spec: ModelSpec) -> Any:
        sync(self.device)
        t0 = time.perf_counter()
        model = load_torch_model(spec, self.device)
        sync(self.device)
        self.loads += 1
        self.load_s += time.perf_counter() - t0
        return model


def run_disk_every_change(specs: dict[str, ModelSpec], jobs: list[Any], device: str) -> dict[str, Any]:
    counter = LoadCounter(device)
    current: tuple[str, Any] | None = None
    for _, stages in jobs:
        for role, items, params in stages:
            if current is None or current[0] != role:
                if current is not None:
                    current[1].unload()
                current = (role, counter.load(specs[role]))
            model = current[1]
            for i in range(0, len(items), specs[role].batch_size):
                model.run(items[i:i + specs[role].batch_size], params)
    if current is not None:
        current[1].unload()
    return {"loads": counter.loads, "load_s": counter.load_s, "wakes": 0, "wake_s": 0.0, "ooms": 0, "failed": 0}


def run_keepalive(specs: dict[str, ModelSpec], jobs: list[Any], device: str, budget: int,
                  max_loaded: int = 2) -> dict[str, Any]:
    counter = LoadCounter(device)
    loaded: dict[str, Any] = {}
    used: dict[str, float] = {}
    size = {role: spec.estimate_bytes or 0 for role, spec in specs.items()}
    ooms = failed = 0
    for _, stages in jobs:
        for role, items, params in stages:
            if role not in loaded:
                while loaded and (len(loaded) >= max_loaded
                                  or sum(m.nbytes for m in loaded.values()) + size[role] > budget):
                    victim = min(loaded, key=lambda r: used[r])
                    loaded.pop(victim).unload()
                loaded[role] = counter.load(specs[role])
                size[role] = loaded[role].nbytes
            used[role] = time.perf_counter()
            for i in range(0, len(items), specs[role].batch_size):
                batch = items[i:i + specs[role].batch_size]
                try:
                    loaded[role].run(batch, params)
                except DeviceOutOfMemory:  # the weights fit, their activations did not: drop the LRU other, retry
                    ooms += 1
                    others = [r for r in loaded if r != role]
                    if not others:
                        failed += 1
                        continue
                    loaded.pop(min(others, key=lambda r: used[r])).unload()
                    loaded[role].run(batch, params)
    for model in loaded.values():
        model.unload()
    return {"loads": counter.loads, "load_s": counter.load_s, "wakes": 0, "wake_s": 0.0, "ooms": ooms,
            "failed": failed}


def run_ragq(specs: dict[str, ModelSpec], jobs: list[Any], device: str, budget: int, host_budget: int,
             cooldown_s: float) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    engine = Engine(device, specs, lambda spec, dev: load_torch_model(spec, dev), budget,
                    host_budget_bytes=host_budget, cooldown_s=cooldown_s, observer=EventLog(events),
                    device_kind=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu").start()
    failed = 0
    for kind, stages in jobs:
        for role, items, params in stages:
            priority = URGENT if kind == "query" else BACKGROUND
            try:
                engine.run(role, items, priority=priority, params=params)
            except Exception as exc:  # counted: an unrecovered failure
                print(f"ragq: {role} failed: {exc}", flush=True)
                failed += 1
            if kind == "query" and role == "embed":
                engine.prewarm("rerank")
            elif kind == "query" and role == "rerank":
                engine.prewarm("generate")
    engine.stop()
    loads = [e for e in events if e["event"] == "load"]
    wakes = [e for e in events if e["event"] == "wake"]
    sleeps = [e for e in events if e["event"] == "sleep"]
    return {"loads": len(loads), "load_s": sum(e["ms"] for e in loads) / 1000.0, "wakes": len(wakes),
            "wake_s": sum(e["ms"] for e in wakes) / 1000.0, "sleeps": len(sleeps),
            "sleep_s": sum(e["ms"] for e in sleeps) / 1000.0, "ooms": engine.stats.ooms, "failed": failed}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--budget", default="16GiB")
    parser.add_argument("--host-budget", default="48GiB")
    parser.add_argument("--cooldown", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--policies", default="ragq,keepalive,disk")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device
    cuda = device.startswith("cuda")
    budget = parse_size(args.budget)
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
                            "torch": torch.__version__, "budget_bytes": budget, "jobs": args.jobs,
                            "cooldown_s": args.cooldown}
    import transformers

    info["transformers"] = transformers.__version__
    paths = build_all(args.models, "cuda" if cuda else "cpu", tiny=args.tiny)
    specs = {role: spec_for(role, path, args.tiny) for role, path in paths.items()}
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        info["device_total_bytes"] = total
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), 0)
    info["bandwidth"] = bandwidth(device)
    print(json.dumps(info["bandwidth"]), flush=True)
    info["wake"] = wake_times(specs, device, info["bandwidth"]["pinned_gbps"]) if cuda else []
    for row in info["wake"]:
        print(f"wake {row['role']:9s} {row['bytes'] / GiB:6.2f} GiB  {row['wake_s'] * 1000:7.1f} ms  "
              f"ideal {row['ideal_s'] * 1000:7.1f} ms  ratio {row['ratio']:.2f}", flush=True)
    (args.out / "residency.json").write_text(json.dumps(info, indent=2))
    jobs = make_jobs(args.jobs, args.seed)
    info["mix"] = {"query": sum(1 for k, _ in jobs if k == "query"), "ingest": sum(1 for k, _ in jobs if k == "ingest")}
    info["policies"] = {}
    for policy in args.policies.split(","):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if policy == "ragq":
            result = run_ragq(specs, jobs, device, budget, parse_size(args.host_budget), args.cooldown)
        elif policy == "disk":
            result = run_disk_every_change(specs, jobs, device)
        else:
            result = run_keepalive(specs, jobs, device, budget)
        result["wall_s"] = time.perf_counter() - t0
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved() if cuda else 0
        scale = 100.0 / args.jobs
        result["loads_per_100"] = result["loads"] * scale
        result["load_s_per_100"] = (result["load_s"] + result.get("wake_s", 0.0)) * scale
        info["policies"][policy] = result
        print(f"{policy}: {json.dumps(result)}", flush=True)
        (args.out / "residency.json").write_text(json.dumps(info, indent=2))
    print("\n| policy | loads /100 jobs | wakes /100 jobs | s loading+waking /100 jobs | wall s | peak reserved GiB "
          "| OOMs (recovered) | failed |\n|---|---|---|---|---|---|---|---|")
    for name, r in info["policies"].items():
        print(f"| {name} | {r['loads_per_100']:.1f} | {r['wakes'] * 100 / args.jobs:.1f} | {r['load_s_per_100']:.1f} "
              f"| {r['wall_s']:.1f} | {r['peak_reserved_bytes'] / GiB:.2f} | {r['ooms']} | {r['failed']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
