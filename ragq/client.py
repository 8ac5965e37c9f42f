"""The Python API: submit ingestion batches (paths or DoclingDocuments from a Docling pipeline) and ask questions.

    from ragq.client import submit_ingest, ask
    job = submit_ingest(["docs/", converted.document])      # returns at once; work runs on the background queue
    reply = ask("How are urgent questions kept fast?", timeout_s=30)

With no URLs configured the embedded Redis and Postgres are started on demand.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docling_core.types.doc import DoclingDocument
from sqlalchemy import func, insert, select

from ragq import tracing
from ragq.db import Job, JobItem, ensure_schema, get_engine
from ragq.documents import Failure, LoadedDocument, expand_paths, from_docling, load_document
from ragq.errors import BadInput, QuestionTimeout, RagqError
from ragq.services import Endpoints, ensure_services
from ragq.settings import Settings, load_settings

Source = str | Path | DoclingDocument
MAX_QUESTION_CHARS = 8000
CHARS_PER_TOKEN = 4  # a rough size estimate: the client does not tokenise
FINISHED = ("completed", "completed_with_errors", "failed")


@dataclass
class IngestSubmission:
    job_id: str
    documents: int                       # documents accepted and queued
    failed: list[Failure] = field(default_factory=list)  # inputs rejected before queueing

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "documents": self.documents, "failed": [f.as_dict() for f in self.failed]}


class Client:
    def __init__(self, settings: Settings | None = None, endpoints: Endpoints | None = None) -> None:
        from workers.celery_app import configure_app

        self.settings = settings or load_settings()
        self.endpoints = endpoints or ensure_services(self.settings)
        ensure_schema(self.endpoints.database_url)
        self.db = get_engine(self.endpoints.database_url)
        self.app = configure_app(self.settings, self.endpoints)
        tracing.setup(self.settings, "ragq-client")

    # -- ingestion --------------------------------------------------------------------------------------------------
    def submit_ingest(self, sources: Iterable[Source], *, batch_docs: int | None = None) -> IngestSubmission:
        """Validate every input, record a job, and queue the valid documents on the background queue in batches.

        A bad input is recorded as a failed item with its error; the others are queued all the same."""
        from tasks.ingest import ingest_documents

        loaded: list[LoadedDocument] = []
        failures: list[Failure] = []
        paths: list[str | Path] = []
        for index, source in enumerate(sources):
            if isinstance(source, DoclingDocument):
                try:
                    loaded.append(from_docling(source, source=f"<document {index}: {source.name}>"))
                except BadInput as exc:
                    failures.append(Failure(exc.source, exc.problem))
            else:
                paths.append(source)
        files, path_failures = expand_paths(paths)
        failures.extend(path_failures)
        for path in files:
            try:
                loaded.append(load_document(path))
            except BadInput as exc:
                failures.append(Failure(exc.source, exc.problem))

        job_id = str(uuid.uuid4())
        batch = batch_docs or self.settings.ingest_batch_docs
        messages: list[list[dict[str, Any]]] = []
        with self.db.begin() as conn:
            status = "queued" if loaded else ("failed" if failures else "completed")
            conn.execute(insert(Job).values(
                id=job_id, kind="ingest", status=status, documents_total=len(loaded) + len(failures),
                documents_failed=len(failures), finished_at=None if loaded else func.now(),
            ))
            for failure in failures:
                conn.execute(insert(JobItem).values(job_id=job_id, path=failure.path, status="failed",
                                                    error=failure.error))
            items = []
            for doc in loaded:
                item_id = conn.execute(insert(JobItem).values(
                    job_id=job_id, path=doc.source, document_id=doc.document_id, status="queued",
                ).returning(JobItem.id)).scalar_one()
                items.append({
                    "item_id": item_id, "path": doc.source, "format": doc.format, "document_id": doc.document_id,
                    "document": doc.document.export_to_dict(),
                })
            messages = pack_messages(items, [doc.text_chars for doc in loaded], batch,
                                     self.settings.ingest_task_tokens * CHARS_PER_TOKEN)
        with tracing.span("ingest", job_id=job_id, documents=len(loaded)):  # the root of the job's trace
            for message in messages:  # after commit, so a fast worker finds its rows
                ingest_documents.apply_async((job_id, message), queue="background")
        return IngestSubmission(job_id=job_id, documents=len(loaded), failed=failures)

    def job_status(self, job_id: str) -> dict[str, Any]:
        with self.db.connect() as conn:
            jobs = Job.__table__
            job = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
            if job is None:
                raise BadInput(job_id, "no such job")
            items = conn.execute(
                select(JobItem.path, JobItem.status, JobItem.error, JobItem.chunks, JobItem.chunks_added)
                .where(JobItem.job_id == job_id).order_by(JobItem.id)
            ).mappings().all()
        row = dict(job)
        return {
            "job_id": job_id, "status": row["status"], "documents_total": row["documents_total"],
            "documents_done": row["documents_done"], "documents_failed": row["documents_failed"],
            "chunks_total": row["chunks_total"], "chunks_added": row["chunks_added"],
            "failed": [{"path": i["path"], "error": i["error"]} for i in items if i["status"] == "failed"],
        }

    def wait_for_job(
        self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 0.25,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.job_status(job_id)
            if on_progress is not None:
                on_progress(status)
            if status["status"] in FINISHED:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise RagqError(f"job {job_id} did not finish within {timeout_s:.0f}s (status {status['status']}); "
                                "is a worker running? (`ragq worker`)")
            time.sleep(poll_s)

    # -- questions ----------------------------------------------------------------------------------------------------
    def ask(self, question: str, *, timeout_s: float | None = None, top_k: int | None = None,
            max_new_tokens: int | None = None) -> dict[str, Any]:
        """A synchronous RPC over the urgent queue. Raises QuestionTimeout if no answer comes in time; the
        question's tasks expire with it, so a late question never runs on the device."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        from tasks.query import question_chain

        question = (question or "").strip()
        if not question:
            raise BadInput("question", "is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise BadInput("question", f"is {len(question)} characters, over the {MAX_QUESTION_CHARS} limit")
        timeout = float(timeout_s or self.settings.ask_timeout_s)
        k = int(top_k or self.settings.top_k)
        if not 1 <= k <= 100:
            raise BadInput("--top-k", f"{k} is outside 1..100")
        started = time.time()
        state = {
            "question": question, "top_k": k, "candidates": max(k, self.settings.rerank_candidates),
            "deadline": started + timeout, "max_new_tokens": max_new_tokens,
        }
        with tracing.span("ask", question_chars=len(question), top_k=k):  # the root of the question's trace
            result = question_chain(state).apply_async()
            try:
                reply = result.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
            except CeleryTimeout:
                raise QuestionTimeout(
                    f"no answer within {timeout:.1f}s: is a worker running (`ragq worker`) and the urgent queue "
                    "moving?") from None
        reply["total_ms"] = round((time.time() - started) * 1000.0, 2)
        return _public_reply(reply)


def pack_messages(items: list[dict[str, Any]], sizes: list[int], max_docs: int, max_chars: int,
                  ) -> list[list[dict[str, Any]]]:
    """Group documents into task messages of at most `max_docs` documents and about `max_chars` of text; a
    document larger than that travels alone."""
    messages: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    chars = 0
    for item, size in zip(items, sizes):
        if current and (len(current) >= max_docs or chars + size > max_chars):
            messages.append(current)
            current, chars = [], 0
        current.append(item)
        chars += size
    if current:
        messages.append(current)
    return messages


def _public_reply(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "question": state["question"],
        "answer": state.get("answer", ""),
        "mode": state.get("mode"),
        "note": state.get("note"),
        "sources": [
            {"document": s["document"], "chunk_id": s["chunk_id"], "score": round(s["score"], 4),
             "text": s["text"], "source": s.get("source"), "headings": s.get("headings") or []}
            for s in state.get("sources", [])
        ],
        "timings": {
            stage: {k: state["timings"][stage][k] for k in ("queue_ms", "load_ms", "compute_ms", "model", "batch_size")}
            for stage in ("embed", "search", "rerank", "generate") if stage in state.get("timings", {})
        },
        "total_ms": state.get("total_ms"),
    }


_default: Client | None = None


def _client() -> Client:
    global _default
    if _default is None:
        _default = Client()
    return _default


def submit_ingest(sources: Iterable[Source], **kwargs: Any) -> IngestSubmission:
    """Queue documents (paths, folders or DoclingDocument objects) for background ingestion."""
    return _client().submit_ingest(sources, **kwargs)


def ask(question: str, **kwargs: Any) -> dict[str, Any]:
    """Ask a question over the urgent queue and wait for the answer (see Client.ask)."""
    return _client().ask(question, **kwargs)
