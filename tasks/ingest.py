"""Background ingestion: chunk DoclingDocuments, embed the chunks not stored yet, store them, count per job.

One task carries a batch of documents so one embed request serves all of them; the engine batches further across
concurrent tasks. Each document is stored in its own transaction, together with its job_items row, so a failure
in one document leaves the others complete and a redelivered task never counts a document twice.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import OperationalError

from ragq.core.chunking import ChunkText
from ragq.core.db import FINISH_JOB, Chunk, Document, JobItem, ensure_vector_index
from ragq.core.documents import display_name
from ragq.core.errors import BadInput
from scheduler.batching import BACKGROUND
from tasks.common import sent_at
from tasks.versions import item_key, reusable_vectors, switch_key, sync_if_finished, unchanged
from workers.celery_app import RagqTask, app
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

def _claim_item(conn: Any, item_id: int, **values: Any) -> bool:
    """Move a job item out of 'queued' exactly once (a redelivered task finds it done and counts nothing)."""
    result = conn.execute(
        update(JobItem).where(JobItem.id == item_id, JobItem.status == "queued").values(updated_at=text("now()"), **values)
    )
    return bool(result.rowcount)


def record_item_failure(rt_db: Any, job_id: str, item_id: int, error: str) -> None:
    with rt_db.begin() as conn:
        if _claim_item(conn, item_id, status="failed", error=error[:4000]):
            conn.execute(FINISH_JOB, {"job_id": job_id, "done": 0, "failed": 1, "chunks": 0, "added": 0, "reused": 0})
            sync_if_finished(conn, job_id)


def _store_document(rt: WorkerRuntime, job_id: str, item: dict[str, Any], chunks: list[ChunkText],
                    vectors: dict[str, Any], reused: int) -> int:
    """The document's version, its chunks and the switch of its key to it, in one transaction."""
    model = rt.specs["embed"].name
    doc = item["document"]
    collection, key = item_key(item)
    with rt.db.begin() as conn:
        conn.execute(pg_insert(Document).values(
            id=item["document_id"], name=display_name(doc.get("name"), item["path"]), source=item["path"],
            format=item["format"], meta={"origin": doc.get("origin")},
        ).on_conflict_do_nothing())
        rows = [
            {
                "id": c.id, "document_id": item["document_id"], "seq": c.seq, "text": c.text, "headings": c.headings, "tokens": c.tokens,
                "embed_model": model, "dim": len(vectors[c.id]), "embedding": vectors[c.id],
            }
            for c in chunks if c.id in vectors
        ]
        added = 0
        if rows:
            added = len(conn.execute(pg_insert(Chunk).values(rows).on_conflict_do_nothing().returning(Chunk.id)).all())
        switch_key(conn, collection, key, item["document_id"], job_id, item["item_id"])
        if _claim_item(conn, item["item_id"], status="done", document_id=item["document_id"], chunks=len(chunks),
                       chunks_added=added, chunks_reused=reused):
            conn.execute(FINISH_JOB, {"job_id": job_id, "done": 1, "failed": 0, "chunks": len(chunks), "added": added,
                                      "reused": reused})
            sync_if_finished(conn, job_id)
    return added


