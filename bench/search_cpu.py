"""Search inside collections of a large table (issue [3 of 7]): `--chunks` vectors in `--collections` collections
(the first one large — half the chunks — the others sharing the rest), inserted directly into a fresh embedded
Postgres + pgvector, the HNSW index built (timed), then ragq's search (`tasks.query.search_chunks`) against exact
search over the collection: p50/p95 latency and recall@10, for the large collection and a small one.

Vectors are all-MiniLM-L6-v2's size (384) from random text embeddings would take hours on this CPU, so they are
random unit vectors with a cluster structure (a Gaussian around one of 1,000 centres), which is what makes HNSW's
recall question a real one.

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--collections", type=int, default=20)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import numpy as np
    from sqlalchemy import text

    from ragq.core.db import ensure_schema, ensure_vector_index, get_engine
    from ragq.core.services import EmbeddedServices
    from ragq.core.settings import Settings
    from tasks.query import search_chunks

    home = Path(tempfile.mkdtemp(prefix="ragq-search-"))
    services = EmbeddedServices(Settings(home=home))
    endpoints = services.up()
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "chunks": args.chunks,
                              "collections": args.collections, "dim": DIM}
    try:
        ensure_schema(endpoints.database_url)
        db = get_engine(endpoints.database_url)
        rng = np.random.default_rng(1)
        centres = rng.normal(size=(1000, DIM)).astype(np.float32)
        sizes = [args.chunks // 2] + [args.chunks // 2 // (args.collections - 1)] * (args.collections - 1)
        t0 = time.perf_counter()
        with db.begin() as conn:
            for c in range(len(sizes)):
                doc = f"doc-{c}"
                conn.execute(text("INSERT INTO documents (id, name, source, format, meta) "
                                  "VALUES (:id, :name, :source, 'text', '{}')"), {"id": doc, "name": doc, "source": doc})
                conn.execute(text("INSERT INTO doc_keys (collection, key, document_id) VALUES (:c, :k, :d)"),
                             {"c": f"c{c}", "k": doc, "d": doc})
        raw = db.raw_connection()
        try:
            cursor = raw.cursor()
            for c, size in enumerate(sizes):
                for start in range(0, size, 20_000):
                    n = min(20_000, size - start)
                    vectors = centres[rng.integers(0, 1000, n)] + 0.35 * rng.normal(size=(n, DIM)).astype(np.float32)
                    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                    with cursor.copy("COPY chunks (id, document_id, seq, text, headings, embed_model, dim, tokens, "
                                     "embedding) FROM STDIN") as copy:
                        for i, v in enumerate(vectors):
                            copy.write_row((f"{c}-{start + i}", f"doc-{c}", start + i, "t", "[]", MODEL, DIM, 1,
                                            "[" + ",".join(f"{x:.5f}" for x in v) + "]"))
            raw.commit()
        finally:
            raw.close()
        result["insert_s"] = time.perf_counter() - t0
        print(f"inserted {args.chunks} chunks in {result['insert_s']:.0f}s", flush=True)
        t0 = time.perf_counter()
        ensure_vector_index(db, MODEL, DIM)
        result["index_build_s"] = time.perf_counter() - t0
        print(f"HNSW index built in {result['index_build_s']:.0f}s", flush=True)
        with db.begin() as conn:
            conn.execute(text("ANALYZE chunks"))
        rt = SimpleNamespace(db=db)
        for label, collection in (("large", "c0"), ("small", f"c{args.collections - 1}")):
            latencies, recalls = [], []
            for _ in range(args.queries):
                q = centres[rng.integers(0, 1000)] + 0.35 * rng.normal(size=DIM).astype(np.float32)
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
            result[label] = {"collection": collection, "chunks": sizes[int(collection[1:])],
                             "p50_ms": statistics.median(latencies), "p95_ms": ordered[int(0.95 * (len(ordered) - 1))],
                             "recall_at_10": statistics.mean(recalls), "min_recall": min(recalls)}
            print(label, result[label], flush=True)
    finally:
        services.down()
        shutil.rmtree(home, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
