"""Document versions within a collection: a key names its current version (a content-addressed document);
ingesting the key again with changed content switches it to the new version in one transaction, reusing the old
version's vectors for chunks whose text did not change; a version no key names any more is removed with its chunks.

Readers see the switch whole: a question's search joins `doc_keys`, so it sees the old version or the new one,
never both and never neither (Postgres' snapshot isolation). Two submissions of one key racing end with the later
submission's version: the switch only moves a key forward in submission order (`job_items.id`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, exists, func, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ragq.core.db import Chunk, DocKey, Document
from ragq.core.keys import DEFAULT_COLLECTION


def item_key(item: dict[str, Any]) -> tuple[str, str]:
    """An ingest message item's (collection, key); items queued before collections carry neither."""
    return item.get("collection") or DEFAULT_COLLECTION, item.get("key") or item["path"]


def current_version(conn: Any, collection: str, key: str) -> str | None:
    return conn.execute(select(DocKey.document_id).where(DocKey.collection == collection, DocKey.key == key)
                        ).scalar_one_or_none()


def current_versions(conn: Any, keys: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(collection, key) -> its current version, for every one of `keys` that has one: one query for a batch."""
    if not keys:
        return {}
    rows = conn.execute(select(DocKey.collection, DocKey.key, DocKey.document_id)
                        .where(tuple_(DocKey.collection, DocKey.key).in_(sorted(keys)))).all()
    return {(row.collection, row.key): row.document_id for row in rows}


def reusable_vectors(conn: Any, items: list[dict[str, Any]], model: str
                     ) -> dict[int, dict[tuple[str, tuple[str, ...]], Any]]:
    """Item id -> (text, headings) -> vector of its key's current version's chunks by `model`, for the items whose
    key names another version (a new version's unchanged chunks take them instead of being embedded again)."""
    current = current_versions(conn, {item_key(item) for item in items})
    old = {item["item_id"]: current[item_key(item)] for item in items
           if current.get(item_key(item)) not in (None, item["document_id"])}
    if not old:
        return {}
    rows = conn.execute(select(Chunk.document_id, Chunk.text, Chunk.headings, Chunk.embedding)
                        .where(Chunk.document_id.in_(set(old.values())), Chunk.embed_model == model)).all()
    by_version: dict[str, dict[tuple[str, tuple[str, ...]], Any]] = {}
    for row in rows:
        by_version.setdefault(row.document_id, {})[(row.text, tuple(row.headings or ()))] = row.embedding
    return {item_id: by_version.get(version, {}) for item_id, version in old.items()}


def unchanged(conn: Any, items: list[dict[str, Any]], model: str) -> dict[int, int]:
    """Items whose key names their version already, embedded by `model`: item id -> its stored chunks. Ingesting
    them again changes nothing, so they need no chunking and no embedding."""
    current = current_versions(conn, {item_key(item) for item in items})
    same = {item["item_id"]: item["document_id"] for item in items
            if current.get(item_key(item)) == item["document_id"]}
    if not same:
        return {}
    counts = dict(conn.execute(select(Chunk.document_id, func.count()).where(
        Chunk.document_id.in_(set(same.values())), Chunk.embed_model == model).group_by(Chunk.document_id)).all())
    return {item_id: int(counts[doc]) for item_id, doc in same.items() if counts.get(doc)}


def switch_key(conn: Any, collection: str, key: str, document_id: str, job_id: str, item_id: int) -> bool:
    """Make `document_id` the key's current version unless a later submission got there first; remove the version
    no key names any more. Returns whether `document_id` is current now."""
    old = conn.execute(select(DocKey.document_id).where(DocKey.collection == collection, DocKey.key == key)
                       .with_for_update()).scalar_one_or_none()
    statement = pg_insert(DocKey).values(collection=collection, key=key, document_id=document_id, job_id=job_id,
                                         item_id=item_id)
    conn.execute(statement.on_conflict_do_update(
        index_elements=[DocKey.collection, DocKey.key],
        set_={"document_id": statement.excluded.document_id, "job_id": statement.excluded.job_id,
              "item_id": statement.excluded.item_id, "ingested_at": text("now()")},
        where=(DocKey.item_id.is_(None)) | (DocKey.item_id <= statement.excluded.item_id)))
    now = current_version(conn, collection, key)
    for version in {old, document_id} - {now, None}:
        collect(conn, version)
    return now == document_id


def collect(conn: Any, document_id: str) -> int:
    """Remove a version (its chunks go with it) if no key of any collection names it; returns its chunk count."""
    named = exists().where(DocKey.document_id == document_id)
    chunks = conn.execute(select(Chunk.id).where(Chunk.document_id == document_id)).all()
    removed = conn.execute(delete(Document).where(Document.id == document_id, ~named)).rowcount
    return len(chunks) if removed else 0


def forget(conn: Any, collection: str, keys: list[str] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Remove `keys` (None: every key) of `collection`: their rows, and the versions no other key names, with
    their chunks and vectors. Returns what was removed and the keys that were not there."""
    query = select(DocKey.key, DocKey.document_id).where(DocKey.collection == collection)
    if keys is not None:
        query = query.where(DocKey.key.in_(keys))
    found = {row.key: row.document_id for row in conn.execute(query.with_for_update())}
    removed = []
    for key, document_id in found.items():
        conn.execute(delete(DocKey).where(DocKey.collection == collection, DocKey.key == key))
        removed.append({"key": key, "version": document_id, "chunks_removed": collect(conn, document_id)})
    missing = [k for k in keys if k not in found] if keys is not None else []
    return removed, missing


def sync_if_finished(conn: Any, job_id: str) -> list[dict[str, Any]]:
    """`ragq ingest --sync`: once the job has finished, forget the keys of its collection that none of its inputs
    named (a failed input's key is among them, so its previous version stays). Runs once per job, in the
    transaction that finished it; returns what it removed."""
    job = conn.execute(text(
        "SELECT collection, sync_keys, documents_done FROM jobs WHERE id = :id AND jsonb_typeof(sync_keys) = 'array' "
        "AND synced_at IS NULL AND finished_at IS NOT NULL FOR UPDATE"), {"id": job_id}).mappings().first()
    if job is None:
        return []
    removed: list[dict[str, Any]] = []
    if job["documents_done"]:   # nothing ingested (every input failed): the collection stays as it was
        keep = set(job["sync_keys"])
        folders = tuple(k.rstrip("/") + "/" for k in keep)   # a failed folder keeps what is under it
        stale = [k for k in conn.execute(select(DocKey.key).where(DocKey.collection == job["collection"])).scalars()
                 if k not in keep and not k.startswith(folders)]
        removed, _ = forget(conn, job["collection"], stale) if stale else ([], [])
    conn.execute(text("UPDATE jobs SET synced_at = now() WHERE id = :id"), {"id": job_id})
    return removed
