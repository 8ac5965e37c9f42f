"""Ingest and ask end to end, through the CLI and the Python API, on real Redis, Postgres and a worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.conftest import ragq_env, run_ragq

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parent.parent / "ragq" / "samples"

FALCON = """# The Atlas falcon

The Atlas falcon nests on limestone cliffs above the Draa valley and hunts swifts at dawn.

## Diet

Its diet is almost entirely swifts and bee-eaters, caught in a stoop at over 200 km/h.
"""


def _rows(client, sql: str, **params):  # type: ignore[no-untyped-def]
    with client.db.connect() as conn:
        return conn.execute(text(sql), params).mappings().all()


def _wait_rows(client, sql: str, want, timeout_s: float = 15.0, **params):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    rows = _rows(client, sql, **params)
    while not want(rows) and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = _rows(client, sql, **params)
    return rows


def test_cli_ingest_bad_file_among_good_ones(worker, client, ragq_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good_md = tmp_path / "falcon.md"
    good_md.write_text(FALCON)
    good_txt = tmp_path / "notes.txt"
    good_txt.write_text("The blue lantern festival of Tarsk is held on the first frost.\n\nLanterns are paper.")
    bad = tmp_path / "broken.json"
    bad.write_text('{"schema_name": "DoclingDocument", ')
    env = ragq_env(ragq_home)

    result = run_ragq(env, "ingest", str(good_md), str(bad), str(good_txt), "--wait", "--json")
    assert result.returncode == 1, result.stderr
    assert f"{bad}: not valid JSON" in result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) >= {"job_id", "documents", "chunks", "failed"}
    assert summary["documents"] == 2 and summary["status"] == "completed_with_errors"
    assert summary["failed"] == [{"path": str(bad), "error": summary["failed"][0]["error"]}]
    assert "not valid JSON" in summary["failed"][0]["error"]
    assert summary["chunks"] >= 2 and summary["chunks_added"] == summary["chunks"]

    stored = _rows(client, "select count(*) as n from chunks c join documents d on d.id = c.document_id "
                           "where d.source in (:a, :b)", a=str(good_md), b=str(good_txt))
    assert stored[0]["n"] == summary["chunks"]

    again = run_ragq(env, "ingest", str(good_md), str(good_txt), "--wait", "--json")
    assert again.returncode == 0, again.stderr
    repeat = json.loads(again.stdout)
    assert repeat["chunks"] == summary["chunks"] and repeat["chunks_added"] == 0 and repeat["failed"] == []

    job_rows = _wait_rows(client, "select stage, model, items, outcome, priority from stage_timings where job_id = :j",
                          lambda rows: {"chunk", "embed", "store"} <= {r["stage"] for r in rows}, j=summary["job_id"])
    stages = {r["stage"]: r for r in job_rows}
    assert stages["embed"]["model"] == "all-MiniLM-L6-v2" and stages["embed"]["items"] == summary["chunks"]
    assert all(r["priority"] == "background" and r["outcome"] == "ok" for r in job_rows)


def test_ask_json_returns_sources_and_timings(worker, client, ragq_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    doc = tmp_path / "falcon.md"
    doc.write_text(FALCON)
    assert client.wait_for_job(client.submit_ingest([doc]).job_id, timeout_s=120)["status"] == "completed"

    result = run_ragq(ragq_env(ragq_home), "ask", "What does the Atlas falcon eat?", "--json", "--top-k", "2",
                      "--timeout", "60")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert set(reply) >= {"answer", "sources", "timings"}
    assert len(reply["sources"]) == 2
    top = reply["sources"][0]
    assert set(top) >= {"document", "chunk_id", "score", "text"}
    assert top["document"] == "falcon" and "swifts" in top["text"]
    assert "swifts" in reply["answer"] and reply["mode"] == "extractive"
    assert set(reply["timings"]) == {"embed", "search", "rerank", "generate"}
    for timing in reply["timings"].values():
        assert {"queue_ms", "load_ms", "compute_ms"} <= set(timing) and timing["queue_ms"] >= 0

    rows = _wait_rows(
        client, "select stage, model, priority, outcome from stage_timings where priority = 'urgent' "
                "and finished_at > now() - interval '5 minutes'",
        lambda rows: {"embed", "search", "rerank", "generate"} <= {r["stage"] for r in rows},
    )
    assert {"embed", "search", "rerank", "generate"} <= {r["stage"] for r in rows}


def test_python_api_takes_docling_documents(worker, client) -> None:  # type: ignore[no-untyped-def]
    from docling_core.types.doc import DocItemLabel, DoclingDocument

    doc = DoclingDocument(name="pipeline-output")
    doc.add_heading(text="Quarterly kelp harvest")
    doc.add_text(label=DocItemLabel.PARAGRAPH, text="The kelp harvest at Orkney Bay reached 41 tonnes in spring.")
    empty = DoclingDocument(name="empty")
    submission = client.submit_ingest([doc, empty])
    assert submission.documents == 1
    assert [f.path for f in submission.failed] == ["<document 1: empty>"]
    status = client.wait_for_job(submission.job_id, timeout_s=120)
    assert status["status"] == "completed_with_errors" and status["documents_done"] == 1
    reply = client.ask("How much kelp was harvested at Orkney Bay?", timeout_s=60, top_k=1)
    assert reply["sources"][0]["document"] == "pipeline-output"


def test_bad_questions_are_refused_clearly(client, ragq_home: Path) -> None:  # type: ignore[no-untyped-def]
    from ragq.core.errors import BadInput

    with pytest.raises(BadInput, match="question: is empty"):
        client.ask("   ")
    result = run_ragq(ragq_env(ragq_home), "ask", "x" * 9000)
    assert result.returncode == 2 and "over the 8000 limit" in result.stderr


def test_only_bad_inputs_exit_non_zero_and_queue_nothing(client, ragq_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_ragq(ragq_env(ragq_home), "ingest", str(tmp_path / "missing.md"), "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["documents"] == 0 and summary["status"] == "failed"
    assert summary["failed"][0]["error"] == "no such file or folder"
