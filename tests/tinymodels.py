"""Tiny models of the real architectures, built locally: a BPE tokenizer trained with `tokenizers` and random-weight
Qwen3 / BERT models saved with save_pretrained, so tests load them through the same from_pretrained(local_dir) path
as production models."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "yes no yes no maybe",
    "The GPU worker loads the embedder, then the reranker, then the generator.",
    "Celery routes urgent questions ahead of background ingestion.",
    "Postgres stores chunks and vectors with pgvector and an HNSW index.",
    "Redis is the broker; the result backend answers the synchronous call.",
    "Documents from Docling pipelines are chunked, embedded and stored.",
    "Question: what keeps urgent work fast? Answer: priority queues and small batches.",
] * 20

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's chat template, cut to what ragq uses: messages, the generation prompt, and thinking off as an empty
# think block (Qwen3 answers at once when it sees one)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def build_tokenizer(out_dir: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_qwen3(out_dir: Path, *, causal: bool = True, seed: int = 0) -> Path:
    """A 2-layer Qwen3 (hidden 64) with a locally trained tokenizer; weights scaled up so logits separate well."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, Qwen3Config

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        initializer_range=0.2, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config) if causal else AutoModel.from_config(config)
    model.save_pretrained(out_dir)
    return out_dir
