"""The Postgres schema (SQLAlchemy 2 declarative) and the engine factory.

Alembic migrations in migrations/ create exactly these tables; `ensure_schema` runs them on first use.
Vectors live in an untyped pgvector column so several embedders can share one table; each embedder gets a partial
HNSW cosine index over `embedding::vector(dim)` (pgvector indexes at most 2,000 dimensions for `vector`).
"""

from __future__ import annotations

import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from pgvector.sqlalchemy import VECTOR
from sqlalchemy import (
    BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, create_engine, func, text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ragq.core.errors import ConfigError

MAX_INDEXED_DIM = 2000


class Base(DeclarativeBase):
    pass


class Document(Base):
    __tablename__ = "documents"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, comment="sha256 of the canonical document JSON")
    name: Mapped[str] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DocKey(Base):
    """A document's key within its collection, and the version (content-addressed document) it names now."""
    __tablename__ = "doc_keys"
    collection: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(String(36))
    item_id: Mapped[int | None] = mapped_column(BigInteger, comment="the submission that wrote it: a later one wins")
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Chunk(Base):
    __tablename__ = "chunks"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, comment="sha256 of model, document, seq, text")
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    headings: Mapped[list[str]] = mapped_column(JSONB, default=list)
    embed_model: Mapped[str] = mapped_column(String(200))
    dim: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    embedding: Mapped[list[float]] = mapped_column(VECTOR())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(24), index=True)
    documents_total: Mapped[int] = mapped_column(Integer, default=0)
    documents_done: Mapped[int] = mapped_column(Integer, default=0)
    documents_failed: Mapped[int] = mapped_column(Integer, default=0)
    chunks_total: Mapped[int] = mapped_column(Integer, default=0)
    chunks_added: Mapped[int] = mapped_column(Integer, default=0)
    chunks_reused: Mapped[int] = mapped_column(Integer, default=0)
    collection: Mapped[str | None] = mapped_column(Text)
    sync_keys: Mapped[list[str] | None] = mapped_column(JSONB(none_as_null=True), comment="--sync: the keys the job's inputs name")
    synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobItem(Base):
    __tablename__ = "job_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    document_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), comment="queued | done | failed")
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    chunks_added: Mapped[int] = mapped_column(Integer, default=0)
    chunks_reused: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Answer(Base):
    """A background question (a job of kind "questions") and, once answered, its answer and sources."""
    __tablename__ = "answers"
    __table_args__ = (Index("ix_answers_job_id", "job_id", "seq"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    question: Mapped[str] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Text, comment="where it came from, e.g. FILE line N")
    status: Mapped[str] = mapped_column(String(16), comment="queued | done | failed")
    answer: Mapped[str | None] = mapped_column(Text)
    mode: Mapped[str | None] = mapped_column(String(16), comment="generated | extractive | none")
    sources: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StageTiming(Base):
    __tablename__ = "stage_timings"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    task_id: Mapped[str | None] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(32))
    priority: Mapped[str] = mapped_column(String(16))
    batch_size: Mapped[int] = mapped_column(Integer, default=0)
    items: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    queue_ms: Mapped[float] = mapped_column(Float, default=0.0)
    engine_queue_ms: Mapped[float | None] = mapped_column(Float, comment="the part of queue_ms in the engine")
    load_ms: Mapped[float] = mapped_column(Float, default=0.0)
    compute_ms: Mapped[float] = mapped_column(Float, default=0.0)
    first_token_ms: Mapped[float | None] = mapped_column(Float, comment="generate: to the first streamed piece")
    vram_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_stage_timings_stage_model", "stage", "model"),)


class ModelEvent(Base):
    __tablename__ = "model_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    event: Mapped[str] = mapped_column(String(16), comment="load | unload | wake | sleep | evict | oom")
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    ms: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)


class DeviceSample(Base):
    __tablename__ = "device_samples"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(32))
    used_bytes: Mapped[int] = mapped_column(BigInteger)
    budget_bytes: Mapped[int] = mapped_column(BigInteger)
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    resident: Mapped[str | None] = mapped_column(Text)
    busy_ms: Mapped[float | None] = mapped_column(Float)
    interval_ms: Mapped[float | None] = mapped_column(Float)


