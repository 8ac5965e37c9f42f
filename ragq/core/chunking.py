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


def chunk_id(embed_model: str, document_id: str, seq: int, text: str) -> str:
    """Same model, document, position and text -> same id, so re-ingesting adds nothing."""
    key = "\x1f".join((embed_model, document_id, str(seq), text))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def make_chunker(tokenizer: Any, max_tokens: int):  # type: ignore[no-untyped-def]
    from docling_core.transforms.chunker.hybrid_chunker import HybridChunker
    from docling_core.transforms.chunker.tokenizer.huggingface import HuggingFaceTokenizer

    return HybridChunker(tokenizer=HuggingFaceTokenizer(tokenizer=tokenizer, max_tokens=max_tokens), merge_peers=True)


def chunk_document(doc: DoclingDocument, chunker: Any, embed_model: str, document_id: str) -> list[ChunkText]:
    chunks: list[ChunkText] = []
    for seq, chunk in enumerate(chunker.chunk(dl_doc=doc)):
        text = chunk.text.strip()
        if not text:
            continue
        headings = list(getattr(chunk.meta, "headings", None) or [])
        embed_text = chunker.contextualize(chunk=chunk)
        chunks.append(ChunkText(chunk_id(embed_model, document_id, seq, text), seq, text, embed_text, headings))
    return chunks
