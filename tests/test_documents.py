"""Loading inputs: every bad input gets a clear error naming it; good ones become DoclingDocuments and chunks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragq.core.chunking import chunk_document, make_chunker
from ragq.core.documents import expand_paths, load_document, markdown_to_docling
from ragq.core.errors import BadInput

SAMPLES = Path(__file__).resolve().parent.parent / "ragq" / "samples"


@pytest.fixture(scope="module")
def chunker():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from workers.models import default_embed_spec

    return make_chunker(AutoTokenizer.from_pretrained(default_embed_spec().path), 200)


def test_sample_docling_json_loads() -> None:
    doc = load_document(SAMPLES / "celery-queues.json")
    assert doc.format == "docling" and doc.name == "celery-queues"
    assert "prefetch multiplier of 1" in doc.document.export_to_markdown()


def test_markdown_structure_becomes_docling_items() -> None:
    doc = markdown_to_docling("# T\n\nIntro **bold**.\n\n## S\n\n- one\n- two\n\n```\ncode()\n```\n", "x")
    md = doc.export_to_markdown()
    assert "# T" in md and "## S" in md and "- one" in md and "code()" in md and "**" not in md.split("\n")[2]


def test_document_ids_are_content_addressed(tmp_path: Path) -> None:
    a = tmp_path / "a.md"
    a.write_text("# Same\n\ntext\n")
    first, second = load_document(a), load_document(a)
    assert first.document_id == second.document_id
    a.write_text("# Same\n\nother text\n")
    assert load_document(a).document_id != first.document_id


def test_chunks_carry_headings_and_stable_ids(chunker) -> None:  # type: ignore[no-untyped-def]
    doc = load_document(SAMPLES / "gpu-memory.md")
    chunks = chunk_document(doc.document, chunker, "m", doc.document_id)
    again = chunk_document(doc.document, chunker, "m", doc.document_id)
    assert len(chunks) >= 3
    assert [c.id for c in chunks] == [c.id for c in again]
    assert len({c.id for c in chunks}) == len(chunks)
    assert any("Model sizes" in c.headings for c in chunks)
    assert all(c.embed_text.endswith(c.text) or c.text in c.embed_text for c in chunks)
    other_model = chunk_document(doc.document, chunker, "other", doc.document_id)
    assert not {c.id for c in chunks} & {c.id for c in other_model}


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("broken.json", b'{"schema_name": "DoclingDocument", "name": ', "not valid JSON: Expecting value at line 1"),
    ("list.json", b"[1, 2]", "not a DoclingDocument: the JSON top level is a list"),
    ("other.json", b'{"name": 5, "texts": "no"}', "not a DoclingDocument"),
    ("empty.md", b"   \n\n", "file is empty"),
    ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary file"),
    ("latin1.md", "caf\xe9 cr\xe8me".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 3)"),
    ("headings.md", b"```\n\n```\n", "no text to index"),
    ("late-nul.txt", b"Notes\n\n" + b"x" * 9000 + b" \x00 end\n", "a NUL character (U+0000), which Postgres cannot"),
])
def test_bad_inputs_name_the_file_and_the_problem(tmp_path: Path, name: str, content: bytes, problem: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInput) as info:
        load_document(path)
    assert info.value.source == str(path)
    assert problem in info.value.problem
    assert str(path) in str(info.value)


def test_expand_paths_reports_what_it_cannot_take(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# a")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / "skip.pdf").write_bytes(b"%PDF")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "c.md").write_text("c")
    empty = tmp_path / "empty"
    empty.mkdir()
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF")
    files, failures = expand_paths([folder, folder / "a.md", tmp_path / "missing.md", pdf, empty])
    assert [f.name for f in files] == ["a.md", "b.txt"]
    problems = {Path(f.path).name: f.error for f in failures}
    assert problems["missing.md"] == "no such file or folder"
    assert "unsupported file type '.pdf'" in problems["report.pdf"]
    assert "no .json, .md or .txt" in problems["empty"]


def test_docling_json_round_trip(tmp_path: Path) -> None:
    original = load_document(SAMPLES / "celery-queues.json")
    path = tmp_path / "copy.json"
    path.write_text(json.dumps(original.document.export_to_dict()))
    assert load_document(path).document_id == original.document_id


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    base=st.sampled_from(["sample", "empty"]),
    mutations=st.lists(st.tuples(st.sampled_from(
        ["name", "texts", "body", "groups", "origin", "schema_name", "version", "furniture", "pages", "tables",
         "pictures", "key_value_items", "texts.0", "texts.0.text", "texts.0.label", "body.children"]), _json_values),
        min_size=1, max_size=4),
)
def test_fuzzed_docling_json_is_loaded_or_refused_clearly(tmp_path_factory, base, mutations) -> None:  # type: ignore[no-untyped-def]
    """Any DoclingDocument JSON, however mangled, either loads or raises BadInput naming the file: never another
    exception (which would kill a whole ingestion batch instead of failing one document)."""
    sample = json.loads((SAMPLES / "celery-queues.json").read_text()) if base == "sample" else {
        "schema_name": "DoclingDocument", "name": "x"}
    for dotted, value in mutations:
        target, *path = dotted.split(".")
        node = sample
        for part in [target, *path][:-1]:
            node = node.get(part) if isinstance(node, dict) else (
                node[int(part)] if isinstance(node, list) and part.isdigit() and int(part) < len(node) else None)
            if node is None:
                break
        leaf = [target, *path][-1]
        if isinstance(node, dict):
            node[leaf] = value
        elif isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
            node[int(leaf)] = value
    path = tmp_path_factory.mktemp("fuzz") / "doc.json"
    path.write_text(json.dumps(sample))
    try:
        loaded = load_document(path)
    except BadInput as exc:
        assert exc.source == str(path) and exc.problem
    else:
        assert loaded.document_id and loaded.text_chars > 0


@pytest.mark.parametrize("suffix", [".md", ".txt", ".json"])
def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path, suffix: str) -> None:
    from ragq.core.documents import MAX_DOCUMENT_BYTES

    path = tmp_path / f"huge{suffix}"
    with open(path, "wb") as f:   # sparse: the size is there, the bytes are not (reading it would take a while)
        f.truncate(MAX_DOCUMENT_BYTES + 1)
    with pytest.raises(BadInput) as info:
        load_document(path)
    assert info.value.source == str(path)
    assert "over the 64 MiB limit" in info.value.problem


@pytest.mark.parametrize(("char", "problem"), [
    ("\ud800", "texts.1.text contains an unpaired surrogate (U+D800), which is not valid Unicode"),
    ("\x00", "texts.1.text contains a NUL character (U+0000), which Postgres cannot store"),
])
def test_a_docling_json_escape_postgres_cannot_store_is_refused_by_place(tmp_path: Path, char: str,
                                                                          problem: str) -> None:
    """JSON escapes can make a NUL or a lone surrogate, which Postgres (and UTF-8, and the tokenizers) cannot take."""
    doc = json.loads((SAMPLES / "celery-queues.json").read_text())
    doc["texts"][1]["text"] += f" {char}"
    path = tmp_path / "escaped.json"
    path.write_text(json.dumps(doc))   # ASCII, with the escape
    with pytest.raises(BadInput) as info:
        load_document(path)
    assert info.value.source == str(path)
    assert problem in info.value.problem
