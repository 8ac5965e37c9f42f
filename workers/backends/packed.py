"""Padding-free ("packed") forward passes for decoder models, as text-embeddings-inference runs its embedders.

A micro-batch's rows are concatenated into one sequence of their real tokens; position ids restart at 0 for each
row, and attention stays inside each row, given by the cumulative row lengths (`cu_seq_lens`). No token is padding
and a batch of mixed lengths is one forward pass, so neither the padding of mixed lengths nor the fixed cost of
extra length-sorted passes is paid.

The attention runs through transformers' AttentionInterface under the name "ragq_packed": transformers hands the
forward's keyword arguments (`cu_seq_lens_q`, `max_length_q`, ...) down to every attention layer, and an
attention-mask mapping of None skips building a mask. On CUDA the attention is torch's variable-length flash
attention (`torch.nn.attention.varlen`, torch >= 2.10); elsewhere each row runs through
scaled_dot_product_attention in turn (exact; for tests and CPUs, where packing is off unless asked for).

`enable_packing` switches a loaded model over only after a probe: a few rows through the padded path and the packed
path must agree, else the model stays padded (a warning says why).
"""

from __future__ import annotations

import inspect
import itertools
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NAME = "ragq_packed"
# decoder architectures whose transformers implementation takes a prepared mask mapping and passes the forward's
# keyword arguments to the attention function; others stay padded
ARCHITECTURES = {"qwen3", "qwen2", "llama", "mistral"}
_NO_MASK = {"full_attention": None, "sliding_attention": None}
_PROBE = ([11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [22, 23, 24], [25, 26, 27, 28, 29, 30])

_registered = False


def _find_varlen() -> tuple[Any, set[str]] | None:
    """torch's varlen_attn and the names of its parameters (they changed between torch releases), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


_VARLEN = _find_varlen()


def varlen_available(device: torch.device | str) -> bool:
    return _VARLEN is not None and torch.device(device).type == "cuda"


def _attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                   scale: float | None, causal: bool) -> torch.Tensor:
    assert _VARLEN is not None
    varlen_attn, params = _VARLEN
    kwargs: dict[str, Any] = {}
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-6:
            raise RuntimeError("this torch's varlen_attn has no scale argument; the model needs a custom scale")
    if q.shape[1] != k.shape[1]:    # grouped-query attention
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if causal:
        if "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            kwargs["window_size"] = (-1, 0)
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None,
                 causal: bool) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        rows = [t[start:end].transpose(0, 1) for t in (q, k, v)]   # (heads, length, dim)
        out[start:end] = F.scaled_dot_product_attention(
            *rows, is_causal=causal, scale=scale, enable_gqa=True).transpose(0, 1)
    return out


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
                     ) -> tuple[torch.Tensor, None]:
    """Attention over one packed sequence: query/key/value (1, heads, tokens, dim) -> (1, tokens, heads, dim)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise RuntimeError("ragq_packed attention runs only packed forwards (one sequence, with cu_seq_lens_q)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))   # (tokens, heads, dim)
    causal = bool(getattr(module, "is_causal", True))
    if q.is_cuda and _VARLEN is not None:
        out = _attend_varlen(q, k, v, cu, int(kwargs["max_length_q"]), scaling, causal)
    else:
        out = _attend_rows(q, k, v, cu, scaling, causal)
    return out.unsqueeze(0), None


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, packed_attention)
        _registered = True


class Packed:
    """One packed batch, built on the host: ids and positions (1, tokens), cumulative lengths, each row's last
    token's index."""

    def __init__(self, rows: list[list[int]]) -> None:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        if len(rows) == 0 or lengths.min() < 1:
            raise ValueError("a packed batch needs at least one row, each of at least one token")
        total = int(lengths.sum())
        self.lengths = lengths
        self.longest = int(lengths.max())
        self.tokens = total
        self.input_ids = torch.from_numpy(
            np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)).unsqueeze(0)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        self.position_ids = torch.from_numpy(np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)).unsqueeze(0)
        self.cu = torch.from_numpy(np.concatenate([[0], ends]).astype(np.int32))
        self.last = torch.from_numpy(ends - 1)

    def forward_kwargs(self, device: torch.device) -> dict[str, Any]:
        cu = self.cu.to(device, non_blocking=True)
        return {
            "input_ids": self.input_ids.to(device, non_blocking=True),
            "position_ids": self.position_ids.to(device, non_blocking=True),
            "attention_mask": dict(_NO_MASK),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": self.longest, "max_length_k": self.longest,
        }


def packing_unsupported(model: torch.nn.Module) -> str | None:
    """Why `model` cannot run packed, or None."""
    config = model.config
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        return f"architecture {getattr(config, 'model_type', '?')!r} is not one of {sorted(ARCHITECTURES)}"
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "it has sliding-window layers"
    return None


def enable_packing(model: torch.nn.Module, hidden: Any, *, tolerance: float) -> str | None:
    """Switch `model` to packed attention if the probe rows agree with the padded path; returns why not, or None.
    `hidden(model, kwargs)` runs the model and returns the hidden states of the last layer."""
    reason = packing_unsupported(model)
    if reason is not None:
        return reason
    register()
    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    try:
        with torch.inference_mode():
            expected = [hidden(model, {"input_ids": torch.tensor([row], device=device)})[0, -1].float()
                        for row in _PROBE]
            model.set_attn_implementation(NAME)
            packed = Packed(list(_PROBE))
            got = hidden(model, packed.forward_kwargs(device))[0, packed.last.to(device)].float()
    except Exception as exc:  # noqa: BLE001 - any failure of the probe keeps the padded path
        model.set_attn_implementation(previous)
        return f"the packed probe failed: {type(exc).__name__}: {exc}"
    worst = min(float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(expected, got))
    if worst < 1.0 - tolerance:
        model.set_attn_implementation(previous)
        return f"packed and padded outputs differ (cosine {worst:.5f})"
    return None


__all__ = ["NAME", "Packed", "enable_packing", "packed_attention", "packing_unsupported", "register",
           "varlen_available"]
