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
