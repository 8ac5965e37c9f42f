"""Search inside collections of a large table (issue [3 of 7]): `--chunks` vectors in `--collections` collections
(the first one large — half the chunks — the others sharing the rest), inserted directly into a fresh embedded
Postgres + pgvector (binary COPY), the HNSW index built (timed), then ragq's search (`tasks.query.search_chunks`,
its plan: exact for a collection under `exact_search_under` chunks, else HNSW with candidates scaled to the
collection's share) against exact search over the collection: p50/p95 latency and recall@10, for the large
collection and a small one.

Embedding a million texts takes hours on this CPU, so the vectors come from all-MiniLM-L6-v2 run on the sentences
of a real corpus (`--corpus`, BEIR corpus.jsonl: a few thousand sentences), each chunk one of those sentence
vectors plus Gaussian noise (cosine ~0.85 to its sentence), normalised; queries are the corpus's queries (and
more sentence vectors with noise), embedded the same way.

    python bench/search_cpu.py --chunks 1000000 --collections 20 --out bench/results/search-cpu-DATE.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIM = 384
MODEL = "all-MiniLM-L6-v2"


def minilm_vectors(corpus: Path, limit: int) -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 vectors of the corpus's sentences and of its queries (ragq's own default embedder)."""
    import re

    import numpy as np

    from workers.backends.loading import load_torch_model
    from workers.models import default_embed_spec

    sentences: list[str] = []
    for line in (corpus / "corpus.jsonl").read_text().splitlines():
        body = json.loads(line)["text"]
        sentences += [s for s in re.split(r"(?<=[.!?])\s+", body) if len(s) > 30]
    sentences = sentences[:limit]
    queries = [json.loads(line)["text"] for line in (corpus / "queries.jsonl").read_text().splitlines()]
    model = load_torch_model(default_embed_spec(), "cpu")
    t0 = time.perf_counter()
    vectors = np.asarray([v for i in range(0, len(sentences), 64) for v in model.run(sentences[i:i + 64], {})],
                         dtype=np.float32)
    query_vectors = np.asarray(model.run(queries, {"kind": "query"}), dtype=np.float32)
    print(f"embedded {len(sentences)} sentences and {len(queries)} queries in {time.perf_counter() - t0:.0f}s",
          flush=True)
    return vectors, query_vectors


def add_document(conn: Any, doc: str, collection: str) -> None:
    """One document row `doc` and its key in `collection`: what chunks inserted directly hang from."""
    from sqlalchemy import text

    conn.execute(text("INSERT INTO documents (id, name, source, format, meta) "
                      "VALUES (:id, :name, :source, 'text', '{}')"), {"id": doc, "name": doc, "source": doc})
    conn.execute(text("INSERT INTO doc_keys (collection, key, document_id) VALUES (:c, :k, :d)"),
                 {"c": collection, "k": doc, "d": doc})


