"""Background questions: a batch of questions answered as background work (`ragq questions FILE`).

For question sets that need no one waiting — evaluation sets, FAQs answered ahead of time, reports. One task carries
a batch of questions and runs each model stage once for all of them: one embed request for the questions, one
search per question, one rerank request for every (question, passage) pair, one generate request for every prompt;
the engine batches further across concurrent tasks, at background priority, behind urgent questions. Answers are
stored in `answers`, each question in its own transaction, so a redelivered task never answers twice, and the job's
counts move as for ingestion. A question whose stage fails is marked failed with the error; the others complete.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.exc import OperationalError

from ragq.core.answer import extractive_answer, generation_prompt
from ragq.core.db import FINISH_JOB, Answer
from scheduler.batching import BACKGROUND
from tasks.common import sent_at
from ragq.core.keys import DEFAULT_COLLECTION
from tasks.query import search_chunks
from workers.celery_app import RagqTask, app

log = logging.getLogger(__name__)


def finish_answer(db: Any, job_id: str, answer_id: int, **values: Any) -> bool:
    """Move one question out of 'queued' exactly once, counting it on the job."""
    with db.begin() as conn:
        moved = conn.execute(update(Answer).where(Answer.id == answer_id, Answer.status == "queued")
                             .values(updated_at=text("now()"), **values)).rowcount
        if moved:
            failed = values.get("status") == "failed"
            conn.execute(FINISH_JOB, {"job_id": job_id, "done": 0 if failed else 1, "failed": 1 if failed else 0,
                                      "chunks": 0, "added": 0, "reused": 0})
    return bool(moved)


class QuestionsTask(RagqTask):
    """When a questions task fails for good, its questions still queued are marked failed with the error."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        try:
            job_id, items = (list(args) + [kwargs.get("job_id"), kwargs.get("items")])[:2]
            db = self.app.require_runtime().db
            for item in items or []:
                finish_answer(db, job_id, item["answer_id"], status="failed",
                        error=f"answering failed: {type(exc).__name__}: {exc}"[:4000])
        except Exception:
            log.exception("could not record the failure of questions task %s", task_id)


@app.task(name="ragq.answer_questions", bind=True, base=QuestionsTask, autoretry_for=(OperationalError,),
          retry_backoff=True, retry_backoff_max=60, max_retries=8)
def answer_questions(self: Any, job_id: str, items: list[dict[str, Any]], top_k: int, candidates: int,
                     max_new_tokens: int | None = None, collection: str = DEFAULT_COLLECTION) -> dict[str, Any]:
    rt = self.app.require_runtime()
    context = {"priority": BACKGROUND, "job_id": job_id, "task_id": self.request.id}
    with rt.db.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'running', updated_at = now() WHERE id = :id AND status = 'queued'"),
                     {"id": job_id})
        done = set(conn.execute(text("SELECT id FROM answers WHERE id = ANY(:ids) AND status <> 'queued'"),
                                {"ids": [i["answer_id"] for i in items]}).scalars())
    todo = [i for i in items if i["answer_id"] not in done]   # a redelivered task skips what it answered
    failed: dict[int, str] = {}

    def fail_all(stage: str, exc: Exception) -> None:
        for item in todo:
            failed.setdefault(item["answer_id"], f"{stage} failed: {type(exc).__name__}: {exc}")

    if not todo:
        return {"job_id": job_id, "questions": len(items), "answered": 0, "failed": 0}
    questions = [i["question"] for i in todo]
    vectors: list[list[float]] = []
    embed_model = ""
    try:
        with rt.stage("embed", sent_at=sent_at(self.request), **context) as clock:
            result = rt.engine.run("embed", questions, priority=BACKGROUND, params={"kind": "query"})
            clock.from_engine(result)
        vectors, embed_model = result.outputs, result.model
    except OperationalError:
        raise
    except Exception as exc:
        fail_all("embed", exc)

    found: dict[int, list[dict[str, Any]]] = {}
    if vectors:
        with rt.stage("search", sent_at=None, **context) as clock:
            clock.model = "pgvector-hnsw"
            for item, vector in zip(todo, vectors):
                found[item["answer_id"]] = search_chunks(rt, vector, embed_model, max(top_k, candidates), collection)
                clock.items += len(found[item["answer_id"]])

    pairs = [(item, c) for item in todo if item["answer_id"] in found for c in found[item["answer_id"]]]
    if pairs and rt.engine.has_role("rerank"):
        try:
            with rt.stage("rerank", sent_at=None, **context) as clock:
                result = rt.engine.run("rerank", [[item["question"], c["text"]] for item, c in pairs],
                                       priority=BACKGROUND)
                clock.from_engine(result)
            for (_, candidate), score in zip(pairs, result.outputs):
                candidate["score"] = float(score)
        except OperationalError:
            raise
        except Exception as exc:
            fail_all("rerank", exc)
    sources = {key: sorted(found[key], key=lambda c: -c["score"])[:top_k] for key in found if key not in failed}

    answers: dict[int, tuple[str, str]] = {}
    for item in todo:
        key = item["answer_id"]
        if key in sources and not sources[key]:
            answers[key] = ("No ingested passage matches this question: ingest documents first (`ragq ingest`).",
                            "none")
    ready = [item for item in todo if sources.get(item["answer_id"])]
    if ready and rt.engine.has_role("generate"):
        spec = rt.specs["generate"]
        passages = max(1, int(rt.knob("generate_chunks", top_k)))
        cap = int(rt.knob("max_new_tokens", spec.max_new_tokens))
        tokens = min(max_new_tokens or spec.max_new_tokens, cap)
        prompts = [generation_prompt(item["question"], [s["text"] for s in sources[item["answer_id"]][:passages]])
                   for item in ready]
        try:
            with rt.stage("generate", sent_at=None, **context) as clock:
                result = rt.engine.run("generate", prompts, priority=BACKGROUND, params={"max_new_tokens": tokens})
                clock.from_engine(result)
            for item, output in zip(ready, result.outputs):
                answers[item["answer_id"]] = (output, "generated")
        except OperationalError:
            raise
        except Exception as exc:
            fail_all("generate", exc)
    elif ready:
        for item in ready:
            key = item["answer_id"]
            answers[key] = (extractive_answer(item["question"], [s["text"] for s in sources[key]]), "extractive")

    answered = 0
    for item in todo:
        key = item["answer_id"]
        if key in failed:
            finish_answer(rt.db, job_id, key, status="failed", error=failed[key][:4000])
        elif key in answers:
            answer, mode = answers[key]
            public = [{k: s[k] for k in ("chunk_id", "document", "source", "text", "headings")}
                      | {"score": round(s["score"], 4)} for s in sources.get(key, [])]
            answered += finish_answer(rt.db, job_id, key, status="done", answer=answer, mode=mode, sources=public)
    return {"job_id": job_id, "questions": len(items), "answered": answered, "failed": len(failed)}
