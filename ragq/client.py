"""The Python API: submit ingestion batches (paths or DoclingDocuments from a Docling pipeline) and ask questions.

    from ragq.client import submit_ingest, ask
    job = submit_ingest(["docs/", converted.document])      # returns at once; work runs on the background queue
    reply = ask("How are urgent questions kept fast?", timeout_s=30)

With no URLs configured the embedded Redis and Postgres are started on demand.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from sqlalchemy import func, insert, select
from sqlalchemy.exc import OperationalError

from ragq.core import tracing
from ragq.core.db import FINISH_JOB, Answer, Job, JobItem, ensure_schema, get_engine
from ragq.core.errors import BadInput, Failure, JobStillRunning, QuestionTimeout, ServiceError, WorkerLost
from ragq.core.services import Endpoints, ensure_services, redact
from ragq.core.settings import Settings, load_settings
from ragq.core.keys import check_collection
from workers.leases import alive_key, urgent_consumers

Source = Union[str, Path, "DoclingDocument"]   # docling-core is imported only to ingest (ask stays light)
if TYPE_CHECKING:
    from docling_core.types.doc import DoclingDocument

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 8000
POLL_S = 0.5   # how often a waiting `ask` looks whether the worker holding its question still lives
CHARS_PER_TOKEN = 4  # a rough size estimate: the client does not tokenise
FINISHED = ("completed", "completed_with_errors", "failed")


@dataclass
class IngestSubmission:
    job_id: str
    documents: int                       # documents accepted and queued
    failed: list[Failure] = field(default_factory=list)  # inputs rejected before queueing
    skipped: list[str] = field(default_factory=list)     # files in the folders given, of other types: not ingested

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "documents": self.documents, "failed": [f.as_dict() for f in self.failed],
                "skipped": self.skipped}


@dataclass
class QuestionsSubmission:
    job_id: str
    questions: int                       # questions accepted and queued
    failed: list[Failure] = field(default_factory=list)  # questions rejected before queueing (empty, too long)

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "questions": self.questions, "failed": [f.as_dict() for f in self.failed]}


def _question_problem(question: str) -> str | None:
    if not question.strip():
        return "is empty"
    if len(question) > MAX_QUESTION_CHARS:
        return f"is {len(question)} characters, over the {MAX_QUESTION_CHARS} limit"
    return None


MAX_QUESTIONS_FILE_BYTES = 16 * 2**20


def questions_from_file(path: Path) -> tuple[list[str], list[str]]:
    """Questions of a text file, one per line (blank lines skipped), with labels naming file and line."""
    if str(path) == "-":
        import sys

        lines, name = sys.stdin.read().splitlines(), "stdin"
    else:
        if not path.is_file():
            raise BadInput(str(path), "does not exist" if not path.exists() else "is not a file")
        if path.stat().st_size > MAX_QUESTIONS_FILE_BYTES:
            raise BadInput(str(path), f"is over {MAX_QUESTIONS_FILE_BYTES // 2**20} MiB; split it")
        try:
            lines, name = path.read_text(encoding="utf-8").splitlines(), str(path)
        except UnicodeDecodeError as exc:
            raise BadInput(str(path), f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    picked = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not picked:
        raise BadInput(name, "has no questions (one per line)")
    return [line for _, line in picked], [f"{name} line {n}" for n, _ in picked]


class Client:
    def __init__(self, settings: Settings | None = None, endpoints: Endpoints | None = None) -> None:
        from workers.celery_app import configure_app

        self.settings = settings or load_settings()
        self.endpoints = endpoints or ensure_services(self.settings)
        self._redis: Any = _reachable_broker(self.endpoints.broker_url)
        try:
            ensure_schema(self.endpoints.database_url)
        except OperationalError as exc:
            reason = str(exc.orig or exc).strip().splitlines()[0]
            raise ServiceError(f"database unreachable at {redact(self.endpoints.database_url)}: {reason}") from None
        self.db = get_engine(self.endpoints.database_url)
        self.app = configure_app(self.settings, self.endpoints)
        tracing.setup(self.settings, "ragq-client")

    def close(self) -> None:
        """Close the client's connections (the broker's Redis, the database pool)."""
        self._redis.close()
        self.db.dispose()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- ingestion --------------------------------------------------------------------------------------------------
    def submit_ingest(self, sources: Source | Iterable[Source], *, batch_docs: int | None = None,
                      collection: str | None = None, key: str | None = None, sync: bool = False) -> IngestSubmission:
        """Validate every input, record a job, and queue the valid documents on the background queue in batches.
        `sources`: one path, folder or DoclingDocument, or an iterable of them; none at all is refused.
        Documents go to `collection` (default "default") under their key: the source as given, normalised (an
        absolute path; a DoclingDocument's origin URI or file name), or `key` for a single source. A key
        ingested again with changed content is replaced by the new version (`ragq docs`). With `sync`, the inputs
        are the collection's whole truth: once the job finishes, its documents that no input named are forgotten
        (a failed input keeps its previous version; a job with nothing ingested forgets nothing).

        Streams: the job row (with its total) is written first, and each task message is published as soon as
        its documents are read, so workers start on the first documents while the rest are still being read.
        A bad input is recorded as a failed item with its error; the others are queued all the same."""
        from tasks.ingest import ingest_documents
        from tasks.versions import sync_if_finished

        from docling_core.types.doc import DoclingDocument

        from ragq.core.documents import LoadedDocument, expand_paths, from_docling
        from ragq.core.keys import check_collection, check_key, docling_key, path_key

        collection = check_collection(collection)

        work: list[tuple[str, Any]] = []
        paths: list[str | Path] = []
        for index, source in enumerate(_sources(sources)):
            if isinstance(source, DoclingDocument):
                work.append((f"<document {index}: {source.name}>", source))
            else:
                paths.append(source)
        skipped: list[Path] = []
        files, failures = expand_paths(paths, skipped)
        work.extend((str(path), path) for path in files)
        if key is not None:
            key = check_key(key)
            if len(work) + len(failures) != 1:
                raise BadInput("key", f"a key names one document, and {len(work) + len(failures)} inputs were given")

        job_id = str(uuid.uuid4())
        with self.db.begin() as conn:
            status = "queued" if work else ("failed" if failures else "completed")
            conn.execute(insert(Job).values(
                id=job_id, kind="ingest", status=status, documents_total=len(work) + len(failures), collection=collection,
                sync_keys=_input_keys(work, failures, key) if sync else None,
                documents_failed=len(failures), finished_at=None if work else func.now(),
            ))
            for failure in failures:
                conn.execute(insert(JobItem).values(job_id=job_id, path=failure.path, status="failed",
                                                    error=failure.error))
            sync_if_finished(conn, job_id)   # a job with nothing to queue is finished already
        batch = batch_docs or self.settings.ingest_batch_docs
        max_chars = self.settings.ingest_task_tokens * CHARS_PER_TOKEN
        queued = 0
        pending: list[tuple[LoadedDocument, str]] = []
        chars = 0

        def publish() -> None:
            nonlocal queued, pending, chars
            with self.db.begin() as conn:
                ids = conn.execute(
                    insert(JobItem).returning(JobItem.id, sort_by_parameter_order=True),
                    [{"job_id": job_id, "path": doc.source, "document_id": doc.document_id, "status": "queued"}
                     for doc, _ in pending],
                ).scalars().all()
            message = [
                {"item_id": item_id, "path": doc.source, "format": doc.format, "document_id": doc.document_id,
                 "collection": collection, "key": doc_key, "document": doc.document.export_to_dict()}
                for item_id, (doc, doc_key) in zip(ids, pending)
            ]
            try:
                ingest_documents.apply_async((job_id, message), queue="background")  # after commit: rows exist
            except Exception as exc:
                self._abandon(job_id, ids, f"not queued: {exc}")
                raise
            queued += len(pending)
            pending, chars = [], 0

        with tracing.span("ingest", job_id=job_id, documents=len(work)):  # the root of the job's trace
            for label, source in work:
                try:
                    doc = from_docling(source, source=label) if isinstance(source, DoclingDocument) \
                        else load_document(source)
                except BadInput as exc:
                    failures.append(Failure(exc.source, exc.problem))
                    with self.db.begin() as conn:
                        conn.execute(insert(JobItem).values(job_id=job_id, path=exc.source, status="failed",
                                                            error=exc.problem))
                        conn.execute(FINISH_JOB, {"job_id": job_id, "done": 0, "failed": 1, "chunks": 0, "added": 0, "reused": 0})
                        sync_if_finished(conn, job_id)
                    continue
                except BaseException as exc:  # interrupted while reading: the job covers what was queued
                    self._abandon(job_id, [], f"not queued: {exc!r}")
                    raise
                size = doc.text_chars
                if pending and (len(pending) >= batch or chars + size > max_chars):
                    publish()
                pending.append((doc, key or (docling_key(source) if isinstance(source, DoclingDocument)
                                             else path_key(source))))
                chars += size
            if pending:
                publish()
        return IngestSubmission(job_id=job_id, documents=queued, failed=failures, skipped=[str(p) for p in skipped])

    # -- what is stored ----------------------------------------------------------------------------------------------
    def collections(self) -> list[dict[str, Any]]:
        from ragq import catalog

        return catalog.collections(self.db)

    def documents(self, collection: str | None = None) -> list[dict[str, Any]]:
        from ragq import catalog

        return catalog.documents(self.db, None if collection is None else catalog.require(self.db, collection))

    def forget(self, keys: Iterable[str] = (), *, collection: str | None = None, everything: bool = False
               ) -> dict[str, Any]:
        """Remove documents by key (or all of a collection); returns {"removed": [...], "missing": [...]}."""
        from ragq import catalog

        removed, missing = catalog.forget(self.db, list(keys), collection, everything)
        return {"collection": check_collection(collection), "removed": removed, "missing": missing}

    def _collection(self, collection: str | None) -> str:
        from ragq import catalog

        return catalog.require(self.db, collection)

    def _abandon(self, job_id: str, item_ids: list[int], error: str) -> None:
        """Submission stopped part-way (the broker away, an interrupt): the items written but not queued fail
        with the error, and the job's total becomes the items it has, so the job still finishes."""
        from tasks.versions import sync_if_finished

        with self.db.begin() as conn:
            if item_ids:
                conn.execute(JobItem.__table__.update().where(JobItem.id.in_(item_ids))
                             .values(status="failed", error=error[:4000]))
            rows = select(func.count()).select_from(JobItem).where(JobItem.job_id == job_id).scalar_subquery()
            conn.execute(Job.__table__.update().where(Job.id == job_id).values(documents_total=rows))
            conn.execute(FINISH_JOB, {"job_id": job_id, "done": 0, "failed": len(item_ids), "chunks": 0, "added": 0, "reused": 0})
            sync_if_finished(conn, job_id)

    def _top_k(self, top_k: int | None) -> int:
        k = int(self.settings.top_k if top_k is None else top_k)
        if not 1 <= k <= 100:
            raise BadInput("--top-k", f"{k} is outside 1..100")
        return k

    # -- background questions ---------------------------------------------------------------------------------------
    def submit_questions(self, questions: Iterable[str], *, top_k: int | None = None, batch: int | None = None,
                         max_new_tokens: int | None = None, labels: list[str] | None = None,
                         collection: str | None = None) -> QuestionsSubmission:
        """Queue questions as background work (a job of kind "questions"): answered behind urgent questions, in
        batches of `batch` per task; answers are kept in Postgres (`job_status`, `ragq job ID`). An empty or
        over-long question is recorded as failed with its problem; the others are queued all the same."""
        from tasks.questions import answer_questions

        k = self._top_k(top_k)
        collection = self._collection(collection)
        size = int(self.settings.question_batch if batch is None else batch)
        if size < 1:
            raise BadInput("--batch", f"{size} is not a positive number of questions")
        listed = [str(q) for q in questions]
        problems = [_question_problem(q) for q in listed]
        job_id = str(uuid.uuid4())
        names = labels or [f"question {n}" for n in range(1, len(listed) + 1)]
        failures = [Failure(name, problem) for name, problem in zip(names, problems) if problem]
        # an over-long question is kept (cut) only to show which one failed
        rows = [{"job_id": job_id, "seq": n, "question": q.strip()[:MAX_QUESTION_CHARS], "label": name,
                 "status": "failed" if problem else "queued", "error": problem}
                for n, (q, problem, name) in enumerate(zip(listed, problems, names), 1)]
        good = [r for r in rows if r["status"] == "queued"]
        with self.db.begin() as conn:
            conn.execute(insert(Job).values(
                id=job_id, kind="questions", status="queued" if good else ("failed" if failures else "completed"),
                documents_total=len(rows), documents_failed=len(failures),
                finished_at=None if good else func.now()))
            ids = conn.execute(insert(Answer).returning(Answer.id, sort_by_parameter_order=True), rows).scalars().all() \
                if rows else []
        queued = [{"answer_id": answer_id, "question": row["question"]}
                  for answer_id, row in zip(ids, rows) if row["status"] == "queued"]
        candidates = max(k, self.settings.rerank_candidates)
        with tracing.span("questions", job_id=job_id, questions=len(queued)):
            for start in range(0, len(queued), size):
                part = queued[start:start + size]
                try:
                    answer_questions.apply_async((job_id, part, k, candidates, max_new_tokens, collection),
                                                 queue="background")
                except Exception as exc:
                    from tasks.questions import finish_answer

                    for item in queued[start:]:
                        finish_answer(self.db, job_id, item["answer_id"], status="failed", error=f"not queued: {exc}")
                    raise
        return QuestionsSubmission(job_id=job_id, questions=len(queued), failed=failures)

    def job_status(self, job_id: str) -> dict[str, Any]:
        with self.db.connect() as conn:
            jobs = Job.__table__
            job = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
            if job is None:
                raise BadInput(job_id, "no such job")
            if job["kind"] == "questions":
                answers = conn.execute(
                    select(Answer.seq, Answer.label, Answer.question, Answer.status, Answer.answer, Answer.mode,
                           Answer.sources, Answer.error).where(Answer.job_id == job_id).order_by(Answer.seq)).mappings().all()
                row = dict(job)
                return {
                    "job_id": job_id, "kind": "questions", "status": row["status"],
                    "questions_total": row["documents_total"], "questions_done": row["documents_done"],
                    "questions_failed": row["documents_failed"],
                    "answers": [{"n": a["seq"], "question": a["question"], "status": a["status"],
                                 "answer": a["answer"], "mode": a["mode"], "sources": a["sources"]}
                                for a in answers if a["status"] == "done"],
                    "failed": [{"n": a["seq"], "path": a["label"], "question": a["question"], "error": a["error"]}
                               for a in answers if a["status"] == "failed"],
                }
            items = conn.execute(
                select(JobItem.path, JobItem.status, JobItem.error, JobItem.chunks, JobItem.chunks_added)
                .where(JobItem.job_id == job_id).order_by(JobItem.id)
            ).mappings().all()
        row = dict(job)
        return {
            "job_id": job_id, "kind": row["kind"], "status": row["status"], "documents_total": row["documents_total"],
            "documents_done": row["documents_done"], "documents_failed": row["documents_failed"],
            "chunks_total": row["chunks_total"], "chunks_added": row["chunks_added"],
            "chunks_reused": row.get("chunks_reused") or 0, "collection": row.get("collection"),
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
                hint = ("it goes on; follow it with `ragq job " + job_id + "`" if urgent_consumers(self._redis)
                        else "no worker is running: start one with `ragq worker`")
                raise JobStillRunning(f"job {job_id} did not finish within {timeout_s:g}s (status {status['status']}): "
                                      f"{hint}", status)
            time.sleep(poll_s)

    # -- questions ----------------------------------------------------------------------------------------------------
    def ask(self, question: str, *, timeout_s: float | None = None, top_k: int | None = None,
            max_new_tokens: int | None = None, stream: str | None = None, collection: str | None = None,
            retrieve_only: bool = False, exact: bool = False) -> dict[str, Any]:
        """A synchronous RPC over the urgent queue. Raises QuestionTimeout if no answer comes in time; the
        question's tasks expire with it, so a late question never runs on the device. `retrieve_only`: the
        passages, no answer generated; `exact`: the reply's `exact` lists the chunks exact search finds with the
        same query vector (both for `ragq eval`)."""
        from tasks.query import question_chain

        question = (question or "").strip()
        problem = _question_problem(question)
        if problem:
            raise BadInput("question", problem)
        timeout = float(self.settings.ask_timeout_s if timeout_s is None else timeout_s)
        if not timeout > 0:
            raise BadInput("--timeout", f"{timeout_s!r} is not a positive number of seconds")
        k = self._top_k(top_k)
        if not urgent_consumers(self._redis):
            raise ServiceError("no worker consumes the urgent queue: start one with `ragq worker` (on this broker: "
                               f"{redact(self.endpoints.broker_url)})")
        started = time.time()
        state = {
            "question": question, "top_k": k, "candidates": max(k, self.settings.rerank_candidates),
            "deadline": started + timeout, "max_new_tokens": max_new_tokens,
        }
        if stream:
            state["stream"] = stream   # the generator appends the answer's pieces there as they come
        if retrieve_only:
            state["retrieve_only"] = True
        if exact:
            state["exact"] = True
        state["collection"] = self._collection(collection)   # the question searches this collection only
        with tracing.span("ask", question_chars=len(question), top_k=k):  # the root of the question's trace
            reply = self._answer(lambda: question_chain(state), started, timeout)
        reply["total_ms"] = round((time.time() - started) * 1000.0, 2)
        return _public_reply(reply)


    def ask_stream(self, question: str, *, timeout_s: float | None = None, top_k: int | None = None,
                   max_new_tokens: int | None = None, collection: str | None = None
                   ) -> Iterator[str | dict[str, Any]]:
        """`ask`, streamed: yields the answer's text pieces as the generator writes them, then the whole reply
        (ragq/streaming.py)."""
        from ragq.streaming import ask_stream

        return ask_stream(self, question, timeout_s=timeout_s, top_k=top_k, max_new_tokens=max_new_tokens,
                          collection=collection)

    def _answer(self, make_chain: Callable[[], Any], started: float, timeout: float) -> dict[str, Any]:
        """Publish the question's chain and wait for its answer. Its later stages run on the urgent consumer that
        took the first one: if that consumer dies mid-question (its heartbeat stops), the question is asked again
        whole, once, while time is left — never left to wait out its timeout."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        deadline = started + timeout
        retried = False
        result = make_chain().apply_async()
        try:
            while True:
                try:
                    return result.get(timeout=max(0.05, min(POLL_S, deadline - time.time())), propagate=True,
                                      disable_sync_subtasks=False)
                except CeleryTimeout:
                    pass
                if time.time() >= deadline:
                    raise QuestionTimeout(
                        f"no answer within {timeout:.1f}s: the urgent queue's workers are busy or stalled (`ragq top` "
                        "shows the queues)") from None
                again = self._retry_if_lost(result, make_chain, retried)
                retried = retried or again is not result
                result = again
        except BaseException:   # a timeout, a lost worker, an interrupt: stop waiting on the results now
            _forget_pending(result)
            raise

    def _retry_if_lost(self, result: Any, make_chain: Callable[[], Any], retried: bool) -> Any:
        lost = self._lost_worker(result)
        if lost is None:
            return result
        if retried:
            raise WorkerLost(f"worker {lost} stopped while answering this question, and so did the worker that "
                             "took it again; ask again once the workers are back")
        log.warning("worker %s stopped mid-question; asking again elsewhere", lost)
        _forget_pending(result)
        return make_chain().apply_async()

    def _lost_worker(self, result: Any) -> str | None:
        """The urgent consumer holding this question's stages, if it has stopped beating (else None)."""
        first = result
        while first.parent is not None:
            first = first.parent
        state = first.state
        if state == "STARTED":
            worker = (first.info or {}).get("hostname") if isinstance(first.info, dict) else None
        elif state == "SUCCESS" and isinstance(first.result, dict):
            worker = first.result.get("worker")
        else:
            return None
        if not worker:
            return None
        return None if self._redis.exists(alive_key(worker)) else str(worker)


def load_document(path: Path) -> Any:
    """ragq.core.documents.load_document, imported on first use (docling-core takes half a second to import)."""
    from ragq.core.documents import load_document as load

    return load(path)


def _forget_pending(result: Any) -> None:
    """Stop waiting on a question's results now (else their __del__ does it at interpreter exit, when the result
    backend is half torn down, and prints a traceback)."""
    while result is not None:
        try:
            result.backend.remove_pending_result(result)
        except Exception:  # noqa: BLE001 - nothing was pending
            pass
        result = result.parent


def _reachable_broker(url: str) -> Any:
    """The broker's Redis, answering within 2 s, or ServiceError naming it (Celery would retry for 20 s and then
    print pages of traceback)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ServiceError(f"broker unreachable at {redact(url)}: {exc}") from None
    return client


def _sources(sources: Any) -> list[Source]:
    """One path or document, or an iterable of them, as a list; a string is one path, never its characters."""
    from docling_core.types.doc import DoclingDocument

    if isinstance(sources, (str, Path, DoclingDocument)):
        return [sources]
    if isinstance(sources, bytes) or not isinstance(sources, Iterable):
        raise TypeError(f"sources: expected a path, a DoclingDocument or an iterable of them, not "
                        f"{type(sources).__name__}")
    listed = list(sources)
    for item in listed:
        if not isinstance(item, (str, Path, DoclingDocument)):
            raise TypeError(f"sources: {item!r} is not a path or a DoclingDocument ({type(item).__name__})")
    if not listed:
        raise BadInput("sources", "nothing to ingest (an empty list)")
    return listed


MAX_REPLY_TEXT_CHARS = 2000   # a source's text in a reply (a chunk is bounded too; this bounds what is sent)


def _bounded(text: str, limit: int = MAX_REPLY_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _input_keys(work: list[tuple[str, Any]], failures: list[Failure], key: str | None) -> list[str]:
    """The keys the inputs name (a failed input's too), for `--sync`."""
    from ragq.core.keys import docling_key, path_key

    if key is not None:
        return [key]
    keys = [path_key(source) if isinstance(source, Path) else docling_key(source) for _, source in work]
    return keys + [path_key(f.path) for f in failures]


def _public_reply(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "question": state["question"],
        "answer": state.get("answer", ""),
        "mode": state.get("mode"),
        "note": state.get("note"),
        "sources": [
            {"document": s["document"], "chunk_id": s["chunk_id"], "score": round(s["score"], 4),
             "text": _bounded(s["text"]), "source": s.get("source"), "key": s.get("key"),
             "headings": s.get("headings") or []}
            for s in state.get("sources", [])
        ],
        "timings": {
            stage: {k: state["timings"][stage].get(k) for k in ("queue_ms", "load_ms", "compute_ms", "model", "batch_size",
                                                                "worker", "first_token_ms")
                    if k != "first_token_ms" or state["timings"][stage].get(k) is not None}
            for stage in ("embed", "search", "rerank", "generate") if stage in state.get("timings", {})
        },
        "total_ms": state.get("total_ms"),
        **({"exact": state["exact"]} if isinstance(state.get("exact"), list) else {}),
    }


_default: Client | None = None


def _client() -> Client:
    global _default
    if _default is None:
        _default = Client()
    return _default


def submit_ingest(sources: Source | Iterable[Source], **kwargs: Any) -> IngestSubmission:
    """Queue documents (paths, folders or DoclingDocument objects) for background ingestion."""
    return _client().submit_ingest(sources, **kwargs)


def ask(question: str, **kwargs: Any) -> dict[str, Any]:
    """Ask a question over the urgent queue and wait for the answer (see Client.ask)."""
    return _client().ask(question, **kwargs)
