"""Chunking off the GIL: on a GPU worker the CPU-side chunking of incoming documents (docling-core's HybridChunker,
pure Python) would otherwise cap ingestion below what the card embeds, so it runs in a pool of spawned processes,
each holding its own tokenizer and chunker. With no processes configured (the CPU device), it runs inline."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ragq.core.chunking import ChunkText, chunk_document, make_chunker

log = logging.getLogger(__name__)

_chunker: Any = None  # one per pool process
CHUNK_NICENESS = 10


def _init(tokenizer_path: str, max_tokens: int, parent_pid: int | None = None) -> None:
    global _chunker

    # chunking is throughput work: the engine process (launching kernels, bound by one core when decoding) and the
    # urgent consumer get the CPU first when the cores are busy
    os.nice(CHUNK_NICENESS)
    try:   # it dies with its worker, however the worker ends (a killed worker's replacement waits for its children)
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent_pid is not None:   # it may have died before the signal was asked for; and the signal is sent when
        from workers.parent import watch_parent            # the thread that started this process ends, not the

        watch_parent(parent_pid)                           # process: the parent's pid is what to watch
    from transformers import AutoTokenizer

    _chunker = make_chunker(AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True), max_tokens)


def _chunk(document: dict[str, Any], embed_model: str, document_id: str) -> list[ChunkText]:
    from docling_core.types.doc import DoclingDocument

    return chunk_document(DoclingDocument.model_validate(document), _chunker, embed_model, document_id)


class ChunkPool:
    def __init__(self, tokenizer_path: Path, max_tokens: int, embed_model: str, processes: int) -> None:
        self.embed_model = embed_model
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._inline: Any = None
        self._tokenizer_path = tokenizer_path
        self._max_tokens = max_tokens
        self._inline_lock = threading.Lock()
        if processes > 0:
            self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init, initargs=(str(tokenizer_path), max_tokens, os.getpid()))
            for _ in range(processes):   # start them now, not mid-job (a first job's chunks wait for them)
                self._pool.submit(_noop)
            log.info("chunking in %d processes", processes)

    def chunk_many(self, items: list[dict[str, Any]]) -> list[list[ChunkText] | BaseException]:
        """Chunks of each item's DoclingDocument, or the exception that item raised; order kept."""
        if self._pool is not None:
            futures = [self._pool.submit(_chunk, item["document"], self.embed_model, item["document_id"])
                       for item in items]
            results: list[list[ChunkText] | BaseException] = []
            for future in futures:
                try:
                    results.append(future.result())
                except Exception as exc:
                    results.append(exc)
            return results
        with self._inline_lock:  # task threads arrive together; transformers' lazy imports are not thread-safe
            if self._inline is None:
                from transformers import AutoTokenizer

                self._inline = make_chunker(
                    AutoTokenizer.from_pretrained(self._tokenizer_path, local_files_only=True), self._max_tokens)
        from docling_core.types.doc import DoclingDocument

        out: list[list[ChunkText] | BaseException] = []
        for item in items:
            try:
                doc = DoclingDocument.model_validate(item["document"])
                out.append(chunk_document(doc, self._inline, self.embed_model, item["document_id"]))
            except Exception as exc:
                out.append(exc)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _noop() -> None:
    return None
