"""Token counts for batch forming, from each model's own tokenizer (loaded once, without the weights)."""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from workers.models import ModelSpec

log = logging.getLogger(__name__)
_lock = threading.Lock()
_RERANK_TEMPLATE_TOKENS = 48  # the Qwen3-Reranker prefix and suffix


@lru_cache(maxsize=16)
def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def preload(specs: dict[str, ModelSpec]) -> threading.Thread:
    """Load the models' tokenizers in a background thread (transformers' import alone takes seconds, torch with it),
    so a worker's start-up goes on meanwhile; a task that needs one first waits for it (the lock)."""
    def load() -> None:
        with _lock:
            for spec in specs.values():
                try:
                    _tokenizer(spec.path)
                except Exception as exc:  # noqa: BLE001 - the task that needs it raises the error itself
                    log.warning("tokenizer of %s did not load: %s", spec.name, exc)

    thread = threading.Thread(target=load, name="ragq-tokenizers", daemon=True)
    thread.start()
    return thread


def count_tokens(spec: ModelSpec, items: list[Any]) -> list[int]:
    """Tokens per item, capped at the model's max_length: texts for embed and generate, (query, document) pairs
    for rerank."""
    with _lock:  # the first call loads the tokenizer once
        tokenizer = _tokenizer(spec.path)
    if spec.role == "rerank":
        texts = [f"{item[0]}\n{item[1]}" for item in items]
        extra = _RERANK_TEMPLATE_TOKENS
    else:
        texts = [str(item) for item in items]
        extra = 0
    encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    return [min(spec.max_length, len(ids) + extra) for ids in encoded]


class Encoded(NamedTuple):
    """An embed input tokenised by the submitting consumer (its own process, its own CPU): the engine's device
    thread then only pads, instead of tokenising while the device waits."""

    text: str
    ids: list[int]


def prepare_items(spec: ModelSpec, items: list[Any], params: dict[str, Any]) -> tuple[list[Any], list[int]]:
    """(items to submit, tokens per item). A torch embedder's texts go as `Encoded` (the prefix its kind takes,
    truncated to max_length, exactly as the backend would tokenise them); other roles and backends go as they are,
    with their token counts."""
    if spec.role != "embed" or spec.backend != "torch":
        return items, count_tokens(spec, items)
    with _lock:
        tokenizer = _tokenizer(spec.path)
    prefix = spec.query_prefix if params.get("kind") == "query" else spec.document_prefix
    texts = [str(item) for item in items]
    encoded = tokenizer([prefix + text for text in texts], truncation=True, max_length=spec.max_length)["input_ids"]
    return [Encoded(text, list(ids)) for text, ids in zip(texts, encoded)], [len(ids) for ids in encoded]
