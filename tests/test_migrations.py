"""Migrations on a database of their own in the session's Postgres: rows from before collections (0008) get the
collection "default" and their source as key (the newest document of a source where several were ingested), with
their chunks and vectors untouched."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

pytestmark = pytest.mark.integration


@pytest.fixture()
def scratch_url(db_engine):  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    name = f"mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(db_engine.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = db_engine.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        from ragq.core.db import get_engine

        get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_existing_documents_get_a_collection_and_a_key(scratch_url: str) -> None:
    from ragq.core.db import get_engine, migrate

    assert migrate(scratch_url, "0008") == "0008"
    engine = get_engine(scratch_url)
    with engine.begin() as conn:
        for doc, source, age in (("old", "notes.md", "2 days"), ("new", "notes.md", "1 day"), ("other", "a.md", "1 day")):
            conn.execute(text(f"INSERT INTO documents (id, name, source, format, meta, created_at) VALUES "
                              f"(:id, 'n', :source, 'markdown', '{{}}', now() - interval '{age}')"),
                         {"id": doc, "source": source})
            conn.execute(text("INSERT INTO chunks (id, document_id, seq, text, headings, embed_model, dim, tokens, "
                              "embedding) VALUES (:id, :doc, 0, 't', '[]', 'm', 3, 1, '[1,0,0]')"),
                         {"id": f"c-{doc}", "doc": doc})
    assert migrate(scratch_url) >= "0009"
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT collection, key, document_id FROM doc_keys ORDER BY key")).all()
        chunks = conn.execute(text("SELECT count(*) FROM chunks")).scalar()
        reused = conn.execute(text("SELECT column_name FROM information_schema.columns "
                                   "WHERE table_name = 'jobs' AND column_name = 'chunks_reused'")).scalar()
    assert [tuple(k) for k in keys] == [("default", "a.md", "other"), ("default", "notes.md", "new")]
    assert chunks == 3 and reused == "chunks_reused"


def test_a_1024_dimension_vector_stays_in_its_row(scratch_url: str) -> None:
    """A 4 KB vector with a chunk's text is stored inline (an exact search reads it with the row, not from the
    TOAST table); before 0011 the same row went out of line."""
    from ragq.core.db import get_engine, migrate

    vector = "[" + ",".join(["0.03125"] * 1024) + "]"
    text_1k = "word " * 240   # a 256-token chunk's text

    def toast_bytes(engine, table: str) -> int:  # type: ignore[no-untyped-def]
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO documents (id, name, source, format, meta) VALUES "
                              "(:id, 'n', :source, 'text', '{}')"), {"id": f"d-{table}", "source": table})
            for i in range(20):
                conn.execute(text("INSERT INTO chunks (id, document_id, seq, text, headings, embed_model, dim, "
                                  "tokens, embedding) VALUES (:id, :doc, :i, :t, '[]', 'm', 1024, 256, :v)"),
                             {"id": f"{table}-{i}", "doc": f"d-{table}", "i": i, "t": text_1k, "v": vector})
            return int(conn.execute(text("SELECT pg_relation_size(reltoastrelid) FROM pg_class "
                                         "WHERE relname = 'chunks'")).scalar())

    assert migrate(scratch_url, "0010") == "0010"
    engine = get_engine(scratch_url)
    before = toast_bytes(engine, "before")
    assert before > 20 * 4096   # out of line at the default target
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE chunks, documents CASCADE"))
    assert migrate(scratch_url) >= "0011"
    with engine.connect() as conn:
        options = conn.execute(text("SELECT reloptions FROM pg_class WHERE relname = 'chunks'")).scalar()
    assert "toast_tuple_target=8160" in options
    assert toast_bytes(engine, "after") == 0
