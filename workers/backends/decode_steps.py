"""A decode step on the card (workers/backends/decode.py): sampling on the device, a step captured as a CUDA graph
and replayed (from the host's inputs, or advanced on the device from the last replay's tokens), and a launched step
on its way to the host."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row: greedy where temperature is 0, else a draw from the temperature-scaled distribution cut to its
    top-p mass, by an exponential race (no host synchronisation: it runs inside a CUDA graph)."""
    greedy = logits.argmax(-1)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    ordered, index = probs.sort(dim=-1, descending=True)
    keep = (ordered.cumsum(-1) - ordered) < top_p[:, None]
    ordered = ordered * keep
    race = ordered / torch.empty_like(ordered).exponential_(1.0)
    drawn = index.gather(-1, race.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, drawn, greedy)


@dataclass
class Launched:
    """A decode step on its way: the rows it ran, their positions, its tokens on the device and on their way to
    the host (`ready` is set when they are there; None on the CPU)."""

    seqs: list[Any]                   # the running Sequences, in row order
    positions: list[int]
    out: torch.Tensor
    pos: torch.Tensor | None          # the positions on the device (eager steps: a chained step adds one)
    graph: StepGraph | None
    key: tuple[int, bool, int] | None
    host: torch.Tensor
    ready: Any


class StepGraph:
    """One decode step over `bucket` rows captured as a CUDA graph; `run` fills its inputs and replays it."""

    def __init__(self, loop: Any, bucket: int, sampling: bool, width: int) -> None:
        device = loop.device
        self.ids = torch.zeros(bucket, dtype=torch.long, device=device)
        self.positions = torch.full((bucket,), loop.context, dtype=torch.long, device=device)
        self.temps = torch.zeros(bucket, device=device)
        self.top_p = torch.ones(bucket, device=device)
        rows = loop._rows[:bucket]

        def body() -> torch.Tensor:
            logits = loop._step_logits(self.ids, self.positions, rows, width)
            return sample(logits, self.temps, self.top_p) if sampling else logits.argmax(-1)

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(1):   # warm-up outside the graph (allocator, library handles)
                body()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's loader and copy threads go on using the device while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = body()

    def advance(self, n: int) -> None:
        """Replay with the last replay's tokens as the inputs of its first `n` rows, one position on (on the
        device: no copy from the host)."""
        self.ids.copy_(self.out)
        self.positions[:n].add_(1)
        self.graph.replay()

    def run(self, ids: list[int], positions: list[int], temps: list[float], top_p: list[float]) -> None:
        self.ids.copy_(torch.tensor(ids), non_blocking=False)
        self.positions.copy_(torch.tensor(positions), non_blocking=False)
        self.temps.copy_(torch.tensor(temps, dtype=torch.float32))
        self.top_p.copy_(torch.tensor(top_p, dtype=torch.float32))
        self.graph.replay()
