"""The whole question chain with a configured embedder (Qwen3, last-token pooling), reranker (Qwen3-Reranker
formula) and generator (causal LM): tiny random-weight models of the real architectures, a real worker of its own
on a separate Redis database, driven through the CLI."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import text

from tests.conftest import WorkerProcess, ragq_env, run_ragq

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_env(tiny_models, settings, tmp_path_factory):  # type: ignore[no-untyped-def]
    from ragq.core.services import EmbeddedServices

    endpoints = EmbeddedServices(settings).up()
    root = tmp_path_factory.mktemp("tiny")
    models = root / "models.toml"
    models.write_text(
        f'[embed]\npath = "{tiny_models["embed"]}"\nname = "tiny-qwen3-embed"\npooling = "last"\ndim = 48\n'
        f'chunk_tokens = 64\n'
        f'[rerank]\npath = "{tiny_models["lm"]}"\nname = "tiny-qwen3-rerank"\nkind = "qwen3"\n'
        f'[generate]\npath = "{tiny_models["lm"]}"\nname = "tiny-qwen3-gen"\nmax_new_tokens = 8\n'
    )
    broker = endpoints.broker_url.rsplit("/", 1)[0] + "/3"
    env = ragq_env(settings.home, RAGQ_MODELS=str(models), RAGQ_BROKER_URL=broker,
                   RAGQ_DATABASE_URL=endpoints.database_url)
    return env, root


STREAM_SCRIPT = """
import json
from ragq.client import Client
from ragq.core.settings import load_settings
parts = list(Client(load_settings()).ask_stream("How long do the lanterns burn?", top_k=1, max_new_tokens=24))
print(json.dumps({"pieces": parts[:-1], "reply": parts[-1]}))
"""


def check_streaming(env: dict[str, str], worker: WorkerProcess) -> None:
    """`Client.ask_stream` yields the answer in pieces through the broker's Redis, then the reply; `ragq ask`
    prints it as it grows, then sources and timings with the time to the first token."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", STREAM_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + worker.log_path.read_text()[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    pieces, reply = out["pieces"], out["reply"]
    assert "".join(pieces) == reply["answer"] and reply["mode"] == "generated"
    if reply["answer"]:
        assert reply["first_token_ms"] > 0 and reply["timings"]["generate"]["first_token_ms"] > 0
    shown = run_ragq(env, "ask", "When is the lantern festival?", "--top-k", "1")
    assert shown.returncode == 0, shown.stderr
    assert "Q: When is the lantern festival?" in shown.stdout and "sources" in shown.stdout
    assert "first token" in shown.stdout or "A: \n" not in shown.stdout


def test_ask_runs_embed_search_rerank_generate_with_configured_models(tiny_env, client) -> None:  # type: ignore[no-untyped-def]
    from celery import Celery

    env, root = tiny_env
    worker = WorkerProcess(env, "tiny", root / "worker.log")
    try:
        probe_app = Celery(broker=env["RAGQ_BROKER_URL"], backend=env["RAGQ_BROKER_URL"])
        worker.wait_ready(probe_app)
        doc = root / "lanterns.md"
        doc.write_text("# Lanterns\n\nThe lantern festival is held at the first frost.\n\n"
                       "## Paper\n\nThe lanterns are made of mulberry paper and burn for an hour.\n")
        ingest = run_ragq(env, "ingest", str(doc), "--wait", "--json")
        assert ingest.returncode == 0, ingest.stderr
        assert json.loads(ingest.stdout)["chunks"] >= 1

        result = run_ragq(env, "ask", "When is the lantern festival?", "--json", "--top-k", "1")
        assert result.returncode == 0, result.stderr + worker.log_path.read_text()[-3000:]
        reply = json.loads(result.stdout)
        assert reply["mode"] == "generated" and isinstance(reply["answer"], str)
        assert reply["sources"][0]["document"] == "lanterns"
        assert 0.0 < reply["sources"][0]["score"] < 1.0  # p(yes), not a cosine similarity
        models = {stage: t["model"] for stage, t in reply["timings"].items()}
        assert models == {"embed": "tiny-qwen3-embed", "search": "pgvector-hnsw", "rerank": "tiny-qwen3-rerank",
                          "generate": "tiny-qwen3-gen"}
        assert reply["timings"]["generate"]["load_ms"] > 0  # first use of the generator loads it
        check_streaming(env, worker)

        deadline = time.monotonic() + 15
        while True:
            with client.db.connect() as conn:
                events = conn.execute(text(
                    "select model, event, bytes from model_events where worker like 'tiny@%'")).mappings().all()
            if {e["model"] for e in events if e["event"] == "load"} >= {"tiny-qwen3-embed", "tiny-qwen3-rerank",
                                                                       "tiny-qwen3-gen"} or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        loads = {e["model"]: e["bytes"] for e in events if e["event"] == "load"}
        assert set(loads) == {"tiny-qwen3-embed", "tiny-qwen3-rerank", "tiny-qwen3-gen"}
        assert all(b > 0 for b in loads.values())
        with client.db.connect() as conn:
            dims = conn.execute(text("select distinct dim from chunks where embed_model = 'tiny-qwen3-embed'")).scalars()
            assert list(dims) == [48]
            index = conn.execute(text(
                "select indexdef from pg_indexes where tablename = 'chunks' and indexdef like '%tiny-qwen3-embed%'"
            )).scalar_one()
        assert "hnsw" in index and "vector(48)" in index and "vector_cosine_ops" in index
        with client.db.connect() as conn:
            profiles = dict(conn.execute(text(
                "select model, weights_bytes from model_profiles where device_kind = 'cpu' and model like 'tiny-%'"
            )).all())
        assert profiles == loads  # the measured footprints were persisted for the next start
    finally:
        worker.stop()


def test_background_questions_are_answered_and_kept(tiny_env, client) -> None:  # type: ignore[no-untyped-def]
    """`ragq questions FILE --wait`: each question answered at background priority through the same models (one
    embed, rerank and generate request per task), answers kept in Postgres and shown by `ragq job`; an empty or
    over-long line is refused with its line number while the others are answered; a missing file exits 2."""
    from celery import Celery

    env, root = tiny_env
    worker = WorkerProcess(env, "tiny-questions", root / "worker-questions.log")
    try:
        worker.wait_ready(Celery(broker=env["RAGQ_BROKER_URL"], backend=env["RAGQ_BROKER_URL"]))
        doc = root / "kites.md"
        doc.write_text("# Kites\n\nThe kite festival is held on the windiest day of spring.\n\n"
                       "## Silk\n\nThe kites are made of silk and flown from the north hill.\n")
        assert run_ragq(env, "ingest", str(doc), "--wait").returncode == 0
        questions = root / "questions.txt"
        questions.write_text("When is the kite festival?\n\nWhat are the kites made of?\n" + "x" * 9000 + "\n"
                             "Where are the kites flown?\n")
        result = run_ragq(env, "questions", str(questions), "--wait", "--json", "--top-k", "2", "--batch", "2")
        assert result.returncode == 1, result.stderr + worker.log_path.read_text()[-3000:]
        assert f"{questions} line 4: is 9000 characters" in result.stderr
        summary = json.loads(result.stdout)
        assert summary["status"] == "completed_with_errors" and summary["questions"] == 3
        answers = summary["answers"]
        assert [a["question"] for a in answers] == ["When is the kite festival?", "What are the kites made of?",
                                                    "Where are the kites flown?"]
        assert all(a["mode"] == "generated" and isinstance(a["answer"], str) for a in answers)
        assert all(len(a["sources"]) == 2 and 0.0 < a["sources"][0]["score"] < 1.0 for a in answers)
        assert all(a["sources"][0]["document"] == "kites" for a in answers)
        assert summary["failed"] == [{"path": f"{questions} line 4", "error": "is 9000 characters, over the 8000 limit"}]

        shown = run_ragq(env, "job", summary["job_id"])
        # completed_with_errors: exit 1 (issue "Newcomer fixes", bug 8: it exited 0)
        assert shown.returncode == 1 and "3/4 questions answered, 1 failed" in shown.stdout
        assert "When is the kite festival?" in shown.stdout and f"failed: {questions} line 4: is 9000" in shown.stdout
        with client.db.connect() as conn:
            stages = conn.execute(text(
                "select stage, priority, items from stage_timings where job_id = :j order by id"),
                {"j": summary["job_id"]}).all()
        assert {s for s, p, _ in stages if p == "background"} == {"embed", "search", "rerank", "generate"}
        assert all(p == "background" for _, p, _ in stages)
        assert max(items for s, _, items in stages if s == "generate") == 2   # two questions in one request

        missing = run_ragq(env, "questions", str(root / "nope.txt"))
        assert missing.returncode == 2 and "nope.txt: does not exist" in missing.stderr
        blank = root / "blank.txt"
        blank.write_text("\n  \n")
        assert "has no questions" in run_ragq(env, "questions", str(blank)).stderr
    finally:
        worker.stop()