def measure(rt: Any, db: Any, queries: list[Any], collection: str) -> dict[str, Any]:
    """ragq's search in `collection` for each query: latency, and recall@10 against exact search there."""
    import numpy as np
    from sqlalchemy import text

    from tasks.query import search_chunks

    latencies, recalls = [], []
    search_chunks(rt, queries[0].tolist(), MODEL, 10, collection)   # the collection's size, counted once
    for q in queries:
        q = (q / np.linalg.norm(q)).tolist()
        t0 = time.perf_counter()
        got = [r["chunk_id"] for r in search_chunks(rt, q, MODEL, 10, collection)]
        latencies.append((time.perf_counter() - t0) * 1000.0)
        with db.begin() as conn:
            conn.execute(text("SET LOCAL enable_indexscan = off"))
            exact = list(conn.execute(text(
                "SELECT c.id FROM chunks c JOIN doc_keys k ON k.document_id = c.document_id "
                "AND k.collection = :c WHERE c.embed_model = :m "
                "ORDER BY (c.embedding::vector(384)) <=> CAST(:q AS vector(384)) LIMIT 10"),
                {"c": collection, "m": MODEL, "q": str(q)}).scalars())
        recalls.append(len(set(got) & set(exact)) / 10)
    ordered = sorted(latencies)
    return {"collection": collection, "p50_ms": statistics.median(latencies),
            "p95_ms": ordered[int(0.95 * (len(ordered) - 1))], "recall_at_10": statistics.mean(recalls),
            "min_recall": min(recalls), "queries_under_0_9": sum(r < 0.9 for r in recalls)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--collections", type=int, default=20)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--corpus", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/eval/business-reports")
    parser.add_argument("--max-sentences", type=int, default=6000)
    parser.add_argument("--ef", default="100,200,400", help="RAGQ_HNSW_EF_SEARCH values to measure, side by side")
    parser.add_argument("--noise", type=float, default=0.6, help="norm of the noise added to a sentence vector")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import numpy as np
    from psycopg.types.json import Jsonb
    from sqlalchemy import text

    from ragq.core.db import ensure_schema, ensure_vector_index, get_engine
    from ragq.core.services import EmbeddedServices
    from ragq.core.settings import Settings

    home = Path(tempfile.mkdtemp(prefix="ragq-search-"))
    services = EmbeddedServices(Settings(home=home))
    endpoints = services.up()
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "chunks": args.chunks,
                              "collections": args.collections, "dim": DIM}
    try:
        ensure_schema(endpoints.database_url)
        db = get_engine(endpoints.database_url)
        rng = np.random.default_rng(1)
        centres, query_base = minilm_vectors(args.corpus, args.max_sentences)
        result["sentences"] = len(centres)
        noise = args.noise / np.sqrt(DIM)

        def chunks_like(n: int) -> np.ndarray:
            v = centres[rng.integers(0, len(centres), n)] + noise * rng.normal(size=(n, DIM)).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        sizes = [args.chunks // 2] + [args.chunks // 2 // (args.collections - 1)] * (args.collections - 1)
        t0 = time.perf_counter()
        with db.begin() as conn:
            for c in range(len(sizes)):
                add_document(conn, f"doc-{c}", f"c{c}")
        from ragq.core.db import vector_index_name

        with db.begin() as conn:   # the schema made the default model's index: drop it, build it after (timed)
            conn.execute(text(f"DROP INDEX IF EXISTS {vector_index_name(MODEL, DIM)}"))
        from pgvector.psycopg import register_vector

        raw = db.raw_connection()
        try:
            register_vector(raw.driver_connection)
            cursor = raw.cursor()
            for c, size in enumerate(sizes):
                for start in range(0, size, 50_000):
                    n = min(50_000, size - start)
                    vectors = chunks_like(n)
                    with cursor.copy("COPY chunks (id, document_id, seq, text, headings, embed_model, dim, tokens, "
                                     "embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                        copy.set_types(["varchar", "varchar", "int4", "text", "jsonb", "varchar", "int4", "int4",
                                        "vector"])
                        for i, v in enumerate(vectors):
                            copy.write_row((f"{c}-{start + i}", f"doc-{c}", start + i, "t", Jsonb([]), MODEL, DIM, 1,
                                            v))
                raw.commit()
                print(f"collection c{c}: {size} chunks ({time.perf_counter() - t0:.0f}s)", flush=True)
        finally:
            raw.close()
        result["insert_s"] = time.perf_counter() - t0
        print(f"inserted {args.chunks} chunks in {result['insert_s']:.0f}s", flush=True)
        with db.connect() as conn:   # the graph of a million vectors is built in memory (~2 GB), not on disk
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("ALTER SYSTEM SET maintenance_work_mem = '3GB'"))
            conn.execute(text("SELECT pg_reload_conf()"))
        t0 = time.perf_counter()
        ensure_vector_index(db, MODEL, DIM)
        result["index_build_s"] = time.perf_counter() - t0
        print(f"HNSW index built in {result['index_build_s']:.0f}s", flush=True)
        with db.begin() as conn:
            conn.execute(text("ANALYZE chunks"))
        settings = Settings(home=home)
        queries = list(query_base) + list(chunks_like(max(0, args.queries - len(query_base))))
        result["exact_search_under"] = settings.exact_search_under
        for ef_min in (int(e) for e in args.ef.split(",")):   # side by side: what recall each ef floor buys
            rt = SimpleNamespace(db=db, settings=SimpleNamespace(hnsw_ef_search=ef_min,
                                                                 exact_search_under=settings.exact_search_under))
            for label, collection in (("large", "c0"), ("small", f"c{args.collections - 1}")):
                row = measure(rt, db, queries[:args.queries], collection)
                row["chunks"] = sizes[int(collection[1:])]
                result[f"{label}, ef_search >= {ef_min}"] = row
                print(label, ef_min, row, flush=True)
    finally:
        services.down()
        shutil.rmtree(home, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
