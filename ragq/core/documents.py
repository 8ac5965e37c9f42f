"""Inputs to ingestion: DoclingDocument JSON, markdown and plain text, as DoclingDocument objects.

Every problem with an input raises BadInput naming the file and what is wrong with it, so that a batch can report
it and go on with the other files. Markdown is parsed with markdown-it-py into DoclingDocument items (headings,
paragraphs, list items, code), so that chunking sees the same structure it sees in Docling's own output.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docling_core.types.doc import DocItemLabel, DoclingDocument
from docling_core.types.doc.document import DocumentOrigin

from ragq.core.errors import BadInput, Failure

SUPPORTED_SUFFIXES = {".json": "docling", ".md": "markdown", ".markdown": "markdown", ".txt": "text"}
MAX_DOCUMENT_BYTES = 64 * 2**20


@dataclass
class LoadedDocument:
    source: str
    format: str
    document: DoclingDocument
    document_id: str
    text_chars: int = 0

    @property
    def name(self) -> str:
        return self.document.name


_GENERIC_NAMES = frozenset({"", "document", "untitled", "file", "output", "converted"})
_HASH_LIKE = re.compile(r"^[0-9a-f]{16,}$|^[0-9a-f]{8}-[0-9a-f]{4}-", re.IGNORECASE)


def display_name(name: str | None, source: str) -> str:
    """The name a source is shown by: the DoclingDocument's name, unless it tells documents apart poorly (Docling
    names many "Document", or a hash), then the file's name."""
    cleaned = (name or "").strip()
    if cleaned.lower() in _GENERIC_NAMES or _HASH_LIKE.match(cleaned):
        if source.startswith("<"):   # an in-memory document: its label
            return cleaned or source
        return Path(source).name
    return cleaned


