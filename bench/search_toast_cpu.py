"""Exact search over 1,024-dimension vectors with the vectors out of line (Postgres's default TOAST target, before
migration 0011) and inline (`toast_tuple_target = 8160`, migration 0011), side by side in one run on the embedded
Postgres + pgvector: ragq's search (`tasks.query.search_chunks`, exact: a collection under `exact_search_under`)
in collections of each `--sizes`, p50/p95 over `--queries` queries; with `--hnsw`, the HNSW path too.

Two databases in one server, each migrated (to 0010, to head), filled with the same rows: random unit vectors
(the reference embedder's 1,024 dimensions) and a 256-token chunk's worth of text each.

    python bench/search_toast_cpu.py --sizes 5000,10000 --out bench/results/search-toast-cpu-DATE.json
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

from bench.search_cpu import add_document  # noqa: E402

MODEL = "bench-1024"
VARIANTS = {"out of line (0010)": "0010", "inline (0011)": "head"}


def fill(url: str, sizes: list[int], dim: int, seed: int) -> None:
    import numpy as np
    from pgvector.psycopg import register_vector
    from psycopg.types.json import Jsonb
    from sqlalchemy import text

    from ragq.core.db import get_engine

    engine, rng = get_engine(url), np.random.default_rng(seed)
    for size in sizes:
        doc = f"c{size}"
        with engine.begin() as conn:
            add_document(conn, doc, doc)
        vectors = rng.normal(size=(size, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        raw = engine.raw_connection()
        try:
            register_vector(raw.driver_connection)
            with raw.cursor().copy("COPY chunks (id, document_id, seq, text, headings, embed_model, dim, tokens, "
                                   "embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["varchar", "varchar", "int4", "text", "jsonb", "varchar", "int4", "int4", "vector"])
                for i, v in enumerate(vectors):
                    copy.write_row((f"{doc}-{i}", doc, i, f"chunk {i} " + "word " * 240, Jsonb([]), MODEL, dim,
                                    256, v))
            raw.commit()
        finally:
            raw.close()
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE chunks"))


def measure(url: str, collection: str, queries: Any, under: int) -> dict[str, float]:
    from ragq.core.db import get_engine
    from tasks.query import search_chunks

    rt = SimpleNamespace(db=get_engine(url), settings=SimpleNamespace(hnsw_ef_search=400, exact_search_under=under))
    search_chunks(rt, queries[0].tolist(), MODEL, 20, collection)   # warm: the collection's size, the cache
    times = []
    for q in queries:
        t0 = time.perf_counter()
        search_chunks(rt, q.tolist(), MODEL, 20, collection)
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))]}


def sizes_list(raw: str) -> list[int]:
    """--sizes: comma-separated positive whole numbers."""
    try:
        sizes = [int(part) for part in raw.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a comma-separated list of whole numbers") from None
    if min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{raw!r}: every size must be positive")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes_list, default="5000,10000", help="collection sizes, in chunks")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="the variants measured in turn this many times")
    parser.add_argument("--hnsw", action="store_true", help="also the HNSW path (builds each database's index)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sizes = args.sizes
    if args.dim <= 0 or args.queries <= 0 or args.repeats <= 0:
        parser.error("--dim, --queries and --repeats must be positive")
    import numpy as np
    from sqlalchemy import create_engine, text

    from ragq.core.db import ensure_vector_index, get_engine, migrate
    from ragq.core.services import EmbeddedServices
    from ragq.core.settings import Settings

    home = Path(tempfile.mkdtemp(prefix="ragq-toast-"))
    services = EmbeddedServices(Settings(home=home))
    endpoints = services.up()
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "sizes": sizes, "dim": args.dim,
                              "queries": args.queries, "rows": {}}
    try:
        admin = create_engine(endpoints.database_url, isolation_level="AUTOCOMMIT")
        urls = {}
        for n, (label, revision) in enumerate(VARIANTS.items()):
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE toast_{n}"))
            urls[label] = admin.url.set(database=f"toast_{n}").render_as_string(hide_password=False)
            migrate(urls[label], revision)
            t0 = time.perf_counter()
            fill(urls[label], sizes, args.dim, seed=1)
            if args.hnsw:
                ensure_vector_index(get_engine(urls[label]), MODEL, args.dim)
            with get_engine(urls[label]).connect() as conn:
                toast = conn.execute(text("SELECT pg_relation_size(reltoastrelid), pg_relation_size(oid) "
                                          "FROM pg_class WHERE relname = 'chunks'")).one()
            result[label] = {"toast_mb": toast[0] / 2**20, "table_mb": toast[1] / 2**20,
                             "fill_s": time.perf_counter() - t0}
            print(label, result[label], flush=True)
        rng = np.random.default_rng(7)
        queries = rng.normal(size=(args.queries, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        paths = [("exact", 10**12)] + ([("hnsw", 0)] if args.hnsw else [])
        for repeat in range(args.repeats):   # in turn, so that neither variant has the machine to itself
            for label, url in urls.items():
                for size in sizes:
                    for path, under in paths:
                        row = measure(url, f"c{size}", queries, under)
                        result["rows"].setdefault(f"{label} | {size} | {path}", []).append(row)
                        print(f"repeat {repeat} {label} collection {size} {path}: p50 {row['p50_ms']:.1f} "
                              f"p95 {row['p95_ms']:.1f} ms", flush=True)
        admin.dispose()
    finally:
        services.down()
        shutil.rmtree(home, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
