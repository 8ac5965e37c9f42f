"""Random-weight models of the real architectures, built from their configs and saved to local disk, so that
benchmarks time real loads and real compute (the outputs mean nothing). Sizes follow the published configs of
Qwen3-Embedding-4B, Qwen3-Reranker-0.6B and Qwen3-4B; `tiny` builds the same shapes scaled down for a CPU dry run."""

from __future__ import annotations

import time
from pathlib import Path

QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151669, tie_word_embeddings=True,
                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=2048)

ROLES = {
    # role: (directory name, config, causal LM head)
    "embed": ("Qwen3-Embedding-4B-random", QWEN3_4B, False),
    "rerank": ("Qwen3-Reranker-0.6B-random", QWEN3_06B, True),
    "generate": ("Qwen3-4B-random", QWEN3_4B, True),
}


def build_all(root: Path, device: str = "cuda", tiny: bool = False,
              roles: tuple[str, ...] = tuple(ROLES)) -> dict[str, Path]:
    """Build (once) and save the models of `roles` (default all three); returns role -> directory."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, Qwen3Config

    from tests.tinymodels import build_tokenizer

    paths = {}
    for role, (name, shape, causal) in ROLES.items():
        if role not in roles:
            continue
        out = root / (name + ("-tiny" if tiny else ""))
        paths[role] = out
        if (out / "config.json").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(out)
        if role == "generate" and not tiny:
            # every id the random generator can emit decodes to text, so answers stream as real ones do
            tokenizer.add_tokens([f" w{i}" for i in range(shape["vocab_size"] - len(tokenizer))])
            tokenizer.save_pretrained(out)
        config = Qwen3Config(**(TINY if tiny else shape), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(device):
            cls = AutoModelForCausalLM if causal else AutoModel
            model = cls.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(f"built {role} {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    return paths