def expand_paths(inputs: Iterable[str | Path], skipped: list[Path] | None = None) -> tuple[list[Path], list[Failure]]:
    """Files to ingest (folders searched recursively, in sorted order) and the inputs that cannot be. Files inside
    folders with other extensions are not ingested; `skipped`, if given, collects them (to say so)."""
    files: list[Path] = []
    failures: list[Failure] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            failures.append(Failure(str(raw), "no such file or folder"))
            continue
        if path.is_dir():
            visible = [p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            found = sorted(p for p in visible if p.suffix.lower() in SUPPORTED_SUFFIXES)
            if skipped is not None:
                skipped.extend(sorted(p for p in visible if p.suffix.lower() not in SUPPORTED_SUFFIXES))
            if not found:
                failures.append(Failure(str(raw), "folder has no .json, .md or .txt files"))
            candidates = found
        elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
            failures.append(Failure(str(raw), (
                f"unsupported file type {path.suffix or '(none)'!r}: ragq takes DoclingDocument .json, .md and .txt "
                "(convert PDF and office files with Docling first)"
            )))
            continue
        else:
            candidates = [path]
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                files.append(candidate)
    return files, failures


def _read_text(path: Path, data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise BadInput(str(path), "binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(str(path), f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _origin(path: Path, data: bytes, mimetype: str) -> DocumentOrigin:
    digest = hashlib.sha256(data).digest()
    return DocumentOrigin(mimetype=mimetype, binary_hash=int.from_bytes(digest[:8], "big"), filename=path.name)


def load_document(path: Path) -> LoadedDocument:
    fmt = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BadInput(str(path), f"unsupported file type {path.suffix!r}")
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise BadInput(str(path), f"file is {size / 2**20:.1f} MiB, over the {MAX_DOCUMENT_BYTES // 2**20} MiB limit")
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(str(path), f"cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise BadInput(str(path), "file is empty")
    text = _read_text(path, data)
    if fmt == "docling":
        doc = parse_docling_json(text, str(path))
    elif fmt == "markdown":
        doc = markdown_to_docling(text, path.stem, origin=_origin(path, data, "text/markdown"))
    else:
        doc = text_to_docling(text, path.stem, origin=_origin(path, data, "text/plain"))
    return from_docling(doc, source=str(path.resolve()), fmt=fmt)   # one source however the path was typed


def from_docling(doc: DoclingDocument, *, source: str, fmt: str = "docling") -> LoadedDocument:
    text = doc.export_to_markdown().strip()
    if not text:
        raise BadInput(source, "document contains no text to index")
    problem = _unstorable(doc.export_to_dict())
    if problem:
        raise BadInput(source, problem)
    return LoadedDocument(source=source, format=fmt, document=doc, document_id=document_id(doc), text_chars=len(text))


def parse_docling_json(text: str, source: str) -> DoclingDocument:
    from pydantic import ValidationError

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(source, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise BadInput(source, f"not a DoclingDocument: the JSON top level is a {type(obj).__name__}, not an object")
    try:
        return DoclingDocument.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[:3]
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in first)
        more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise BadInput(source, f"not a DoclingDocument: {details}{more}") from None
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        raise BadInput(source, f"not a DoclingDocument: {type(exc).__name__}: {exc}") from None


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _unstorable(value: Any, where: str = "") -> str | None:
    """The first string in `value` that Postgres cannot store or UTF-8 cannot encode (a NUL, or an unpaired
    surrogate, which a JSON escape can produce), named by its place in the document."""
    if isinstance(value, str):
        found = _UNSTORABLE.search(value)
        if found is None:
            return None
        char = found.group()
        what = "a NUL character (U+0000), which Postgres cannot store" if char == "\x00" else \
            f"an unpaired surrogate (U+{ord(char):04X}), which is not valid Unicode"
        return f"{where or 'text'} contains {what}, at character {found.start()}"
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        problem = _unstorable(item, f"{where}.{key}" if where else str(key))
        if problem:
            return problem
    return None


def document_id(doc: DoclingDocument) -> str:
    canonical = json.dumps(doc.export_to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def text_to_docling(text: str, name: str, origin: DocumentOrigin | None = None) -> DoclingDocument:
    doc = DoclingDocument(name=name, origin=origin)
    for block in text.replace("\r\n", "\n").split("\n\n"):
        paragraph = " ".join(line.strip() for line in block.splitlines() if line.strip())
        if paragraph:
            doc.add_text(label=DocItemLabel.PARAGRAPH, text=paragraph)
    return doc


def _inline_text(token: Any) -> str:
    parts: list[str] = []
    for child in token.children or []:
        if child.type in ("text", "code_inline", "html_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.type == "image":
            parts.append(child.content)
    return "".join(parts).strip()


def markdown_to_docling(text: str, name: str, origin: DocumentOrigin | None = None) -> DoclingDocument:
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    doc = DoclingDocument(name=name, origin=origin)
    lists: list[Any] = []
    in_item = 0
    heading_level = 0
    row: list[str] = []
    for i, token in enumerate(tokens):
        kind = token.type
        if kind == "heading_open":
            heading_level = int(token.tag[1:])
        elif kind == "inline":
            content = _inline_text(token)
            if not content:
                continue
            if heading_level:
                if heading_level == 1 and not any(True for _ in doc.iterate_items()):
                    doc.add_title(text=content)
                else:
                    doc.add_heading(text=content, level=max(1, heading_level - 1))
            elif tokens[i - 1].type in ("th_open", "td_open"):
                row.append(content)
            elif in_item and lists:
                doc.add_list_item(text=content, enumerated=lists[-1][1], parent=lists[-1][0])
            else:
                doc.add_text(label=DocItemLabel.PARAGRAPH, text=content)
        elif kind == "heading_close":
            heading_level = 0
        elif kind in ("bullet_list_open", "ordered_list_open"):
            group = doc.add_list_group(parent=lists[-1][0] if lists else None)
            lists.append((group, kind == "ordered_list_open"))
        elif kind in ("bullet_list_close", "ordered_list_close"):
            lists.pop()
        elif kind == "list_item_open":
            in_item += 1
        elif kind == "list_item_close":
            in_item -= 1
        elif kind in ("fence", "code_block") and token.content.strip():
            doc.add_code(text=token.content.rstrip("\n"))
        elif kind == "tr_close" and row:
            doc.add_text(label=DocItemLabel.TEXT, text=" | ".join(row))
            row = []
    return doc
