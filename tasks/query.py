"""Urgent questions: a Celery chain embed -> search -> rerank -> generate on the urgent queue.

Each task takes the state dict the previous one returned and adds to it. A request whose deadline passed is
dropped before it reaches the device: Celery's `expires` stops tasks not yet started, the engine drops expired
requests still pending, and each task checks the deadline when it starts.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import chain
from sqlalchemy import text

from ragq.core.answer import EXTRACTIVE_NOTE, extractive_answer, generation_prompt
from ragq.core.errors import RequestExpired
from ragq.core.keys import DEFAULT_COLLECTION
from scheduler.batching import URGENT
from tasks.common import engine_deadline, sent_at
from workers.celery_app import URGENT_QUEUE, app, direct_queue

STAGES = ("embed", "search", "rerank", "generate")


def _begin(task: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    deadline = state.get("deadline")
    if deadline is not None and time.time() > deadline:
        raise RequestExpired(f"question expired {time.time() - deadline:.2f}s ago; its caller has gone")
    rt = task.app.require_runtime()
    stay_on_this_worker(task)
    context = {"priority": URGENT, "job_id": None, "task_id": task.request.id, "sent_at": sent_at(task.request)}
    return rt, context


def stay_on_this_worker(task: Any) -> None:
    """Route the question's remaining stages to this urgent consumer's own queue (Celery runs the next stage of a
    chain from the request's `chain`, once this task returns), so the prewarm of the next stage's model and the
    engine's "next stage expected" protection help the device that runs it."""
    queue = direct_queue(task.request.hostname)
    for signature in task.request.chain or ():
        signature.setdefault("options", {})["queue"] = queue


def _keep_timing(state: dict[str, Any], stage: str, clock: Any, worker: str | None = None) -> None:
    state.setdefault("timings", {})[stage] = {
        "worker": worker,
        "queue_ms": round(clock.extra.get("queue_ms", 0.0), 2),
        "load_ms": round(clock.load_ms, 2),
        "compute_ms": round(clock.extra.get("compute_ms", 0.0), 2),
        "model": clock.model,
        "batch_size": clock.batch_size,
    }
    if clock.first_token_ms is not None:   # generate: the stage's start to its answer's first piece
        state["timings"][stage]["first_token_ms"] = round(clock.first_token_ms, 2)


@app.task(name="ragq.query.embed", bind=True)
def embed_query(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    rt, context = _begin(self, state)
    with rt.stage("embed", **context) as clock:
        result = rt.engine.run(
            "embed", [state["question"]], priority=URGENT, deadline=engine_deadline(state.get("deadline")),
            params={"kind": "query"},
        )
        clock.from_engine(result)
    _keep_timing(state, "embed", clock, self.request.hostname)
    if rt.engine.has_role("rerank"):
        rt.engine.prewarm("rerank")  # wake the reranker while Postgres searches
    if rt.engine.has_role("generate") and getattr(getattr(rt, "settings", None), "prewarm_generator", True):
        # and the generator, while the search and the rerank run: where the budget holds the embedder or the
        # generator but not both, the question's generate stage would evict the idle embedder moments later anyway
        rt.engine.prewarm("generate", urgent=True)
    state["vector"] = result.outputs[0]
    state["embed_model"] = result.model
    state["worker"] = self.request.hostname   # where its later stages run (a client watches that it lives)
    return state


_SIZES: dict[tuple[str, str, str], tuple[float, int, int]] = {}   # (db, collection, model) -> (at, chunks, total)
_SIZES_LOCK = threading.Lock()
SIZES_TTL_S = 60.0


def collection_size(db: Any, collection: str, embed_model: str) -> tuple[int, int]:
    """(chunks of `embed_model` in `collection`'s current versions, chunks in the table), counted at most once a
    minute per process."""
    key = (str(db.url), collection, embed_model)
    now = time.monotonic()
    with _SIZES_LOCK:
        cached = _SIZES.get(key)
    if cached is not None and now - cached[0] < SIZES_TTL_S:
        return cached[1], cached[2]
    with db.connect() as conn:
        size = conn.execute(text(
            "SELECT count(*) FROM doc_keys k JOIN chunks c ON c.document_id = k.document_id "
            "WHERE k.collection = :c AND c.embed_model = :m"), {"c": collection, "m": embed_model}).scalar_one()
        total = conn.execute(text("SELECT greatest(reltuples::bigint, 0) FROM pg_class WHERE relname = 'chunks'")
                             ).scalar() or 0
    total = max(int(total), int(size))
    with _SIZES_LOCK:
        _SIZES[key] = (now, int(size), total)
    return int(size), total


def search_plan(size: int, total: int, wanted: int, ef_min: int = 400, exact_under: int = 50_000
                ) -> tuple[str, int]:
    """("exact", 0) for a collection small enough to compare every chunk, else ("hnsw", ef_search): at least
    `ef_min` and twice the rows wanted, scaled by the share of the table outside the collection (pgvector 0.6
    filters by collection after the index scan: a collection of a tenth of the table keeps a tenth of the
    candidates), at most pgvector's 1,000."""
    if size < exact_under or size <= wanted:
        return "exact", 0
    share = size / max(total, size)
    return "hnsw", int(min(1000, max(ef_min, 2 * wanted) / max(share, 1e-3)))


def search_chunks(rt: Any, vector: list[float], embed_model: str, wanted: int,
                  collection: str = DEFAULT_COLLECTION, exact: bool = False) -> list[dict[str, Any]]:
    """The `wanted` chunks nearest to `vector` among the current versions of `collection`'s documents embedded by
    `embed_model` (cosine). A small collection is searched exactly; a larger one through the model's HNSW index
    with enough candidates for its share of the table (`search_plan`); should the index scan still come back
    short, exactly. `exact` compares every chunk whatever the size (`ragq eval`'s reference)."""
    dim = int(len(vector))
    # dim is an int from len(): vector(N) is a type modifier, which Postgres takes only as a literal; the values
    # (the query vector, the model, the collection, the limit) are bound parameters
    distance = f"(c.embedding::vector({dim})) <=> CAST(:q AS vector({dim}))"
    sql = text(f"""
        SELECT c.id, c.text, c.headings, d.name AS document, d.source, k.key, 1 - ({distance}) AS score
        FROM chunks c JOIN doc_keys k ON k.document_id = c.document_id AND k.collection = :collection
             JOIN documents d ON d.id = c.document_id
        WHERE c.embed_model = :model AND c.dim = {dim}
        ORDER BY {distance}
        LIMIT :n
    """)  # noqa: S608
    params = {"q": str(vector), "model": embed_model, "n": wanted, "collection": collection}
    settings = getattr(rt, "settings", None)
    size, total = collection_size(rt.db, collection, embed_model)
    how, ef = ("exact", 0) if exact else search_plan(size, total, wanted, getattr(settings, "hnsw_ef_search", 400),
                                                     getattr(settings, "exact_search_under", 50_000))
    with rt.db.begin() as conn:
        rows: list[Any] = []
        if how == "hnsw":
            conn.execute(text(f"SET LOCAL hnsw.ef_search = {int(ef)}"))
            rows = list(conn.execute(sql, params).mappings().all())
        if len(rows) < wanted:   # exact over the collection (no index scan), which has all it holds
            conn.execute(text("SET LOCAL enable_indexscan = off"))
            rows = list(conn.execute(sql, params).mappings().all())
    return [
        {"chunk_id": r["id"], "document": r["document"], "source": r["source"], "key": r["key"], "text": r["text"],
         "headings": r["headings"], "score": float(r["score"]), "similarity": float(r["score"])}
        for r in rows
    ]


@app.task(name="ragq.query.search", bind=True)
def search(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    rt, context = _begin(self, state)
    vector = state.pop("vector")
    wanted = max(state["top_k"], state.get("candidates", state["top_k"]))
    with rt.stage("search", **context) as clock:
        clock.model = "pgvector-hnsw"
        state["candidates"] = search_chunks(rt, vector, state["embed_model"], wanted,
                                            state.get("collection") or DEFAULT_COLLECTION)
        clock.items = len(state["candidates"])
    if state.get("exact"):   # `ragq eval`: exact search with the same vector, beside the answer's (not timed)
        state["exact"] = [{"chunk_id": c["chunk_id"], "key": c["key"], "score": c["score"]} for c in search_chunks(
            rt, vector, state["embed_model"], wanted, state.get("collection") or DEFAULT_COLLECTION, exact=True)]
    _keep_timing(state, "search", clock, self.request.hostname)
    return state


@app.task(name="ragq.query.rerank", bind=True)
def rerank(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    rt, context = _begin(self, state)
    candidates = state.pop("candidates")
    with rt.stage("rerank", **context) as clock:
        if rt.engine.has_role("rerank") and candidates:
            result = rt.engine.run(
                "rerank", [[state["question"], c["text"]] for c in candidates], priority=URGENT,
                deadline=engine_deadline(state.get("deadline")),
            )
            clock.from_engine(result)
            for candidate, score in zip(candidates, result.outputs):
                candidate["score"] = float(score)
            candidates.sort(key=lambda c: -c["score"])
        else:
            clock.model = "vector-similarity"  # no reranker configured: keep the search order
            clock.items = len(candidates)
    _keep_timing(state, "rerank", clock, self.request.hostname)
    if rt.engine.has_role("generate"):
        rt.engine.prewarm("generate")
    state["sources"] = candidates[: state["top_k"]]
    return state


@app.task(name="ragq.query.generate", bind=True)
def generate(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    rt, context = _begin(self, state)
    sources = state["sources"]
    passages = [s["text"] for s in sources]
    with rt.stage("generate", **context) as clock:
        if rt.engine.has_role("generate"):  # the tuner's caps: fewer passages and tokens when generation is slow
            passages = passages[: max(1, int(rt.knob("generate_chunks", len(passages))))]
            spec = rt.specs["generate"]
            cap = int(rt.knob("max_new_tokens", spec.max_new_tokens))
            asked = state.get("max_new_tokens") or spec.max_new_tokens
            state["max_new_tokens"] = min(asked, cap)
        if state.get("retrieve_only"):   # `ragq eval`: the ranking is what is measured
            clock.model = "none"
            state["answer"] = ""
            state["mode"] = "retrieval"
        elif not sources:
            clock.model = "none"
            state["answer"] = "No ingested passage matches this question: ingest documents first (`ragq ingest`)."
            state["mode"] = "none"
        elif rt.engine.has_role("generate"):
            params: dict[str, Any] = {"max_new_tokens": state["max_new_tokens"]} if state.get("max_new_tokens") else {}
            if state.get("stream"):
                params["stream"] = state["stream"]   # the answer's pieces go there as they are generated
            result = rt.engine.run(
                "generate", [generation_prompt(state["question"], passages)], priority=URGENT,
                deadline=engine_deadline(state.get("deadline")), params=params,
            )
            clock.from_engine(result)
            state["answer"] = result.outputs[0]
            state["mode"] = "generated"
        else:
            clock.model = "extractive"
            clock.items = len(passages)
            state["answer"] = extractive_answer(state["question"], passages)
            state["mode"] = "extractive"
            state["note"] = EXTRACTIVE_NOTE
    _keep_timing(state, "generate", clock, self.request.hostname)
    return state


def question_chain(state: dict[str, Any]) -> Any:
    """The urgent chain for one question; every task in it expires at the question's deadline."""
    from datetime import datetime, timezone

    options = {"queue": URGENT_QUEUE, "expires": datetime.fromtimestamp(state["deadline"], tz=timezone.utc)}
    return chain(
        embed_query.s(state).set(**options), search.s().set(**options), rerank.s().set(**options),
        generate.s().set(**options),
    )