class TuningKnob(Base):
    __tablename__ = "tuning_knobs"
    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    last_direction: Mapped[int] = mapped_column(Integer, default=0)
    last_moved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TuningAction(Base):
    __tablename__ = "tuning_actions"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
    knob: Mapped[str] = mapped_column(String(300))
    before: Mapped[float | None] = mapped_column(Float)
    after: Mapped[float | None] = mapped_column(Float)
    symptom: Mapped[str] = mapped_column(String(64))
    evidence: Mapped[dict[str, Any]] = mapped_column(JSONB)


class Alert(Base):
    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(300))
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    fired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ModelProfileRow(Base):
    __tablename__ = "model_profiles"
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    device_kind: Mapped[str] = mapped_column(String(200), primary_key=True)
    dtype: Mapped[str] = mapped_column(String(16), primary_key=True)
    weights_bytes: Mapped[int] = mapped_column(BigInteger)
    activations: Mapped[dict[str, int]] = mapped_column(JSONB, default=dict)
    tuned_batch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    """One pooled engine per URL per process (SQLAlchemy engines are meant to be process-wide)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8, future=True)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _migrations_dir() -> Path:
    """The `migrations` package's folder, found without importing it (its env.py imports this module)."""
    from importlib.util import find_spec

    spec = find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migrations package is not installed beside ragq")
    return Path(next(iter(spec.submodule_search_locations)))


def _alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> str:
    """Upgrade the database to `revision` (idempotent; concurrent callers serialise on an advisory lock)."""
    from alembic import command

    command.upgrade(_alembic_config(url), revision)
    return current_revision(url) or ""


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    cfg = _alembic_config("postgresql://unused")
    return str(ScriptDirectory.from_config(cfg).get_current_head())


_migrated: set[str] = set()


def ensure_schema(url: str) -> None:
    """Run migrations once per process per URL, only when the database is behind."""
    if url in _migrated:
        return
    if current_revision(url) != head_revision():
        migrate(url)
    _migrated.add(url)


_SAFE_NAME = re.compile(r"[^a-z0-9]+")


def vector_index_name(model: str, dim: int) -> str:
    import hashlib

    digest = hashlib.sha1(model.encode()).hexdigest()[:8]
    return f"ix_chunks_hnsw_{_SAFE_NAME.sub('_', model.lower())[:30]}_{digest}_{dim}"


def ensure_vector_index(engine: Engine, model: str, dim: int) -> str:
    """Create the partial HNSW cosine index for one embedder's vectors, if missing."""
    if not 0 < dim <= MAX_INDEXED_DIM:
        raise ConfigError(
            f"embedder {model} makes {dim}-dimensional vectors; pgvector indexes at most {MAX_INDEXED_DIM}: "
            "set `dim` in the models file to truncate (Matryoshka)"
        )
    name = vector_index_name(model, dim)
    literal = model.replace("'", "''")
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(7216001)"))
        conn.execute(text(
            f"CREATE INDEX IF NOT EXISTS {name} ON chunks USING hnsw ((embedding::vector({int(dim)})) vector_cosine_ops) "
            f"WHERE embed_model = '{literal}'"
        ))
    return name


# a job item finished (done or failed): the job's counts and status move with it, in the same statement
FINISH_JOB = text("""
UPDATE jobs SET
  documents_done = documents_done + :done,
  documents_failed = documents_failed + :failed,
  chunks_total = chunks_total + :chunks,
  chunks_added = chunks_added + :added,
  chunks_reused = chunks_reused + coalesce(CAST(:reused AS integer), 0),
  updated_at = now(),
  status = CASE
    WHEN documents_done + :done + documents_failed + :failed < documents_total THEN 'running'
    WHEN documents_failed + :failed = 0 THEN 'completed'
    WHEN documents_done + :done = 0 THEN 'failed'
    ELSE 'completed_with_errors' END,
  finished_at = CASE
    WHEN documents_done + :done + documents_failed + :failed >= documents_total THEN now() ELSE NULL END
WHERE id = :job_id
""")
