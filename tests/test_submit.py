"""Submitting ingestion: messages go out while later documents are still being read, and a submission that stops
part-way (the broker away) leaves a job that still adds up. Real Postgres; the publish call is intercepted so
that nothing reaches the shared test broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

pytestmark = pytest.mark.integration


def _corpus(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"doc-{i:02d}.md"
        path.write_text(f"# Document {i}\n\nThe lighthouse keeper logged {i} ships passing the reef tonight.\n")
        paths.append(path)
    return paths


def test_the_first_task_is_queued_before_the_last_document_is_read(client, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ragq.client as client_module
    from tasks.ingest import ingest_documents

    events: list[str] = []
    real_load = client_module.load_document

    def load(path: Path) -> Any:
        events.append(f"read {Path(path).name}")
        return real_load(path)

    def publish(args: tuple[str, list[dict[str, Any]]], **options: Any) -> None:
        events.append(f"queue {len(args[1])}")

    monkeypatch.setattr(client_module, "load_document", load)
    monkeypatch.setattr(ingest_documents, "apply_async", publish)
    submission = client.submit_ingest(_corpus(tmp_path / "docs", 20), batch_docs=4)
    assert submission.documents == 20
    assert events.index("queue 4") < events.index("read doc-19.md")
    assert events.count("queue 4") == 5


def test_a_submission_cut_off_by_the_broker_leaves_a_job_that_adds_up(client, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tasks.ingest import ingest_documents

    calls: list[int] = []

    def publish(args: tuple[str, list[dict[str, Any]]], **options: Any) -> None:
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise ConnectionError("broker unreachable")

    monkeypatch.setattr(ingest_documents, "apply_async", publish)
    with pytest.raises(ConnectionError, match="broker unreachable"):
        client.submit_ingest(_corpus(tmp_path / "docs", 12), batch_docs=4)
    with client.db.connect() as conn:
        job = conn.execute(text("SELECT * FROM jobs ORDER BY created_at DESC LIMIT 1")).mappings().one()
        items = conn.execute(text("SELECT status, error FROM job_items WHERE job_id = :id"),
                             {"id": job["id"]}).mappings().all()
    assert job["documents_total"] == len(items) == 8       # 4 queued, 4 written but not queued; 4 never read
    failed = [i for i in items if i["status"] == "failed"]
    assert len(failed) == 4 and all("not queued: broker unreachable" in i["error"] for i in failed)
    assert job["documents_failed"] == 4 and job["status"] == "running"  # the 4 queued documents still to come


def test_zero_passages_or_questions_per_task_are_refused_not_replaced_by_the_defaults(client) -> None:  # type: ignore[no-untyped-def]
    """`--top-k 0` and `--batch 0` are bad input (exit 2 from the CLI), not a silent fall-back to the defaults; nothing
    is recorded."""
    from sqlalchemy import func, select

    from ragq.core.db import Job
    from ragq.core.errors import BadInput

    with client.db.connect() as conn:
        before = conn.execute(select(func.count()).select_from(Job)).scalar()
    with pytest.raises(BadInput, match="--top-k"):
        client.submit_questions(["what is redis?"], top_k=0)
    with pytest.raises(BadInput, match="--batch"):
        client.submit_questions(["what is redis?"], batch=0)
    with pytest.raises(BadInput, match="--top-k"):
        client.ask("what is redis?", top_k=0)
    with client.db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Job)).scalar() == before
