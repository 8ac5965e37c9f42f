"""Faster paths the decode loop swaps into a transformers model: attention for one query token per row that reads
the KV cache as stored (no repeat of the key/value heads), and RMSNorm through torch's fused kernel. Both keep the
model's numbers (tests/test_decode.py compares the loop with transformers' own generate)."""

from __future__ import annotations

from typing import Any

import torch

ATTENTION = "ragq_decode"
_registered = False


def decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA where a decode step (one query token per row) attends on the key/value heads directly: the query heads
    sharing a key/value head become that head's query positions, so the cache is read as stored, where
    transformers' SDPA path with a mask repeats every key and value `groups` times first (a copy of the whole
    attended cache per layer per step, measured at ~45 % of a 16-row step on an H200). Anything else goes to
    transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and query.shape[2] == 1 and (attention_mask is None or attention_mask.shape[1] == 1):
        batch, heads, _, dim = query.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=attention_mask,
            dropout_p=dropout, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def use_decode_attention(model: Any) -> bool:
    """Switch `model` from transformers' SDPA to `decode_attention` (its masks stay SDPA's); False where the model
    runs another attention implementation, which is left as it is."""
    global _registered
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return False
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION, decode_attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        _registered = True
    model.set_attn_implementation(ATTENTION)
    return True


def fuse_norms(model: Any, on: bool = True) -> int:
    """Run the model's RMSNorm modules (transformers' `*RMSNorm`: weight and `variance_epsilon`) through torch's
    fused `rms_norm` (one kernel, computed in float32 as transformers does, rounded to the input's dtype before
    the weight is applied, as transformers does) instead of seven small kernels each; `on=False` puts transformers'
    own forward back. Returns how many modules were switched."""
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
            continue
        if not on:
            module.__dict__.pop("forward", None)
            count += 1
            continue
        shape = (module.weight.shape[-1],)

        def forward(hidden: torch.Tensor, _m: Any = module, _shape: tuple[int, ...] = shape) -> torch.Tensor:
            return _m.weight * torch.nn.functional.rms_norm(hidden, _shape, eps=_m.variance_epsilon)

        module.forward = forward
        count += 1
    return count
