"""Run by tests/test_split_attention.py in a process of its own, with TRITON_INTERPRET=1 set before Triton is
imported (the kernels are made interpreted or compiled when their module loads): the split kernels against SDPA
on random inputs, and the decode loop running them against transformers' greedy `generate`. Prints one JSON
object."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from workers.backends.split_attention import SplitAttention  # noqa: E402

def reference(q, k_new, v_new, keys, values, positions, rows, scale, context):  # type: ignore[no-untyped-def]
    """Per row, in float64: the new key and value written at its position, SDPA over positions 0..position (a
    padded row, at the scratch column, over its new token alone)."""
    keys, values = keys.clone(), values.clone()
    outs = []
    for i in range(q.shape[0]):
        row, pos = int(rows[i]), int(positions[i])
        keys[row, :, pos], values[row, :, pos] = k_new[i, :, 0], v_new[i, :, 0]
        first = pos if pos >= context else 0
        kv_heads, groups = keys.shape[1], q.shape[1] // keys.shape[1]
        out = F.scaled_dot_product_attention(q[i].reshape(kv_heads, groups, -1).double(),
                                             keys[row, :, first:pos + 1].double(),
                                             values[row, :, first:pos + 1].double(), scale=scale)
        outs.append(out.reshape(1, -1))
    return torch.stack(outs), keys, values


def kernel_cases() -> list[dict[str, object]]:
    torch.manual_seed(0)
    results = []
    cases = [  # rows, heads, kv_heads, head_dim, context, dtype, padded last row
        (1, 8, 2, 32, 200, torch.float32, False),
        (3, 4, 4, 16, 70, torch.float32, True),
        (5, 16, 2, 32, 300, torch.bfloat16, True),
        (2, 6, 3, 64, 33, torch.float32, False),
    ]
    for rows_n, heads, kv_heads, dim, context, dtype, padded in cases:
        slots = rows_n + 2
        keys = torch.randn(slots, kv_heads, context + 1, dim, dtype=dtype)
        values = torch.randn_like(keys)
        qkv = torch.randn(rows_n, 1, (heads + 2 * kv_heads) * dim, dtype=dtype)   # views, as the decoder passes
        q, k_new, v_new = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
        q = q.reshape(rows_n, 1, heads, dim).transpose(1, 2)
        k_new = k_new.reshape(rows_n, 1, kv_heads, dim).transpose(1, 2)
        v_new = v_new.reshape(rows_n, 1, kv_heads, dim).transpose(1, 2)
        positions = torch.randint(1, context, (rows_n,))
        positions[0] = context - 1                         # the longest a row can be
        if padded:
            positions[-1] = context
        rows = torch.randperm(slots)[:rows_n]
        kernel = SplitAttention(rows_n, heads, kv_heads, dim, context, torch.device("cpu"))
        expected, keys_after, values_after = reference(q, k_new, v_new, keys, values, positions, rows, dim ** -0.5,
                                                       context)
        out = kernel(q, k_new, v_new, keys, values, positions, rows, dim ** -0.5)
        error = float((out.double() - expected).norm() / expected.norm())
        results.append({"case": f"rows={rows_n} heads={heads}/{kv_heads} dim={dim} context={context} {dtype}",
                        "splits": kernel.splits, "relative_error": error, "dtype": str(dtype),
                        "cache_written": bool(torch.equal(keys, keys_after) and torch.equal(values, values_after)),
                        "shape": list(out.shape)})
    return results


def loop_case(model_dir: str) -> dict[str, object]:
    from tests.test_decode import PROMPTS
    from workers.backends.decode import Sequence
    from workers.backends.loading import load_torch_model
    from workers.models import ModelSpec

    spec = ModelSpec(role="generate", path=Path(model_dir), name="tiny-gen", max_length=96, max_new_tokens=12,
                     extra={"prefill_chunk": 16, "attention": "split"})
    gen = load_torch_model(spec, "cpu")
    assert gen.loop is not None and gen.loop.decoder is not None
    reference_ids = [gen.generate_ids([p], 12)[0] for p in PROMPTS]
    together = gen.loop_ids(PROMPTS[:4], 12)
    # one joins mid-decode; then a sleep and a wake with sequences in flight
    ids = [gen.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    first = Sequence(key="a", prompt=list(ids[3]), max_new=12)
    gen.loop.add(first)
    for _ in range(5):
        gen.decode_step()
    later = Sequence(key="b", prompt=list(ids[1]), max_new=12)
    gen.loop.add(later)
    for _ in range(3):
        gen.decode_step()
    gen.sleep()
    gen.wake()
    while first.done is None or later.done is None:
        gen.decode_step()
    return {"split_rows": sorted(gen.loop.decoder.split or {}), "reference": reference_ids, "together": together,
            "joined": [first.generated, later.generated], "expected_joined": [reference_ids[3], reference_ids[1]]}


if __name__ == "__main__":
    out: dict[str, object] = {"kernels": kernel_cases()}
    if len(sys.argv) > 1:
        out["loop"] = loop_case(sys.argv[1])
    print(json.dumps(out))