class IngestTask(RagqTask):
    """When an ingest task fails for good (an unexpected error, or retries exhausted), its documents still
    queued are marked failed with the error, so the job finishes and says why instead of waiting forever."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        try:
            job_id, items = (list(args) + [kwargs.get("job_id"), kwargs.get("items")])[:2]
            db = self.app.require_runtime().db
            for item in items or []:
                record_item_failure(db, job_id, item["item_id"],
                                    f"{item['path']}: ingestion failed: {type(exc).__name__}: {exc}")
        except Exception:
            log.exception("could not record the failure of ingest task %s", task_id)


@app.task(
    name="ragq.ingest_documents", bind=True, base=IngestTask, autoretry_for=(OperationalError,),
    retry_backoff=True, retry_backoff_max=60, max_retries=8,
)
def ingest_documents(self: Any, job_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    rt = self.app.require_runtime()
    published = sent_at(self.request)
    context = {"priority": BACKGROUND, "job_id": job_id, "task_id": self.request.id}
    with rt.db.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'running', updated_at = now() WHERE id = :id AND status = 'queued'"),
                     {"id": job_id})

    with rt.db.begin() as conn:   # documents already stored as they are: counted done, not chunked again
        same = unchanged(conn, items, rt.specs["embed"].name)
        for item in items:
            if item["item_id"] in same and _claim_item(conn, item["item_id"], status="done",
                                                      document_id=item["document_id"], chunks=same[item["item_id"]]):
                conn.execute(FINISH_JOB, {"job_id": job_id, "done": 1, "failed": 0, "chunks": same[item["item_id"]],
                                          "added": 0, "reused": 0})
        sync_if_finished(conn, job_id)
    items = [item for item in items if item["item_id"] not in same]
    prepared: list[tuple[dict[str, Any], list[ChunkText]]] = []
    failed = 0
    with rt.stage("chunk", sent_at=published, **context) as clock:
        for item, chunks in zip(items, rt.chunk_pool.chunk_many(items)):
            if isinstance(chunks, list) and not chunks:
                chunks = BadInput(item["path"], "document produced no chunks (no text)")
            if isinstance(chunks, BaseException):
                failed += 1
                error = str(chunks) if isinstance(chunks, BadInput) else \
                    f"{item['path']}: {type(chunks).__name__}: {chunks}"
                record_item_failure(rt.db, job_id, item["item_id"], error)
                continue
            prepared.append((item, chunks))
            clock.items += len(chunks)

    all_ids = [c.id for _, chunks in prepared for c in chunks]
    vectors: dict[str, Any] = {}
    reused: dict[int, int] = {}   # item id -> chunks whose vectors came from the version it replaces
    model = rt.specs["embed"].name
    with rt.db.connect() as conn:
        stored = set(conn.execute(select(Chunk.id).where(Chunk.id.in_(all_ids))).scalars()) if all_ids else set()
        reusable = reusable_vectors(conn, [item for item, _ in prepared], model)
        for item, chunks in prepared:   # a changed document: its unchanged chunks keep their vectors
            old = reusable.get(item["item_id"], {})
            for c in chunks:
                vector = old.get((c.text, tuple(c.headings))) if c.id not in stored else None
                if vector is not None:
                    vectors[c.id] = vector
                    reused[item["item_id"]] = reused.get(item["item_id"], 0) + 1
    todo = [c for _, chunks in prepared for c in chunks if c.id not in stored and c.id not in vectors]
    if todo:
        try:
            with rt.stage("embed", sent_at=None, **context) as clock:
                result = rt.engine.run("embed", [c.embed_text for c in todo], priority=BACKGROUND,
                                       params={"kind": "document"})
                clock.from_engine(result)
        except Exception as exc:
            for item, _ in prepared:
                record_item_failure(rt.db, job_id, item["item_id"], f"{item['path']}: embedding failed: {exc}")
            raise
        vectors.update({c.id: v for c, v in zip(todo, result.outputs)})
        _ensure_index(rt, len(result.outputs[0]))

    added = 0
    with rt.stage("store", sent_at=None, **context) as clock:
        for item, chunks in prepared:
            try:
                added += _store_document(rt, job_id, item, chunks, vectors, reused.get(item["item_id"], 0))
                clock.items += len(chunks)
            except OperationalError:
                raise  # the database is away: retry the task; stored documents are skipped by their ids
            except Exception as exc:
                failed += 1
                log.exception("storing %s failed", item["path"])
                record_item_failure(rt.db, job_id, item["item_id"], f"{item['path']}: storing failed: {exc}")
    return {"job_id": job_id, "documents": len(items), "failed": failed, "chunks_added": added}


def _ensure_index(rt: WorkerRuntime, dim: int) -> None:
    if dim not in rt.indexed_dims:
        ensure_vector_index(rt.db, rt.specs["embed"].name, dim)
        rt.indexed_dims.add(dim)
