"""The decode loop's own forward pass for Llama-shaped decoders (Qwen3, Qwen2, Llama), from the transformers
model's weights: what vLLM and TGI do with their model files, kept small.

Against running transformers' modules it saves, per layer and step:
- two matrix multiplies: the query, key and value projections run as one product with their weights side by side
  in memory, and the gate and up projections as one (`pack_projections` lays the weights out so; a fused weight
  is a view, never a copy, so the model's bytes do not grow, and sleep, wake and the fixed-address range move it
  as before). Bigger products read the weights faster at one or a few rows, where a step is bound by that read;
- most small kernels: on a CUDA card a decode step's elementwise parts (residual add and RMSNorm, the heads' norms
  and RoPE, SiLU times up) run through `torch.compile` (one fused kernel each, compiled at load for one row and for
  any other count, `compile` in the models file; ~670 kernels a step for Qwen3-4B against ~1,390). Prefill runs
  them eager (torch's fused `rms_norm`): its passes are bound by the matrix multiplies.

Decode attention runs split along the keys where Triton can run it (workers/backends/split_attention.py: every SM
reads its share of a row's cache, the new key and value stored by the same launch), else torch's SDPA on the
key/value heads (workers/backends/fastpaths.py). Two batched products and a softmax, compiled, and FlexAttention
were both measured slower than SDPA on an H200 (6.18 and 5.93 ms a step for one sequence against 5.04 and 5.12;
BENCHMARKS.md).

Numbers are the model's: on the CPU in float32 the loop's tokens equal transformers' greedy `generate`
(tests/test_decode.py); the bf16 arithmetic of the compiled pieces rounds once where eager rounds per operation.
Weights that are not plain tensors (8-bit ones) and weights not side by side (after an ordinary wake) run the
projections one by one through their modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

FAMILIES = ("qwen3", "qwen2", "llama")


def supported(model: Any) -> str | None:
    """None where the decoder can run `model`, else why not."""
    config = model.config
    if getattr(config, "model_type", None) not in FAMILIES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {', '.join(FAMILIES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the decoder runs SiLU)"
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(base, n) for n in needed):
        return "its decoder is not shaped embed_tokens / layers / norm / rotary_emb"
    layer = base.layers[0]
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        try:
            layer.get_submodule(path)
        except AttributeError:
            return f"its layers have no {path}"
    rope = getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        return f"RoPE type {rope.get('rope_type', rope.get('type'))!r} (the decoder runs the default)"
    return None


def _plain(t: torch.Tensor | None) -> bool:
    """A tensor of its own (not None, not a quantized wrapper)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def pack_projections(model: Any) -> int:
    """Lay each layer's q/k/v weights (and biases) and gate/up weights out side by side in one allocation, each
    module's parameter becoming a view of it; returns how many groups were packed. Quantized weights are left as
    they are. Transient memory: one group's bytes."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    packed = 0
    with torch.no_grad():
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for modules in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
                for name in ("weight", "bias"):
                    params = [getattr(m, name) for m in modules]
                    if not all(_plain(p) for p in params) \
                            or _side_by_side([p.data for p in params]) is not None:
                        continue
                    whole = torch.cat([p.data for p in params], dim=0)
                    start = 0
                    for p in params:
                        p.data = whole[start:start + p.shape[0]]
                        start += p.shape[0]
                packed += 1
    return packed


def _side_by_side(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor the parts make together along dim 0 when they lie one after another in one storage (a view), else
    None."""
    first = parts[0]
    if not all(_plain(p) and p.is_contiguous() and p.dtype == first.dtype and p.device == first.device
               and p.shape[1:] == first.shape[1:] for p in parts):
        return None
    storage = first.untyped_storage().data_ptr()
    address = first.data_ptr()
    for p in parts:
        if p.untyped_storage().data_ptr() != storage or p.data_ptr() != address:
            return None
        address += p.numel() * p.element_size()
    rows = sum(p.shape[0] for p in parts)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))


