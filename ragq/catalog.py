"""What is stored, by collection: the collections with their document and chunk counts, the documents of one
(key, version, chunks, when, by which job), and forgetting documents (their versions, chunks and vectors go)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from ragq.core.errors import BadInput
from ragq.core.keys import DEFAULT_COLLECTION, check_collection, check_key
from tasks.versions import forget as forget_keys


def require(db: Any, collection: str | None) -> str:
    """The collection's checked name; BadInput when it holds no document (the default collection may be empty)."""
    name = check_collection(collection)
    if name != DEFAULT_COLLECTION:
        with db.connect() as conn:
            if conn.execute(text("SELECT 1 FROM doc_keys WHERE collection = :c LIMIT 1"), {"c": name}).first() is None:
                raise BadInput("--collection", f"no collection named {name!r}: `ragq collections` lists them")
    return name


def collections(db: Any) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(text("""
            SELECT k.collection, count(*) AS documents, coalesce(sum(n.chunks), 0) AS chunks,
                   max(k.ingested_at) AS last_ingested
            FROM doc_keys k LEFT JOIN LATERAL (SELECT count(*) AS chunks FROM chunks c
                                               WHERE c.document_id = k.document_id) n ON true
            GROUP BY k.collection ORDER BY k.collection""")).mappings().all()
    return [dict(r, chunks=int(r["chunks"]), documents=int(r["documents"])) for r in rows]


def documents(db: Any, collection: str | None = None) -> list[dict[str, Any]]:
    where = "WHERE k.collection = :collection" if collection is not None else ""
    with db.connect() as conn:
        rows = conn.execute(text(f"""
            SELECT k.collection, k.key, k.document_id AS version, d.name, k.ingested_at, k.job_id,
                   (SELECT count(*) FROM chunks c WHERE c.document_id = k.document_id) AS chunks
            FROM doc_keys k JOIN documents d ON d.id = k.document_id {where}
            ORDER BY k.collection, k.key"""), {"collection": collection}).mappings().all()  # noqa: S608
    return [dict(r, chunks=int(r["chunks"])) for r in rows]


def forget(db: Any, keys: list[str], collection: str | None = None, everything: bool = False
           ) -> tuple[list[dict[str, Any]], list[str]]:
    """Remove `keys` of `collection` (or, with `everything`, all of its documents), in one transaction: the keys,
    and the versions no other key names with their chunks and vectors. Returns what was removed and the keys
    that were not there (the others are removed all the same)."""
    keys = [check_key(k) for k in keys]
    if everything and keys:
        raise BadInput("forget", "give keys or --all, not both")
    if not everything and not keys:
        raise BadInput("forget", "give the keys to forget (see `ragq docs`), or --all with --collection")
    name = require(db, collection)
    with db.begin() as conn:
        return forget_keys(conn, name, None if everything else list(dict.fromkeys(keys)))
