"""Chunking in spawned processes gives exactly the chunks of inline chunking, and a bad document fails alone."""

from pathlib import Path

from ragq.core.documents import load_document
from workers.chunk_pool import ChunkPool
from workers.models import default_embed_spec

SAMPLES = Path(__file__).resolve().parent.parent / "ragq" / "samples"


def test_process_pool_matches_inline_and_isolates_failures() -> None:
    spec = default_embed_spec()
    docs = [load_document(p) for p in sorted(SAMPLES.glob("*.md"))]
    items = [{"document": d.document.export_to_dict(), "document_id": d.document_id} for d in docs]
    items.insert(1, {"document": {"not": "a document"}, "document_id": "bad"})
    inline = ChunkPool(spec.path, 200, spec.name, processes=0).chunk_many(items)
    pool = ChunkPool(spec.path, 200, spec.name, processes=1)
    try:
        pooled = pool.chunk_many(items)
    finally:
        pool.close()
    assert isinstance(inline[1], Exception) and isinstance(pooled[1], Exception)
    for a, b in zip(inline[:1] + inline[2:], pooled[:1] + pooled[2:]):
        assert isinstance(a, list) and a and a == b
