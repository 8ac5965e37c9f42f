"""Token counts for batch forming, from each model's own tokenizer (loaded once, without the weights)."""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from workers.models import ModelSpec

_lock = threading.Lock()
_RERANK_TEMPLATE_TOKENS = 48  # the Qwen3-Reranker prefix and suffix


@lru_cache(maxsize=16)
def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


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
