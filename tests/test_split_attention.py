"""The split (flash-decoding) attention kernels, run by Triton's interpreter on the CPU: against SDPA on random
inputs (padded rows, rows out of order, several key/value head groupings, bfloat16), and inside the decode loop,
token for token against transformers' greedy `generate`, with a sequence joining mid-decode and a sleep and wake
in flight. The same kernels compiled run on a CUDA card (bench/decode_gpu.py checks them there against SDPA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.backends.split_attention import split_count, why_not_available

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def interpreted(tiny_models) -> dict:  # type: ignore[no-untyped-def, type-arg]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "interpreted_split.py"), str(tiny_models["lm"])],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_kernels_equal_sdpa_and_write_the_new_key_and_value(interpreted) -> None:  # type: ignore[no-untyped-def]
    cases = interpreted["kernels"]
    assert len(cases) == 4
    for case in cases:
        limit = 1e-2 if "bfloat16" in case["dtype"] else 1e-5
        assert case["relative_error"] < limit, case
        assert case["cache_written"], case
    assert any(c["splits"] > 1 for c in cases)   # the combine of several splits is exercised


def test_the_loop_with_split_attention_equals_generate(interpreted) -> None:  # type: ignore[no-untyped-def]
    loop = interpreted["loop"]
    assert loop["split_rows"]                       # the decode steps ran the kernels
    assert all(len(r) > 0 for r in loop["reference"])
    assert loop["together"] == loop["reference"][:4]
    assert loop["joined"] == loop["expected_joined"]


def test_splits_fill_the_card_and_attention_choice_is_checked(tiny_models) -> None:  # type: ignore[no-untyped-def]
    assert split_count(1, 8, 1281, 132) == 33        # one row: ~2 programs per SM
    assert split_count(16, 8, 1281, 132) == 3
    assert split_count(64, 8, 1281, 132) == 1
    assert split_count(1, 8, 40, 132) == 2            # never a split under 32 keys
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert why_not_available(torch.device("cpu")) is not None
        from workers.backends.loading import load_torch_model
        from workers.models import ModelSpec

        spec = ModelSpec(role="generate", path=tiny_models["lm"], name="tiny-gen", max_length=96, max_new_tokens=8,
                         extra={"attention": "split"})
        with pytest.raises(Exception, match="split.*cannot run here"):
            load_torch_model(spec, "cpu")
