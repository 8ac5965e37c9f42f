"""The whole stack on a GPU (issue [3 of 8]): real embedded Redis and Postgres+pgvector, a real `ragq worker
--device cuda:0` with full-size random-weight Qwen3 models under a 16 GiB budget, driven through the client API.

Measures, for ragq's configuration and for a naive one (Celery's default settings, one document per task):
  1. ingestion throughput through the stack (enqueue -> chunk -> embed -> vectors stored), against the raw
     embedding forward pass at its best batch size on the same card and the same chunks: cold (the batch tuner
     starting from its initial size) and warm (a second corpus right after);
  2. urgent `ask` p50/p95 while idle and while a large ingestion saturates the worker.

    python3 bench/stack_gpu.py --models /tmp/ragq-models --out $OUT --variants ragq,naive
    python bench/stack_gpu.py --tiny --device cpu --docs 20 --questions 4 --out /tmp/out   # dry run of the logic
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
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import build_all  # noqa: E402
from bench.restart_cpu import until_consuming  # noqa: E402
from bench.urgent_cpu import ask_many, make_corpus, percentile  # noqa: E402


def models_toml(paths: dict[str, Path], tiny: bool, max_new_tokens: int = 16, quantize: str = "none",
                generate_extra: str = "", passes_extra: str = "") -> str:
    """The three models; `quantize` (fp8 | int8) applies to the embedder and the generator (the reranker is small);
    `generate_extra`, more lines of the generator's table; `passes_extra`, of the embedder's and the reranker's."""
    guess = (lambda s: "") if tiny else (lambda s: f'estimate = "{s}"\n')
    q = "" if quantize == "none" else f'quantize = "{quantize}"\n'
    big = "7.5GiB" if quantize == "none" else "4.2GiB"
    return (
        f'[embed]\npath = "{paths["embed"]}"\nname = "qwen3-embedding-4b"\npooling = "last"\ndim = {48 if tiny else 1024}\n'
        f'chunk_tokens = 256\nmax_length = 512\nbatch_size = 256\n{guess(big)}{q}{passes_extra}'
        f'[rerank]\npath = "{paths["rerank"]}"\nname = "qwen3-reranker-0.6b"\nkind = "qwen3"\nmax_length = 512\n'
        f'{guess("1.1GiB")}{passes_extra}'
        f'[generate]\npath = "{paths["generate"]}"\nname = "qwen3-4b"\nmax_new_tokens = {max_new_tokens}\n'
        f'max_length = 1024\n'
        f'{guess(big)}{q}{generate_extra}'
    )


def ask_streamed(client: Any, count: int, gap_s: float = 0.0, collection: str | None = None
                 ) -> tuple[list[float], list[float]]:
    """Sequential streamed questions, `gap_s` apart: the caller's total and time to the first token (ms) of each."""
    from ragq.demo import QUESTIONS

    totals, firsts = [], []
    for i in range(count):
        if i and gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        reply = [p for p in client.ask_stream(QUESTIONS[i % len(QUESTIONS)], timeout_s=120, top_k=3,
                                              collection=collection)][-1]
        totals.append((time.perf_counter() - t0) * 1000.0)
        firsts.append(reply.get("first_token_ms") or float("nan"))
    return totals, firsts


def model_events(client: Any, since: Any, until: Any) -> dict[str, int]:
    """model_events rows per event kind (load, wake, sleep, evict, unload, oom) between two database times."""
    from sqlalchemy import create_engine, text

    engine = create_engine(client.endpoints.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT event, count(*) FROM model_events WHERE ts >= :a AND ts < :b "
                                     "GROUP BY event"), {"a": since, "b": until}).all()
    finally:
        engine.dispose()
    return {str(event): int(n) for event, n in rows}


