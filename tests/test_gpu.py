"""On a CUDA machine: the torch backend's residency moves keep outputs identical, and the pinned host copy made
ahead of time is exactly sized and used by sleep. Skipped where no GPU is visible; on a GPU machine without pytest:
`python3 tests/test_gpu.py`."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _embedder(root: Path):  # type: ignore[no-untyped-def]
    from tests.tinymodels import build_qwen3
    from workers.backends.loading import load_torch_model
    from workers.models import ModelSpec

    path = build_qwen3(root / "embed", causal=False, seed=1)
    spec = ModelSpec(role="embed", path=path, name="tiny", kind="last", dtype="float32")
    return load_torch_model(spec, "cuda:0")


def test_prepared_host_copy_sleep_and_wake_keep_outputs(tmp_path: Path) -> None:
    model = _embedder(tmp_path)
    texts = ["pinned memory", "a second, longer text about budgets and batches"]
    first = model.execute(texts, {})
    before = first.outputs
    assert first.device_ms is not None and first.device_ms > 0 and first.alloc_retries >= 0
    model.prepare_host_copy()
    assert model._host_buffer is not None and model._host_buffer.is_pinned()
    assert model._host_buffer.numel() < 2 * model.nbytes  # exactly sized, not rounded up to a power of two
    used = torch.cuda.memory_allocated()
    model.sleep()
    assert torch.cuda.memory_allocated() < used
    assert all(not leaf.get().is_cuda for leaf in model._leaves())
    ready = model.wake(asynchronous=True)
    ready.wait()
    assert torch.allclose(torch.tensor(model.run(texts, {})), torch.tensor(before), atol=1e-5)
    model.sleep()  # again: the same host copy, no new one
    model.wake()
    assert torch.allclose(torch.tensor(model.run(texts, {})), torch.tensor(before), atol=1e-5)
    model.unload()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        test_prepared_host_copy_sleep_and_wake_keep_outputs(Path(tmp))
    print("gpu checks passed")