class _Fused:
    """One layer's fused weights, made again whenever the parameters moved (a wake puts them at new addresses)."""

    __slots__ = ("key", "qkv", "qkv_bias", "gate_up")

    def __init__(self) -> None:
        self.key: tuple[int, ...] = ()
        self.qkv: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None
        self.gate_up: torch.Tensor | None = None


# -- the elementwise parts (eager on the CPU; compiled, one kernel each, on a CUDA card) ---------------------------
def _norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as transformers' RMSNorm: computed in float32, rounded to the input's dtype, then the weight applied
    return weight * F.rms_norm(hidden, (hidden.shape[-1],), eps=eps)


def _add_norm(residual: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, eps: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    summed = residual + hidden
    return summed, _norm(summed, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _heads(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
           cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[b, s, (heads + 2 kv_heads) x head_dim] -> q, k, v as [b, heads, s, head_dim] (Qwen3's per-head norms on q
    and k, then RoPE; cos/sin [b, 1, s, head_dim])."""
    b, s = qkv.shape[0], qkv.shape[1]
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q = q.reshape(b, s, heads, head_dim)
    k = k.reshape(b, s, kv_heads, head_dim)
    if q_norm is not None and k_norm is not None:
        q, k = _norm(q, q_norm, eps), _norm(k, k_norm, eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v.reshape(b, s, kv_heads, head_dim).transpose(1, 2)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _Parts:
    """The elementwise functions a forward pass calls, plain or through `wrap` (torch.compile)."""

    def __init__(self, wrap: Callable[..., Any] | None = None) -> None:
        def made(fn: Callable[..., Any]) -> Callable[..., Any]:
            return fn if wrap is None else wrap(fn, dynamic=True, fullgraph=True)

        self.norm = made(_norm)
        self.add_norm = made(_add_norm)
        self.heads = made(_heads)
        self.silu_mul = made(_silu_mul)


class Decoder:
    """`forward(ids, positions, mask, cache)` -> the last hidden states, as the transformers decoder computes them,
    writing keys and values through `cache.update` (the loop's SlotCache)."""

    def __init__(self, model: Any, attention: Callable[..., tuple[torch.Tensor, Any]]) -> None:
        self.model = model
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        self.attention = attention
        self.split: dict[int, Any] | None = None   # rows -> SplitAttention, when decode steps run the split kernels
        self._fused = [_Fused() for _ in self.base.layers]
        self.prefill_parts = _Parts()
        self.eager()

    def eager(self) -> None:
        """Decode steps' elementwise parts as plain torch operations."""
        self.step_parts = _Parts()
        self.compiled = False

    def compile(self) -> None:
        """Decode steps' elementwise parts through torch.compile, with the batch dimension dynamic (compiled once for
        one row and once for any other count); `warm` compiles them. Prefill stays eager: its passes are bound by
        the matrix multiplies, and its shapes vary more."""
        self.step_parts = _Parts(torch.compile)
        self.compiled = True

    def use_split_attention(self, on: bool = True) -> None:
        """Decode steps' attention (and their cache writes) through the split kernels, or SDPA (`on=False`)."""
        self.split = {} if on else None

    def _split_for(self, rows: int, cache: Any, device: torch.device) -> Any:
        from workers.backends.split_attention import SplitAttention

        assert self.split is not None
        kernel = self.split.get(rows)
        if kernel is None:   # first met outside a graph's capture: the warm-up step runs before it
            kernel = SplitAttention(rows, self.heads, self.kv_heads, self.head_dim, cache.context, device)
            self.split[rows] = kernel
        return kernel

    def fused(self, index: int) -> _Fused:
        layer = self.base.layers[index]
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        gu = [mlp.gate_proj.weight, mlp.up_proj.weight]
        key = tuple(t.data_ptr() if _plain(t) else id(t) for t in qkv + gu)
        entry = self._fused[index]
        if entry.key != key:
            entry.key = key
            entry.qkv = _side_by_side([t.data for t in qkv]) if all(_plain(t) for t in qkv) else None
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            entry.qkv_bias = None
            if entry.qkv is not None and any(b is not None for b in biases):
                entry.qkv_bias = _side_by_side([b.data for b in biases]) if all(_plain(b) for b in biases) else None
                if entry.qkv_bias is None:
                    entry.qkv = None
            entry.gate_up = _side_by_side([t.data for t in gu]) if all(_plain(t) for t in gu) \
                and mlp.gate_proj.bias is None and mlp.up_proj.bias is None else None
        return entry

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: Any
                ) -> torch.Tensor:
        """`mask` may be None for a decode step when the split kernels run it (they read each row's position)."""
        base = self.base
        decode = ids.shape[1] == 1
        parts = self.step_parts if decode else self.prefill_parts
        split = self._split_for(ids.shape[0], cache, ids.device) if decode and self.split is not None else None
        if split is not None:
            rows, step_positions = cache.decode_target()
        hidden = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]
        residual: torch.Tensor | None = None
        for i, layer in enumerate(base.layers):
            if residual is None:
                residual, x = hidden, parts.norm(hidden, layer.input_layernorm.weight, self.eps)
            else:
                residual, x = parts.add_norm(residual, hidden, layer.input_layernorm.weight, self.eps)
            attn, mlp = layer.self_attn, layer.mlp
            fused = self.fused(i)
            if fused.qkv is not None:
                qkv = F.linear(x, fused.qkv, fused.qkv_bias)
            else:
                qkv = torch.cat((attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), dim=-1)
            q_norm = getattr(attn, "q_norm", None)
            k_norm = getattr(attn, "k_norm", None)
            q, k, v = parts.heads(qkv, None if q_norm is None else q_norm.weight,
                                    None if k_norm is None else k_norm.weight, self.eps, cos, sin,
                                    self.heads, self.kv_heads, self.head_dim)
            if split is not None:
                out = split(q, k, v, cache.keys[i], cache.values[i], step_positions, rows, attn.scaling)
            else:
                keys, values = cache.update(k, v, i)
                out, _ = self.attention(attn, q, keys, values, mask, scaling=attn.scaling)
                out = out.reshape(*out.shape[:2], -1)
            hidden = attn.o_proj(out)
            residual, x = parts.add_norm(residual, hidden, layer.post_attention_layernorm.weight, self.eps)
            if fused.gate_up is not None:
                hidden = mlp.down_proj(parts.silu_mul(F.linear(x, fused.gate_up)))
            else:
                hidden = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert residual is not None
        _, out = parts.add_norm(residual, hidden, base.norm.weight, self.eps)
        return out

    def warm(self, device: torch.device, rows: tuple[int, ...] = (1, 3)) -> float:
        """Run decode steps' elementwise parts on inputs of one token for one row and for several (compiling them
        where compiled: one row is a shape of its own, any other count shares one); returns the seconds it took."""
        import time

        t0 = time.perf_counter()
        parts = self.step_parts
        dtype = self.base.embed_tokens.weight.dtype
        hidden_size = self.base.embed_tokens.weight.shape[-1]
        layer = self.base.layers[0]
        attn = layer.self_attn
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        width = (self.heads + 2 * self.kv_heads) * self.head_dim
        inter = layer.mlp.gate_proj.weight.shape[0]

        def rand(*shape: int) -> torch.Tensor:   # a new tensor each time: the compiled code guards on aliasing
            return torch.randn(*shape, device=device, dtype=dtype)

        with torch.inference_mode():
            for b in rows:
                parts.norm(rand(b, 1, hidden_size), layer.input_layernorm.weight, self.eps)
                parts.add_norm(rand(b, 1, hidden_size), rand(b, 1, hidden_size), layer.input_layernorm.weight,
                               self.eps)
                parts.heads(rand(b, 1, width), None if q_norm is None else q_norm.weight,
                            None if k_norm is None else k_norm.weight, self.eps, rand(b, 1, 1, self.head_dim),
                            rand(b, 1, 1, self.head_dim), self.heads, self.kv_heads, self.head_dim)
                parts.silu_mul(rand(b, 1, 2 * inter))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
