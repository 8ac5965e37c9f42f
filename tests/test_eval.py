"""`ragq eval` on a small BEIR-format folder made here (passages on distinct topics, judged queries), through the
session's real worker: the three systems scored, the passages reused on a second run, bad folders refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TOPICS = {
    "redis": "Redis keeps the broker's queues in memory and writes an append-only file so a restart loses nothing.",
    "postgres": "Postgres stores every chunk with its vector; pgvector's HNSW index finds the nearest ones.",
    "gpu": "The GPU card holds the embedder, the reranker and the generator within a memory budget.",
    "docling": "Docling converts PDF reports into structured documents with headings, tables and pictures.",
    "celery": "Celery routes urgent questions to their own queue ahead of background ingestion tasks.",
    "flower": "Flower shows the queues, the workers and each task's state in a web page.",
    "tuning": "The tuner watches latency and moves batch sizes and caps when a symptom appears.",
    "bananas": "Bananas ripen faster next to apples because apples give off ethylene gas.",
    "volcano": "A volcano erupts when magma pressure in the chamber exceeds the strength of the rock above.",
    "chess": "In chess the rook moves along ranks and files, and castling moves the king two squares.",
}
QUERIES = {
    "q-redis": ("how does the broker survive a restart", "redis"),
    "q-postgres": ("where are the vectors stored and searched", "postgres"),
    "q-celery": ("which queue do urgent questions go to", "celery"),
    "q-bananas": ("why do bananas ripen quickly", "bananas"),
    "q-chess": ("how does a rook move", "chess"),
    "q-volcano": ("what makes a volcano erupt", "volcano"),
}


def beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for pid, body in TOPICS.items():
            f.write(json.dumps({"_id": pid, "title": pid.capitalize(), "text": body}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, (text, _) in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{qid}\t{pid}\t1\n" for qid, (_, pid) in QUERIES.items()))
    return folder


def test_eval_scores_ragq_exact_and_bm25_and_reuses_the_passages(worker, ragq_home, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import ragq_env, run_ragq

    env = ragq_env(ragq_home)
    data = beir(tmp_path / "tiny-beir")
    first = run_ragq(env, "eval", str(data), "--json", "--html", str(tmp_path / "eval.html"), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)
    assert result["collection"] == "eval-tiny-beir" and result["passages"] == 10 and result["queries"] == 6
    assert set(result["measures"]) == {"ragq", "exact", "bm25"}
    assert set(result["measures"]["ragq"]) == {"nDCG@10", "R@10", "R@100", "RR@10"}
    # one relevant passage per query among ten on distinct topics: every system finds it in the ten
    for system in ("ragq", "exact", "bm25"):
        assert result["measures"][system]["R@10"] == 1.0, result["measures"]
    assert result["measures"]["ragq"]["nDCG@10"] > 0.8
    assert result["ragq_over_exact"]["nDCG@10"] >= 0.99   # a collection this small is searched exactly
    assert result["ingest"]["chunks_added"] >= 10 and result["latency_ms"]["p50"] > 0
    assert set(result["per_query"]) == set(QUERIES) and "nDCG@10" in result["per_query"]["q-chess"]["bm25"]
    assert "<table>" in (tmp_path / "eval.html").read_text()
    again = run_ragq(env, "eval", str(data), "--json", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["ingest"]["chunks_added"] == 0   # reused: nothing embedded again
    text = run_ragq(env, "eval", str(data), "--top-k", "5", timeout=600)
    assert text.returncode == 0 and "nDCG@5" in text.stdout and "ragq / exact" in text.stdout


def test_eval_refuses_a_folder_that_is_not_beir(ragq_home, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import ragq_env, run_ragq

    env = ragq_env(ragq_home)
    missing = run_ragq(env, "eval", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
    data = beir(tmp_path / "broken")
    (data / "queries.jsonl").write_text('{"_id": "q1", "text": "fine"}\nnot json\n')
    broken = run_ragq(env, "eval", str(data))
    assert broken.returncode == 2 and "queries.jsonl:2: not JSON" in broken.stderr
    (data / "queries.jsonl").unlink()
    gone = run_ragq(env, "eval", str(data))
    assert gone.returncode == 2 and "queries.jsonl: missing" in gone.stderr
