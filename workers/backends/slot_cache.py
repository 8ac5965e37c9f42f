"""The decode loop's KV cache: every sequence slot's keys and values, preallocated (workers/backends/decode.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class SlotCache:
    """Keys and values of `slots` sequences x `context` positions (+1 scratch column) for every layer.

    Before each forward pass the loop says where its tokens go (`for_decode` / `for_prefill`); the decoder layers'
    `update(key, value, layer)` calls write them there and get back the keys and values to attend to."""

    def __init__(self, layers: int, slots: int, context: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None
                 ) -> None:
        shape = (slots, kv_heads, context + 1, head_dim)
        make = alloc or (lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=device))
        self.keys = [make(shape, dtype) for _ in range(layers)]
        self.values = [make(shape, dtype) for _ in range(layers)]
        self.context = context
        self._mode: tuple[Any, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def for_decode(self, rows: torch.Tensor, positions: torch.Tensor, width: int) -> None:
        self._mode = ("decode", rows, positions, width)

    def decode_target(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step's rows and the positions its new tokens go to (the split kernels write them)."""
        assert self._mode[0] == "decode"
        return self._mode[1], self._mode[2]

    def for_prefill(self, rows: torch.Tensor, positions: torch.Tensor, width: int) -> None:
        """Tokens of several sequences at once: row i's tokens at `positions[i]` (padding at the scratch column),
        attending to the first `width` positions of their own rows."""
        self._mode = ("prefill", rows, positions, width)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._mode[0] == "decode":
            _, rows, positions, width = self._mode
            keys[rows, :, positions] = key_states[:, :, 0]
            values[rows, :, positions] = value_states[:, :, 0]
            return keys[:rows.shape[0], :, :width], values[:rows.shape[0], :, :width]
        _, rows, positions, width = self._mode
        keys[rows[:, None], :, positions] = key_states.transpose(1, 2)
        values[rows[:, None], :, positions] = value_states.transpose(1, 2)
        return keys.index_select(0, rows)[:, :, :width], values.index_select(0, rows)[:, :, :width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def move_row(self, src: int, dst: int, length: int) -> None:
        for tensor in self.keys + self.values:
            tensor[dst, :, :length] = tensor[src, :, :length]

    def swap_rows(self, a: int, b: int, length_a: int, length_b: int) -> None:
        for tensor in self.keys + self.values:
            held = tensor[b, :, :length_b].clone()
            tensor[b, :, :length_a] = tensor[a, :, :length_a]
            tensor[a, :, :length_b] = held

    def rows_to(self, rows: list[tuple[int, int]], device: torch.device, pin: bool) -> list[torch.Tensor]:
        """The first `length` positions of each (row, length), stacked per layer, on `device` (the host tier)."""
        out = []
        for tensor in self.keys + self.values:
            parts = [tensor[row, :, :length] for row, length in rows]
            host = [torch.empty(p.shape, dtype=p.dtype, device=device, pin_memory=pin) for p in parts]
            for h, p in zip(host, parts):
                h.copy_(p, non_blocking=pin)
            out.extend(host)
        return out