def db_now(client: Any) -> Any:
    from sqlalchemy import create_engine, text

    engine = create_engine(client.endpoints.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT clock_timestamp()")).scalar()
    finally:
        engine.dispose()


def raw_forward(paths: dict[str, Path], corpus: list[Path], device: str, tiny: bool) -> dict[str, Any]:
    """The embedder alone on the same chunks: length-sorted batches, padded and packed (padding-free, where the
    model can), best batch size and mode wins."""
    import dataclasses

    import torch

    from ragq.core.chunking import chunk_document, make_chunker
    from ragq.core.documents import load_document
    from workers.backends.loading import load_torch_model
    from workers.models import load_model_specs

    specs = load_model_specs(Path(os.environ["RAGQ_MODELS"]))
    spec = specs["embed"]
    from transformers import AutoTokenizer

    chunker = make_chunker(AutoTokenizer.from_pretrained(spec.path), spec.chunk_tokens)
    texts = []
    for path in corpus:
        doc = load_document(path)
        texts += [c.embed_text for c in chunk_document(doc.document, chunker, spec.name, doc.document_id)]
    import random

    texts = random.Random(0).sample(texts, min(len(texts), 1024))  # a sample is enough for a rate
    results: dict[str, float] = {}
    lengths: list[int] = []
    for mode in ("off", "on"):
        model = load_torch_model(dataclasses.replace(spec, packed=mode), device)
        if mode == "on" and not model.packed:
            model.unload()
            break
        lengths = model.count_tokens(texts)
        ordered = [t for _, t in sorted(zip(lengths, texts))]
        for batch in (32, 64, 128, 256):
            model.run(ordered[:batch], {})  # warm-up at this shape
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, len(ordered), batch):
                model.run(ordered[i:i + batch], {})
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            key = f"{'packed' if model.packed else 'padded'} {batch}"
            results[key] = len(ordered) / (time.perf_counter() - t0)
            print(f"raw forward {key}: {results[key]:.1f} chunks/s", flush=True)
        model.unload()
    best = max(results, key=results.get)  # type: ignore[arg-type]
    return {"chunks": len(texts), "mean_tokens": sum(lengths) / len(lengths), "by_batch": results,
            "best_batch": best, "best_chunks_per_s": results[best], **raw_question_stages(specs, texts, device)}


def raw_question_stages(specs: dict[str, Any], texts: list[str], device: str) -> dict[str, float]:
    """The rerank (20 passages) and generate (16 tokens) stages alone, outside the stack, median of 5."""
    import torch

    from ragq.core.answer import generation_prompt
    from workers.backends.loading import load_torch_model

    out = {}
    question = "which settings keep urgent questions fast"
    for role, items, params in (
        ("rerank", [[question, t] for t in texts[:20]], {}),
        ("generate", [generation_prompt(question, texts[:3])], {"max_new_tokens": 16}),
    ):
        model = load_torch_model(specs[role], device)
        times = []
        for _ in range(6):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, len(items), 8):  # the urgent batch size
                model.run(items[i:i + 8], params)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000.0)
        model.unload()
        out[f"raw_{role}_ms"] = statistics.median(times[1:])
        print(f"raw {role}: {out[f'raw_{role}_ms']:.1f} ms", flush=True)
    return out


VARIANT_ENV = {
    # variants of ragq's worker, for finding what slows the device loop inside the worker (same run, same card)
    "ragq-switch0.5ms": {"RAGQ_SWITCH_INTERVAL_MS": "0.5"},
    "ragq-nobudget": {"RAGQ_VRAM_BUDGET": "", "RAGQ_VRAM_BUFFER": "0.15"},  # 85% of the card: no swaps, no cap
    "ragq-late-prewarm": {"RAGQ_PREWARM_GENERATOR": "false"},   # the generator woken after the rerank, as before
    "ragq-no-restore": {"RAGQ_IDLE_RESTORE_S": "0"},   # an idle worker leaves the embedder asleep, as before
    # ragq-fp8 / ragq-int8: the same worker with the embedder and the generator quantized (RAGQ_MODELS set in main)
    # and MODELS_VARIANTS below, set in main
}


# variants of the worker that differ in the models file: models_toml's extra lines for them
MODELS_VARIANTS = {
    # the decode loop on transformers' modules instead of ragq's decoder
    "ragq-modules": {"generate_extra": 'decoder = "off"\n'},
    # ragq's decoder with torch's SDPA for decode attention instead of the split kernels
    "ragq-sdpa": {"generate_extra": 'attention = "sdpa"\n'},
    # each decode step read before the next is launched
    "ragq-serial": {"generate_extra": 'overlap = "off"\n'},
    # the embedder's and reranker's RMSNorms as transformers' own modules
    "ragq-unfused": {"passes_extra": 'fused_norms = "off"\n'},
    # both (as at the start of round 2 session 7)
    "ragq-unfused-serial": {"generate_extra": 'overlap = "off"\n', "passes_extra": 'fused_norms = "off"\n'},
    # the decode graphs captured on first use of each batch size, not at load
    "ragq-lazy-graphs": {"generate_extra": 'capture_at_load = "off"\n'},
}


