"""Decode attention split along the keys (flash-decoding), as Triton kernels: one query token per row, the KV cache
read as stored (each program takes one key/value head and the query heads that share it), and the step's new key
and value written into the cache by the same launch.

Why: torch's SDPA runs a decode step's attention through a prefill kernel (cuDNN's on an H200) whose tiles of query
rows keep 8 of 132 SMs busy for one sequence: 32 µs a layer, 23 % of a one-row step, where the bytes it reads
(the row's keys and values) take under 2 µs at the card's copy rate. Split along the keys, every SM reads its share:

  partials   grid (rows, kv_heads, splits): split s of a row attends its query heads to the cached positions
             [s * split_len, (s + 1) * split_len) below the row's position, keeping the running max, sum and
             weighted values (online softmax); split 0 also takes the new token's key and value, and stores them at
             the row's position in the cache. No program reads that position from the cache, so no launch waits
  combine    grid (rows, heads): the splits' partials, rescaled to their common max, summed and normalised

Work follows each row's own length (read on the device, so one captured CUDA graph serves every step); the grid
depends only on the rows and the cache's width. A padded row (its position is the cache's scratch column) attends
to its new token alone.

On a machine without CUDA, Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors: that is
how the tests check them against SDPA.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # the SDPA path runs without it
    triton = None

BLOCK_N = 32            # keys per inner iteration
PROGRAMS_PER_SM = 2     # partial programs aimed at per SM when choosing the split count
MAX_SPLITS = 64         # a power of two: the combine kernel reads this many slots (masked), so one compiled
                        # variant of each kernel serves every batch size (a compile is ~1 s at first use)


def why_not_available(device: torch.device) -> str | None:
    """None where the kernels can run on `device`, else why not."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return f"{device.type} (the kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    if triton is None:
        return "Triton is not installed"
    return None


if triton is not None:

    @triton.jit
    def _keys_block(q, k_cache, v_cache, kv_base, n0, end, s_ct, scale_log2, m, total, acc,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, WIDEN: tl.constexpr):
        """Attend the query heads to cached positions [n0, min(n0 + BLOCK, end)): the online softmax's update.
        `WIDEN`: the products in float32 (Triton's interpreter multiplies bfloat16 wrongly in `tl.dot`)."""
        n = n0 + tl.arange(0, BLOCK)
        n_ok = n < end
        offsets = kv_base + n[:, None].to(tl.int64) * s_ct + tl.arange(0, HEAD_DIM)[None, :]
        k = tl.load(k_cache + offsets, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_cache + offsets, mask=n_ok[:, None], other=0.0)
        if WIDEN:
            q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        return m_new, total, acc

    @triton.jit(do_not_specialize=["split_len", "splits"])   # one compiled variant for every batch size
    def _partials(q_ptr, k_new_ptr, v_new_ptr, k_cache, v_cache, pos_ptr, rows_ptr, acc_ptr, stat_ptr,
                 scale_log2, split_len, scratch, splits,
                 s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_cr, s_ch, s_ct,
                 GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                 INTERPRETED: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        pos = tl.load(pos_ptr + b).to(tl.int32)
        row = tl.load(rows_ptr + b).to(tl.int64)
        cached = tl.where(pos >= scratch, 0, pos)          # a padded row attends to its new token alone
        g = tl.arange(0, GROUPS_PAD)
        d = tl.arange(0, HEAD_DIM)
        g_ok = g < GROUPS
        q = tl.load(q_ptr + b * s_qb + (h * GROUPS + g)[:, None] * s_qh + d[None, :], mask=g_ok[:, None],
                    other=0.0)
        kv_base = row * s_cr + h * s_ch
        m = tl.full((GROUPS_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((GROUPS_PAD,), tl.float32)
        acc = tl.zeros((GROUPS_PAD, HEAD_DIM), tl.float32)
        start = s * split_len
        end = tl.minimum(start + split_len, cached)
        if not INTERPRETED:
            for n0 in range(start, end, BLOCK):
                m, total, acc = _keys_block(q, k_cache, v_cache, kv_base, n0, end, s_ct, scale_log2, m, total, acc,
                                            HEAD_DIM, BLOCK, False)
        else:   # Triton's interpreter takes no loaded value as a `range` bound
            n0 = start
            while n0 < end:
                m, total, acc = _keys_block(q, k_cache, v_cache, kv_base, n0, end, s_ct, scale_log2, m, total, acc,
                                            HEAD_DIM, BLOCK, True)
                n0 += BLOCK
        if s == 0:   # the step's own token: attended here, stored at its position for the next steps
            k_new = tl.load(k_new_ptr + b * s_kb + h * s_kh + d)
            v_new = tl.load(v_new_ptr + b * s_vb + h * s_vh + d)
            own = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2
            m_new = tl.maximum(m, own)
            alpha = tl.exp2(m - m_new)
            p_own = tl.exp2(own - m_new)
            total = total * alpha + p_own
            acc = acc * alpha[:, None] + p_own[:, None] * v_new.to(tl.float32)[None, :]
            m = m_new
            at = kv_base + pos.to(tl.int64) * s_ct + d
            tl.store(k_cache + at, k_new)
            tl.store(v_cache + at, v_new)
        heads = tl.num_programs(1) * GROUPS
        slot = (b * heads + h * GROUPS + g) * splits + s
        tl.store(acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])
        tl.store(stat_ptr + slot * 2, m, mask=g_ok)
        tl.store(stat_ptr + slot * 2 + 1, total, mask=g_ok)

    @triton.jit(do_not_specialize=["splits"])
    def _combine(acc_ptr, stat_ptr, out_ptr, s_ob, s_oh, splits,
                HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        heads = tl.num_programs(1)
        sp = tl.arange(0, SPLITS_PAD)
        sp_ok = sp < splits
        d = tl.arange(0, HEAD_DIM)
        slot = (b * heads + h) * splits + sp
        m = tl.load(stat_ptr + slot * 2, mask=sp_ok, other=float("-inf"))
        total = tl.load(stat_ptr + slot * 2 + 1, mask=sp_ok, other=0.0)
        top = tl.max(m, 0)                                  # finite: split 0 always holds the new token
        weight = tl.exp2(m - top)
        acc = tl.load(acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], mask=sp_ok[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
        tl.store(out_ptr + b * s_ob + h * s_oh + d, out.to(out_ptr.dtype.element_ty))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def split_count(rows: int, kv_heads: int, width: int, sms: int) -> int:
    """Splits per (row, key/value head): enough programs for PROGRAMS_PER_SM per SM, no split under BLOCK_N keys."""
    wanted = -(-PROGRAMS_PER_SM * sms // max(1, rows * kv_heads))
    most = max(1, -(-width // BLOCK_N))
    return max(1, min(wanted, most, MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 8


class SplitAttention:
    """Buffers for one (rows, cache) shape; `__call__` runs a decode step's attention for one layer."""

    def __init__(self, rows: int, heads: int, kv_heads: int, head_dim: int, context: int, device: torch.device
                 ) -> None:
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads do not share {kv_heads} key/value heads evenly")
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError(f"head_dim {head_dim} (the kernels take a power of two >= 16)")
        self.groups = heads // kv_heads
        self.groups_pad = max(16, 1 << (self.groups - 1).bit_length())   # tl.dot takes at least 16 rows
        self.heads, self.kv_heads, self.head_dim, self.context = heads, kv_heads, head_dim, context
        self.splits = split_count(rows, kv_heads, context, _sm_count(device))
        self.split_len = _ceil_div(_ceil_div(context, self.splits), BLOCK_N) * BLOCK_N
        self.acc = torch.empty((rows * heads * self.splits, head_dim), dtype=torch.float32, device=device)
        self.stat = torch.empty((rows * heads * self.splits, 2), dtype=torch.float32, device=device)

    def __call__(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, scale: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """q [b, heads, 1, d]; k_new, v_new [b, kv_heads, 1, d]; keys, values [slots, kv_heads, context + 1, d]
        (the cache, column `context` the scratch one); positions [b] (where the new token goes; `context` for a
        padded row); rows [b] (each row's cache row). Returns [b, 1, heads * d]."""
        b = q.shape[0]
        if out is None:
            out = torch.empty((b, 1, self.heads * self.head_dim), dtype=q.dtype, device=q.device)
        if keys.stride(3) != 1 or q.stride(3) != 1 or k_new.stride(3) != 1 or v_new.stride(3) != 1:
            raise ValueError("the head dimension must be contiguous")
        if keys.stride() != values.stride():
            raise ValueError("keys and values must be laid out alike")
        _partials[(b, self.kv_heads, self.splits)](
            q, k_new, v_new, keys, values, positions, rows, self.acc, self.stat,
            float(scale) * 1.4426950408889634, self.split_len, self.context, self.splits,
            q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2),
            GROUPS=self.groups, GROUPS_PAD=self.groups_pad, HEAD_DIM=self.head_dim, BLOCK=BLOCK_N,
            INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1")
        _combine[(b, self.heads)](
            self.acc, self.stat, out, out.stride(0), self.head_dim, self.splits,
            HEAD_DIM=self.head_dim, SPLITS_PAD=MAX_SPLITS)
        return out


def warm(heads: int, kv_heads: int, head_dim: int, context: int, dtype: torch.dtype, device: torch.device) -> float:
    """Compile the kernels for these shapes now (at load) rather than in a question's first decode step; returns
    the seconds it took (~0 once Triton's cache holds them)."""
    import time

    t0 = time.perf_counter()
    kernel = SplitAttention(1, heads, kv_heads, head_dim, context, device)
    keys = torch.zeros((1, kv_heads, context + 1, head_dim), dtype=dtype, device=device)
    qkv = torch.zeros((1, 1, (heads + 2 * kv_heads) * head_dim), dtype=dtype, device=device)
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    one = torch.zeros(1, dtype=torch.long, device=device)
    kernel(q.reshape(1, 1, heads, head_dim).transpose(1, 2), k.reshape(1, 1, kv_heads, head_dim).transpose(1, 2),
           v.reshape(1, 1, kv_heads, head_dim).transpose(1, 2), keys, keys.clone(), one, one, head_dim ** -0.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
