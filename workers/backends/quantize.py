"""8-bit weights for torch models (`quantize = "fp8" | "int8"` per model in the models file), applied at load from
the bf16 checkpoint with torchao's quantized tensors, not kernels of ragq's own.

- `fp8`: the linear layers' weights in float8 (e4m3), one scale per output row; each call quantizes its
  activations per row on the fly and runs torch's FP8 matrix multiply (`torch._scaled_mm`, cuBLASLt). Needs a CUDA
  card of compute capability 8.9 or later (Ada, Hopper, Blackwell). Chosen over torchao's FP8 weight-only form by
  measurement (bench/quant_gpu.py, H200: 72 against 406 µs for a Qwen3-4B MLP at one row; bf16 36 µs).
- `int8`: int8 weights, one scale per output row, activations as they are (torchao's int8 weight-only); runs on
  the CPU and on any CUDA card.

Both halve the weights' memory (what lets the reference stack's three models share a 16 GiB card) and make a decode
step slower, not faster: outside torch.compile torchao widens the weights or quantizes the activations in kernels
of their own at every call (measured: one sequence at 0.41x bf16's tokens/s in int8, 0.60x in fp8; BENCHMARKS.md).

The output head (`lm_head`) stays as it is: the reranker reads two of its rows, and Qwen3's small models tie it to
the input embeddings (quantizing it would store it twice). torchao's tensors are wrappers around plain tensors
(`qdata`, `scale`); `tensor_leaves` lists those, so sleep, wake, the host copy and the generator's fixed-address
range move the 8-bit bytes, and a model's measured size is the quantized one.
"""

from __future__ import annotations

from typing import Any

import torch


def _quiet_import() -> None:
    """Import torchao without its import-time noise: torch's notes on Enum registration, and (on a CPU build of
    torch) warnings about the CUDA kernels it cannot load there."""
    import logging

    names = ("torch.utils._pytree", "torchao")
    levels = [logging.getLogger(n).level for n in names]
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        import torchao.quantization  # noqa: F401
    finally:
        for n, level in zip(names, levels):
            logging.getLogger(n).setLevel(level)


def _config(quantize: str) -> Any:
    if quantize == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def quantize_model(model: torch.nn.Module, quantize: str) -> int:
    """Quantize the linear layers' weights in place (on the device they are on); returns how many layers."""
    if quantize == "none":
        return 0
    _quiet_import()
    from torchao.quantization import quantize_

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen: list[str] = []

    def linear_not_head(module: torch.nn.Module, fqn: str) -> bool:
        if isinstance(module, torch.nn.Linear) and module is not head:
            chosen.append(fqn)
            return True
        return False

    with torch.no_grad():
        quantize_(model, _config(quantize), filter_fn=linear_not_head)
    return len(chosen)


class Leaf:
    """One plain tensor a model's weights are made of: a parameter or buffer itself (`attr` None: replaced through
    `.data`, so the module keeps its Parameter), or an inner tensor of a quantized weight (replaced as an
    attribute of the wrapper)."""

    __slots__ = ("owner", "attr")

    def __init__(self, owner: torch.Tensor, attr: str | None) -> None:
        self.owner = owner
        self.attr = attr

    def get(self) -> torch.Tensor:
        return self.owner.data if self.attr is None else getattr(self.owner, self.attr)

    def set(self, tensor: torch.Tensor) -> None:
        if self.attr is None:
            self.owner.data = tensor
        else:
            setattr(self.owner, self.attr, tensor)


def _leaves_of(tensor: torch.Tensor, out: list[Leaf]) -> None:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(tensor):
        out.append(Leaf(tensor, None))
        return
    names, _ = tensor.__tensor_flatten__()
    for name in names:
        inner = getattr(tensor, name)
        if is_traceable_wrapper_subclass(inner):
            _leaves_of(inner, out)
        else:
            out.append(Leaf(tensor, name))


def tensor_leaves(module: torch.nn.Module) -> list[Leaf]:
    """The plain tensors behind a module's parameters and buffers, each once, in a fixed order."""
    import itertools

    seen: set[int] = set()
    leaves: list[Leaf] = []
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            _leaves_of(tensor, leaves)
    return leaves


def leaves_bytes(module: torch.nn.Module) -> int:
    total = 0
    for leaf in tensor_leaves(module):
        t = leaf.get()
        total += t.numel() * t.element_size()
    return total