def variant_env(name: str, base: dict[str, str]) -> dict[str, str]:
    """`base` with variant `name`'s settings (an empty value: the variable unset)."""
    env = dict(base)
    for key, value in VARIANT_ENV.get(name, {}).items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    return env


def run_variant(name: str, home: Path, device: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from ragq.client import Client
    from ragq.demo import QUESTIONS, sample_paths, stop_worker, wait_until_consuming
    from ragq.core.settings import Settings
    from workers.celery_app import app

    naive = name == "naive"
    settings = Settings(home=home, celery_profile="celery-defaults" if naive else "ragq",
                        **({"ingest_batch_docs": 1} if naive else {}))
    client = Client(settings)
    app.control.purge()
    log = home / f"worker-{name}.log"
    env = variant_env(name, dict(os.environ, RAGQ_HOME=str(home), RAGQ_CELERY_PROFILE=settings.celery_profile))
    worker = subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", device, "--name", name],
                              env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        wait_until_consuming(worker, log, timeout_s=600)
        print(f"{name}: worker consuming", flush=True)
        # each variant ingests into and asks its own collection: the variants after the first would otherwise
        # search the earlier ones' chunks too (a collection this size is compared exactly, so its search time
        # grows with what it holds: 50-90 ms for the first variant, 165-250 ms for the second in one run)
        collection = name
        client.wait_for_job(client.submit_ingest(sample_paths(), collection=collection).job_id, timeout_s=600)
        client.ask(QUESTIONS[0], timeout_s=120, collection=collection)  # every model loaded once
        # cold: the batch tuner starts from its initial size; warm: a second corpus right after, with the size it
        # settled on (as a restarted worker has it from model_profiles)
        timings = {}
        for phase, folder, offset in (("cold", "a", 0), ("warm", "w", 50)):
            corpus = make_corpus(home / f"{folder}-{name}", args.docs, seed + offset)
            t0 = time.perf_counter()
            status = client.wait_for_job(client.submit_ingest(corpus, collection=collection).job_id, timeout_s=1200)
            timings[phase] = (status["chunks_total"], time.perf_counter() - t0)
            print(f"{name}: {phase} ingestion of {status['chunks_total']} chunks in {timings[phase][1]:.1f}s",
                  flush=True)
        idle, idle_timeouts = ask_many(client, args.questions, 60.0, collection=collection)
        streamed, first_tokens = ask_streamed(client, args.questions, collection=collection)
        print(f"{name}: idle questions done", flush=True)
        corpus_b = make_corpus(home / f"b-{name}", 2 * args.docs, seed + 100)  # outlasts the questions
        job_b = client.submit_ingest(corpus_b, collection=collection).job_id
        time.sleep(args.settle)
        mixed_from, mixed_t0 = db_now(client), time.perf_counter()
        chunks_before = client.job_status(job_b).get("chunks_total") or 0
        loaded, loaded_timeouts = ask_many(client, args.questions, 60.0, busy_job=job_b, collection=collection)
        during = client.job_status(job_b)
        mixed_s = time.perf_counter() - mixed_t0
        mixed_events = model_events(client, mixed_from, db_now(client))
        print(f"{name}: loaded questions done; model events meanwhile {mixed_events}", flush=True)
        try:
            client.wait_for_job(job_b, timeout_s=args.drain_s)
        except Exception:
            print(f"{name}: second corpus not finished after {args.drain_s}s; purging it", flush=True)
    finally:
        app.control.purge()
        stop_worker(worker)
    return {
        "variant": name, "chunks": timings["warm"][0], "ingest_s": timings["warm"][1],
        "ingest_chunks_per_s": timings["warm"][0] / timings["warm"][1],
        "cold_chunks": timings["cold"][0], "cold_ingest_s": timings["cold"][1],
        "cold_chunks_per_s": timings["cold"][0] / timings["cold"][1],
        "idle_ms": idle, "loaded_ms": loaded, "idle_p50": statistics.median(idle), "idle_p95": percentile(idle, 0.95),
        "loaded_p50": statistics.median(loaded) if loaded else float("nan"), "loaded_p95": percentile(loaded, 0.95),
        "timeouts": idle_timeouts + loaded_timeouts, "ingestion_running_after_questions": during["status"] == "running",
        "idle_streamed_ms": streamed, "idle_first_token_ms": first_tokens,
        "idle_streamed_p50": statistics.median(streamed), "idle_first_token_p50": statistics.median(first_tokens),
        "mixed_s": mixed_s, "mixed_chunks_per_s": ((during.get("chunks_total") or 0) - chunks_before) / mixed_s,
        "mixed_model_events": mixed_events,
    }


def run_generation(home: Path, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """Issue [2 of 7]'s rows through the stack for each of `--generation-variants` in turn (same run, same card)."""
    out: dict[str, Any] = {}
    for name in args.generation_variants.split(","):
        print(f"--- {name}", flush=True)
        out[name] = run_generation_once(home, device, args, name)
        (args.out / "generation-partial.json").write_text(json.dumps(out, indent=2))   # a run cut short keeps these
    return out


def run_generation_once(home: Path, device: str, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """`ask` idle (streamed: total and time to the first token, as the caller sees them), then `--concurrent`
    questions asked at once (each in its own thread)."""
    import threading

    from ragq.client import Client
    from ragq.demo import QUESTIONS, sample_paths, stop_worker, wait_until_consuming
    from ragq.core.settings import Settings
    from workers.celery_app import app

    client = Client(Settings(home=home))
    app.control.purge()
    log = home / f"worker-generation-{name}.log"
    worker = subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", device, "--name", "gen"],
                              env=variant_env(name, dict(os.environ)), stdout=open(log, "wb"),
                              stderr=subprocess.STDOUT)  # noqa: SIM115
    out: dict[str, Any] = {}
    try:
        wait_until_consuming(worker, log, timeout_s=600)
        client.wait_for_job(client.submit_ingest(sample_paths()).job_id, timeout_s=600)
        for _ in range(2):
            client.ask(QUESTIONS[0], timeout_s=300)   # every model loaded once, graphs captured
        totals, firsts = ask_streamed(client, args.questions)
        out["idle_ms"], out["idle_first_token_ms"] = totals, firsts
        print(f"idle ask: p50 {statistics.median(totals):.0f} ms, first token p50 {statistics.median(firsts):.0f} ms",
              flush=True)
        if args.ask_gap:   # questions seconds apart, as people ask them: the worker has been idle in between
            totals, firsts = ask_streamed(client, args.questions, args.ask_gap)
            out["spaced_ms"], out["spaced_first_token_ms"] = totals, firsts
            print(f"ask {args.ask_gap:g} s apart: p50 {statistics.median(totals):.0f} ms, first token p50 "
                  f"{statistics.median(firsts):.0f} ms", flush=True)
        for n in sorted({1, args.concurrent}):
            latencies: list[float] = []
            errors: list[str] = []

            def one(i: int, latencies: list[float] = latencies, errors: list[str] = errors) -> None:
                t0 = time.perf_counter()
                try:
                    client.ask(QUESTIONS[i % len(QUESTIONS)], timeout_s=120, top_k=3)
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(repr(exc))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[f"concurrent_{n}"] = {"latencies_ms": sorted(latencies), "errors": errors,
                                      "wall_s": time.perf_counter() - t0,
                                      "p50": statistics.median(latencies) if latencies else None,
                                      "p95": percentile(latencies, 0.95) if latencies else None}
            print(f"{n} questions at once: answered {len(latencies)}, p50 {out[f'concurrent_{n}']['p50']}, "
                  f"p95 {out[f'concurrent_{n}']['p95']}, errors {errors[:2]}", flush=True)
    finally:
        app.control.purge()
        stop_worker(worker)
    log_text = log.read_text(errors="replace")
    out["engine_log"] = [line.split("] ", 1)[-1] for line in log_text.splitlines()
                         if ", last " in line or "decodes continuously" in line or " oom on " in line]
    return out


def run_restarts(home: Path, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """Issue [6 of 7]'s GPU row: a worker with the three full-size models SIGKILLed `--restarts` times; after each
    kill a replacement starts at once (as a supervisor would) and a question is asked at once and again every
    0.2 s while no consumer is there: the time from the kill to its answer, and to both consumers answering a ping."""
    from ragq.client import Client
    from ragq.core.errors import ServiceError
    from ragq.core.settings import Settings
    from ragq.demo import QUESTIONS, sample_paths
    from tests.drills import kill_hard
    from workers.celery_app import app

    client = Client(Settings(home=home))
    log = home / "worker-restarts.log"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", device, "--name", "rs"],
                                env=dict(os.environ), stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115

    def consuming(proc: subprocess.Popen[bytes]) -> float:
        return until_consuming(app, proc, "rs", timeout_s=600)

    proc = start()
    out: dict[str, Any] = {"first_start_s": consuming(proc), "kills": []}
    client.wait_for_job(client.submit_ingest(sample_paths()).job_id, timeout_s=600)
    for _ in range(2):
        client.ask(QUESTIONS[0], timeout_s=300)   # every model loaded once
    for i in range(args.restarts):
        t_kill = time.monotonic()
        kill_hard(proc)
        dead_s = time.monotonic() - t_kill
        proc = start()
        t_start = time.monotonic()
        pinged: list[float] = []   # measured beside the question (it waited for the answer before: 1.8 s "consuming")
        pinger = threading.Thread(target=lambda p=proc, out=pinged: out.append(consuming(p)), daemon=True)
        pinger.start()
        reply = None
        while time.monotonic() - t_kill < 600:
            try:
                reply = client.ask(QUESTIONS[i % len(QUESTIONS)], timeout_s=300, top_k=3)
                break
            except ServiceError:
                time.sleep(0.2)
        answered_s = time.monotonic() - t_kill
        pinger.join()
        ping_s = pinged[0] + (t_start - t_kill)
        row = {"children_gone_s": dead_s, "kill_to_consuming_s": ping_s, "kill_to_answer_s": answered_s,
               "answer_stages_ms": (reply or {}).get("timings")}
        out["kills"].append(row)
        print(f"kill {i + 1}: consuming after {ping_s:.1f} s, question answered {answered_s:.1f} s after the kill",
              flush=True)
    kill_hard(proc)
    text = log.read_text(errors="replace")
    out["startup_lines"] = [line.split("workers.start: ", 1)[-1] for line in text.splitlines() if "start-up:" in line
                            or "consuming " in line][-24:]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=Path("/tmp/ragq-models"))
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--ask-gap", type=float, default=0.0,
                        help="with --generation: also ask --questions questions this many seconds apart")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--drain-s", type=float, default=60.0)
    parser.add_argument("--variants", default="ragq,naive",
                        help="ragq, naive, and the diagnostic ragq-switch0.5ms and ragq-nobudget")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--generation", action="store_true",
                        help="only the generation rows: idle streamed asks and --concurrent questions at once")
    parser.add_argument("--generation-variants", default="ragq",
                        help="with --generation: ragq, ragq-modules (the decode loop on transformers' modules), "
                             "ragq-sdpa (decode attention through SDPA), ragq-serial (no overlapped decode steps), ragq-unfused "
                             "(transformers' RMSNorm in embed and rerank), "
                             "ragq-late-prewarm, ragq-int8, ragq-fp8")
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--restarts", type=int, default=0, help="only the recovery rows: kill the worker N times")
    args = parser.parse_args()
    if args.ask_gap < 0:
        parser.error(f"--ask-gap must be >= 0 seconds, not {args.ask_gap:g}")
    known = ("ragq", "ragq-fp8", "ragq-int8", *MODELS_VARIANTS, *VARIANT_ENV)
    unknown = [v for v in args.generation_variants.split(",") if v not in known]
    if unknown:
        parser.error(f"--generation-variants: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    home = Path(tempfile.mkdtemp(prefix="ragq-stack-"))
    paths = build_all(args.models, "cuda" if cuda else "cpu", tiny=args.tiny)
    models_file = home / "models.toml"
    models_file.write_text(models_toml(paths, args.tiny, args.max_new_tokens))
    for quantize in ("fp8", "int8"):   # the variants ragq-fp8 and ragq-int8
        (home / f"models-{quantize}.toml").write_text(models_toml(paths, args.tiny, args.max_new_tokens, quantize))
        VARIANT_ENV[f"ragq-{quantize}"] = {"RAGQ_MODELS": str(home / f"models-{quantize}.toml")}
    for name, extra in MODELS_VARIANTS.items():   # variants that differ in the models file
        path = home / f"models-{name}.toml"
        path.write_text(models_toml(paths, args.tiny, args.max_new_tokens, **extra))
        VARIANT_ENV[name] = {"RAGQ_MODELS": str(path)}
    os.environ.update(RAGQ_MODELS=str(models_file), RAGQ_HOME=str(home), RAGQ_VRAM_BUDGET="16GiB",
                      RAGQ_CPU_BUDGET="16GiB", RAGQ_STATS_INTERVAL_S="10")
    from ragq.core.services import EmbeddedServices
    from ragq.core.settings import Settings

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "cpu_cores": os.cpu_count(),
        "docs": args.docs, "questions": args.questions, "budget": "16GiB",
    }
    for wanted, key, runner in ((args.restarts, "restarts", run_restarts), (args.generation, "generation",
                                                                           run_generation)):
        if not wanted:
            continue
        services = EmbeddedServices(Settings(home=home))
        services.up()
        try:
            results[key] = runner(home, args.device, args)
        finally:
            services.down()
            for log_file in home.glob(f"worker-{key}*.log"):
                shutil.copy(log_file, args.out / log_file.name)
        (args.out / "stack.json").write_text(json.dumps(results, indent=2))
        return 0
    results["raw_forward"] = raw_forward(paths, make_corpus(home / "raw", args.docs, 1), args.device, args.tiny)
    (args.out / "stack.json").write_text(json.dumps(results, indent=2))
    services = EmbeddedServices(Settings(home=home))
    services.up()
    results["variants"] = {}
    try:
        for n, name in enumerate(args.variants.split(",")):
            results["variants"][name] = run_variant(name, home, args.device, args, seed=n + 1)
            log_text = (home / f"worker-{name}.log").read_text(errors="replace")
            results["variants"][name]["engine_log"] = [  # the engine's stats lines and batch-size changes
                line.split("] ", 1)[-1] for line in log_text.splitlines()
                if ", last " in line or " batch size " in line or " oom on " in line]
            (args.out / "stack.json").write_text(json.dumps(results, indent=2))
            shutil.copy(home / f"worker-{name}.log", args.out / f"worker-{name}.log")
    finally:
        services.down()
    raw = results["raw_forward"]["best_chunks_per_s"]
    print(f"\nraw embedding forward: {raw:.1f} chunks/s at batch {results['raw_forward']['best_batch']} "
          f"({results['raw_forward']['chunks']} chunks, {results['raw_forward']['mean_tokens']:.0f} tokens mean)")
    print("| variant | cold chunks/s | cold / raw | warm chunks/s | warm / raw | idle p50 ms | idle p95 ms | loaded p50 ms | loaded p95 ms "
          "| p95 loaded/idle | timeouts |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["variants"].items():
        print(f"| {name} | {r['cold_chunks_per_s']:.1f} | {r['cold_chunks_per_s'] / raw:.2f} "
              f"| {r['ingest_chunks_per_s']:.1f} | {r['ingest_chunks_per_s'] / raw:.2f} | {r['idle_p50']:.0f} "
              f"| {r['idle_p95']:.0f} | {r['loaded_p50']:.0f} | {r['loaded_p95']:.0f} "
              f"| {r['loaded_p95'] / r['idle_p95']:.2f} | {r['timeouts']} |")
    print("\n| variant | streamed ask p50 ms | first token p50 ms | mixed-run chunks/s | model events in the mixed run |"
          "\n|---|---|---|---|---|")
    for name, r in results["variants"].items():
        print(f"| {name} | {r['idle_streamed_p50']:.0f} | {r['idle_first_token_p50']:.0f} "
              f"| {r['mixed_chunks_per_s']:.1f} | {r['mixed_model_events']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
