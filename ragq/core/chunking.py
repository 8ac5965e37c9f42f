"""Chunking with docling-core's HybridChunker and the embedder's own tokenizer; content-addressed chunk ids."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from docling_core.types.doc import DoclingDocument


@dataclass(frozen=True)
class ChunkText:
    id: str
    seq: int
    text: str            # the chunk as it appears in the document
    embed_text: str      # headings + text: what the embedder sees
    headings: list[str]
    tokens: int = 0      # of embed_text, in the embedder's tokenizer


def chunk_id(embed_model: str, document_id: str, seq: int, text: str) -> str:
    """Same model, document, position and text -> same id, so re-ingesting adds nothing."""
    key = "\x1f".join((embed_model, document_id, str(seq), text))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def graph_text(graph: Any) -> str:
    """A key-value or form item's text: one "key: value" line per key (its linked values joined by "; "), then
    the cells no key claims. docling-core's own Markdown serializer writes only a placeholder for these items."""
    cells = {cell.cell_id: cell for cell in graph.cells}
    values: dict[int, list[int]] = {}
    for link in graph.links:
        source, target = cells.get(link.source_cell_id), cells.get(link.target_cell_id)
        if source is None or target is None:
            continue
        label = getattr(link.label, "value", link.label)
        if label == "to_value":
            values.setdefault(source.cell_id, []).append(target.cell_id)
        elif label == "to_key":
            values.setdefault(target.cell_id, []).append(source.cell_id)
    lines, used = [], set()
    for cell in graph.cells:
        if getattr(cell.label, "value", cell.label) == "key":
            found = [cells[v].text.strip() for v in values.get(cell.cell_id, []) if cells[v].text.strip()]
            used.update(values.get(cell.cell_id, []))
            used.add(cell.cell_id)
            lines.append(f"{cell.text.strip()}: {'; '.join(found)}" if found else cell.text.strip())
    lines += [c.text.strip() for c in graph.cells if c.cell_id not in used and c.text.strip()]
    return "\n".join(line for line in lines if line)


def _serializer_provider() -> Any:
    """The chunker's serializer (docling-core's chunking serializer), writing key-value and form items as their
    text instead of a placeholder."""
    from docling_core.transforms.chunker.hierarchical_chunker import ChunkingDocSerializer
    from docling_core.transforms.serializer.base import (
        BaseFormSerializer, BaseKeyValueSerializer, BaseSerializerProvider,
    )
    from docling_core.transforms.serializer.common import create_ser_result

    class GraphItemText(BaseKeyValueSerializer, BaseFormSerializer):
        def serialize(self, *, item: Any, doc_serializer: Any, doc: Any, **kwargs: Any) -> Any:
            if item.self_ref in doc_serializer.get_excluded_refs():
                return create_ser_result()
            return create_ser_result(text=graph_text(item.graph), span_source=item)

    class Serializer(ChunkingDocSerializer):
        key_value_serializer: BaseKeyValueSerializer = GraphItemText()
        form_serializer: BaseFormSerializer = GraphItemText()

    class Provider(BaseSerializerProvider):
        def get_serializer(self, doc: DoclingDocument) -> Any:
            return Serializer(doc=doc)

    return Provider()


def make_chunker(tokenizer: Any, max_tokens: int):  # type: ignore[no-untyped-def]
    from docling_core.transforms.chunker.hybrid_chunker import HybridChunker
    from docling_core.transforms.chunker.tokenizer.huggingface import HuggingFaceTokenizer

    return HybridChunker(tokenizer=HuggingFaceTokenizer(tokenizer=tokenizer, max_tokens=max_tokens), merge_peers=True,
                         serializer_provider=_serializer_provider())


CHARS_PER_TOKEN_BOUND = 8   # real text runs 3-5 characters a token; a chunk past 8 a token is one long "word"


def split_long(text: str, max_chars: int) -> list[str]:
    """`text` in pieces of at most `max_chars` characters, cut at the last whitespace before the limit where there
    is one (a 5 MB line with no spaces is cut every `max_chars`)."""
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind(" ", max_chars // 2, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        pieces.append(text)
    return [p for p in pieces if p]


def chunk_document(doc: DoclingDocument, chunker: Any, embed_model: str, document_id: str) -> list[ChunkText]:
    """The document's chunks, each at most `chunk_tokens` tokens (the chunker) and CHARS_PER_TOKEN_BOUND times as
    many characters (split here: a token limit alone lets one unbroken 5 MB "word" through as a single chunk)."""
    max_chars = CHARS_PER_TOKEN_BOUND * int(chunker.tokenizer.get_max_tokens())
    count = chunker.tokenizer.count_tokens
    chunks: list[ChunkText] = []
    extra = 0   # pieces of over-long chunks so far: the chunks after them move down (unchanged documents keep ids)
    for index, chunk in enumerate(chunker.chunk(dl_doc=doc)):
        text = chunk.text.strip()
        if not text:
            continue
        headings = list(getattr(chunk.meta, "headings", None) or [])
        if len(text) <= max_chars:
            seq = index + extra
            embed_text = chunker.contextualize(chunk=chunk)
            chunks.append(ChunkText(chunk_id(embed_model, document_id, seq, text), seq, text, embed_text, headings,
                                    count(embed_text)))
            continue
        context = "\n".join(headings)
        for n, piece in enumerate(split_long(text, max_chars)):
            seq = index + extra + n
            embed_text = f"{context}\n{piece}" if context else piece
            chunks.append(ChunkText(chunk_id(embed_model, document_id, seq, piece), seq, piece, embed_text, headings,
                                    count(embed_text)))
        extra += n
    return chunks
