"""The generator's decode loop: a KV cache preallocated per sequence slot, continuous (iteration-level) batching,
decode steps replayed from CUDA graphs, streamed text.

A sequence joins the running batch at the next step and leaves when it finishes, as in vLLM and TGI:

  waiting    submitted, no slot yet (urgent ones first; a full cache makes them wait, or preempts a background one)
  prefill    its prompt (all but the last token) written into its slot's KV, in chunks of `prefill_chunk` tokens:
             each step runs one forward pass over the next chunks of every prefilling sequence together (up to
             `prefill_tokens` padded tokens), so running sequences are not stalled for long and questions that
             arrive together are prefilled together
  running    one decode step per loop step for all running sequences together: each row's last token at its own
             position, attending to its own slot (a per-row mask); the step samples on the device (greedy, or
             temperature / top-p by an exponential race) and one small copy brings the new tokens to the host

With `overlap` on (the default where graphs run), while the rows stay the same the loop launches the next step from
the tokens still on the device before it reads this step's tokens, so the host's work on them (text, stop strings,
the stream) runs while the card computes the next step instead of between steps. When the rows are to change (a
sequence finished, was cancelled, a new one is admitted or prefilled) it reads the step in flight first; a step
launched for a sequence that turned out finished is thrown away.

Rows of the cache are kept compact (running sequence i is row i), so a step over n sequences is a step over the
first n rows, and a CUDA graph captured for the smallest batch bucket >= n replays it; padded rows write to a
scratch column no sequence reads. Llama-shaped decoders (Qwen3, Qwen2, Llama) run the loop's own forward pass
(workers/backends/decoder.py: fused projections, compiled elementwise parts); any other transformers causal LM whose
decoder takes `position_ids`, a prepared mask per attention type and a cache object runs its own modules
(`SlotCache` answers their `update` calls).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ragq.core.errors import DeviceOutOfMemory
from workers.backends.decode_steps import GRAPH_BUCKETS, Launched, StepGraph, sample
from workers.backends.decoder import Decoder, supported
from workers.backends.fastpaths import decode_attention, use_decode_attention
from workers.backends.slot_cache import SlotCache
from workers.models import kv_cache_bytes, kv_heads_and_dim

log = logging.getLogger(__name__)

@dataclass
class Sequence:
    """One generation request inside the loop."""

    key: Any
    prompt: list[int]
    max_new: int
    stops: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    urgent: bool = False
    on_piece: Callable[[str], None] | None = None    # called with each new piece of the answer's text
    alive: Callable[[], bool] | None = None          # False: its deadline passed or its caller left: drop it
    generated: list[int] = field(default_factory=list)
    cached: int = 0                                  # positions of `context` already in its KV row
    row: int = -1
    done: str | None = None                          # eos | length | stop | cancelled | error
    error: BaseException | None = None
    text: str = ""                                   # the decoded text so far
    start: int | None = None                         # where the answer starts in `text` (leading space skipped)
    sent: int = 0                                    # chars of `text` streamed so far
    prefix_offset: int = 0                           # incremental detokenisation (TGI's two offsets)
    read_offset: int = 0
    first_token_at: float | None = None
    admitted_at: float | None = None
    preempted: int = 0

    @property
    def context(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def answer(self) -> str:
        """The final text: from the first non-space character to the first stop string, trailing space cut."""
        if self.start is None:
            return ""
        return cut_at_stop(self.text, self.stops)[self.start:].rstrip()


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to the first of `stops` (all of it where none occurs)."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


class DecodeLoop:
    def __init__(self, model: Any, tokenizer: Any, *, slots: int, context: int, device: torch.device,
                 graphs: bool = False, prefill_chunk: int = 512, prefill_tokens: int | None = None,
                 eos_ids: set[int] | None = None, own_decoder: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        config = model.config
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]) \
                and getattr(config, "use_sliding_window", False):
            raise ValueError("the decode loop runs full-attention models only (this one has sliding-window layers)")
        self.model = model
        self.packed_gqa = use_decode_attention(model)
        why_not = supported(model) if own_decoder else "turned off"
        # the loop's own forward pass (fused projections, compiled elementwise parts), else transformers' modules
        self.decoder: Decoder | None = Decoder(model, decode_attention) if why_not is None else None
        self.why_not_decoder = why_not
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.head = model.get_output_embeddings()
        self.tokenizer = tokenizer
        self.device = device
        self.slots = slots
        self.context = context
        self.prefill_chunk = max(16, prefill_chunk)
        self.prefill_tokens = max(self.prefill_chunk, prefill_tokens or 4 * self.prefill_chunk)
        self.graphs_on = graphs and device.type == "cuda"
        self.clock = clock
        self.eos = set(eos_ids or ())
        self.layer_types = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]))
        params = inspect.signature(self.base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._takes_cache_position = "cache_position" in params
        kv_heads, head_dim = kv_heads_and_dim(lambda name: getattr(config, name, None))
        self._shape = (config.num_hidden_layers, slots, context, kv_heads, head_dim)
        self.dtype = next(model.parameters()).dtype
        self.cache: SlotCache | None = None
        self.kv_bytes = kv_cache_bytes(config.num_hidden_layers, slots, context, kv_heads, head_dim,
                                       torch.empty((), dtype=self.dtype).element_size())
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self._host_kv: tuple[list[tuple[int, int]], list[torch.Tensor]] | None = None
        self._graphs: dict[tuple[int, bool, int], StepGraph] = {}
        self.width_round = 0   # graphs attend over the whole cache width (0) or the longest row rounded up to this
        self.full_width = False        # eager steps attend over the whole width too (as graphs do): profiling
        self.overlap = self.graphs_on  # launch the next step before reading this one's tokens (module docstring)
        self._ahead: Launched | None = None   # the step launched and not read yet
        self._later: list[Sequence] = []       # finished while the loop was put to sleep: step() returns them
        self._host_tokens: list[torch.Tensor] = []
        self._flip = 0
        self.counters = {"steps": 0, "tokens": 0, "prefill_tokens": 0, "graph_captures": 0, "capture_ms": 0.0,
                         "preempted": 0, "chained": 0, "wait_ms": 0.0}

    # -- the cache ----------------------------------------------------------------------------------------------
    def kv_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        layers, slots, context, kv_heads, head_dim = self._shape
        return [((slots, kv_heads, context + 1, head_dim), self.dtype)] * (2 * layers)

    def allocate(self, alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None) -> None:
        """Allocate the KV cache (at load, so its bytes count in the model's footprint); `alloc` places its
        tensors (in a range whose addresses outlive a sleep, workers/backends/vmm.py)."""
        if self.cache is None:
            layers, slots, context, kv_heads, head_dim = self._shape
            try:
                self.cache = SlotCache(layers, slots, context, kv_heads, head_dim, self.dtype, self.device, alloc)
            except torch.cuda.OutOfMemoryError as exc:
                raise DeviceOutOfMemory(f"KV cache of {self.kv_bytes} bytes: {str(exc).splitlines()[0]}") from None
            self._rows = torch.arange(self.slots, device=self.device)
            self._columns = torch.arange(self.context + 1, device=self.device)

    def release(self, keep: bool = False) -> None:
        """The model goes to sleep: the rows in use go to the host, then the device cache is dropped — or, with
        `keep` (its memory is released by the caller at the same addresses), kept with the graphs."""
        if self.cache is None:
            return
        self._later += self.settle()
        rows = [(s.row, s.cached) for s in self._in_cache()]
        pin = self.device.type == "cuda"
        self._host_kv = (rows, self.cache.rows_to(rows, torch.device("cpu"), pin)) if rows else None
        if pin:
            torch.cuda.current_stream(self.device).synchronize()
        if not keep:
            self.cache = None
            self._graphs.clear()   # they point at the weights' and the cache's old addresses

    def restore(self) -> None:
        """Reallocate the device cache (the model woke) and put the rows in use back."""
        self.allocate()
        if self._host_kv is None:
            return
        rows, tensors = self._host_kv
        self._host_kv = None
        assert self.cache is not None
        layer_tensors = self.cache.keys + self.cache.values
        for i, tensor in enumerate(layer_tensors):
            for (row, length), host in zip(rows, tensors[i * len(rows):(i + 1) * len(rows)]):
                tensor[row, :, :length].copy_(host, non_blocking=True)

    def _in_cache(self) -> list[Sequence]:
        return self.running + self.prefilling

    # -- requests -------------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        limit = self.context - 1
        if len(seq.prompt) > limit:   # keep the end of an over-long prompt (the question is last)
            seq.prompt = seq.prompt[-limit:]
        if not seq.prompt:
            seq.prompt = [next(iter(self.eos))] if self.eos else [0]
        seq.max_new = max(1, min(seq.max_new, self.context - len(seq.prompt)))
        seq.admitted_at = self.clock()
        self.waiting.append(seq)

    def cancel(self, key: Any) -> bool:
        for seq in [*self.waiting, *self._in_cache()]:
            if seq.key == key and seq.done is None:
                seq.done = "cancelled"
                return True
        return False

    @property
    def active(self) -> int:
        return len(self.waiting) + len(self._in_cache())

    # -- one step -----------------------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Admit, prefill the next chunks, run one decode step; returns the sequences that finished (or were
        dropped). With `overlap`, a step whose rows stay the same is launched before the previous one is read."""
        if self.cache is None:
            self.restore()
        finished, self._later = self._later, []
        ahead = self._ahead
        if ahead is not None:
            if self._steady(ahead):
                self._ahead = self._launch(ahead)
                done = self._collect(ahead)
                if done:   # the rows change: the step launched with them is read first
                    done += self.settle()
                    self._leave_all(done)
                return finished + done
            finished += self.settle()
        finished += self._reap()
        self._admit()
        if self.prefilling:
            self._prefill()
        if self.running:
            launched = self._launch(None)
            if self.overlap and self._steady(launched):
                self._ahead = launched
            else:
                done = self._collect(launched)
                self._leave_all(done)
                finished += done
        return finished

    def settle(self) -> list[Sequence]:
        """Read the step launched ahead, if any; the sequences it finished leave their rows and are returned."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return []
        done = self._collect(ahead)
        self._leave_all(done)
        return done

    def _steady(self, launched: Launched) -> bool:
        """Whether the next step runs over the same rows as `launched`: nothing to admit or prefill, no sequence
        finished or dropped (a caller gone or its deadline passed marks it cancelled here), the same graph."""
        if self.prefilling or self._admissible() or len(self.running) != len(launched.seqs):
            return False
        for seq in [*self.running, *self.waiting]:
            if seq.done is None and seq.alive is not None and not seq.alive():
                seq.done = "cancelled"
            if seq.done is not None:
                return False
        if launched.graph is not None and self.width_round:   # else the same rows keep the same graph
            sampling = any(s.temperature > 0 for s in self.running)
            if self._graph_key(len(self.running), [p + 1 for p in launched.positions], sampling) != launched.key:
                return False
        return True

    def _admissible(self) -> bool:
        """A waiting sequence would get a row now (a free one, or an urgent one preempting a background one)."""
        if not self.waiting:
            return False
        if len(self.running) + len(self.prefilling) < self.slots:
            return True
        return any(s.urgent for s in self.waiting) and any(not s.urgent for s in self.running)

    def _leave_all(self, done: list[Sequence]) -> None:
        for seq in done:
            if seq in self.running:
                self._leave(seq)

    def _reap(self) -> list[Sequence]:
        gone = []
        for seq in list(self.waiting):
            if seq.done is None and seq.alive is not None and not seq.alive():
                seq.done = "cancelled"
            if seq.done is not None:
                self.waiting.remove(seq)
                gone.append(seq)
        for seq in list(self.prefilling):
            if seq.done is None and seq.alive is not None and not seq.alive():
                seq.done = "cancelled"
            if seq.done is not None:
                self.prefilling.remove(seq)
                gone.append(seq)
        for seq in list(self.running):
            if seq.done is None and seq.alive is not None and not seq.alive():
                seq.done = "cancelled"
            if seq.done is not None:
                self._leave(seq)
                gone.append(seq)
        return gone

    def _leave(self, seq: Sequence) -> None:
        """Take a running sequence out; the last row moves into its place so the rows stay compact."""
        index = self.running.index(seq)
        last = self.running[-1]
        if last is not seq:
            assert self.cache is not None
            self.cache.move_row(last.row, index, last.cached)
            last.row = index
            self.running[index] = last
        self.running.pop()

    def _admit(self) -> None:
        """Every waiting sequence that has a free row starts prefilling, urgent ones first; when none is free an
        urgent one preempts the newest running background sequence (recomputed later from its context)."""
        while self.waiting:
            urgent = [s for s in self.waiting if s.urgent]
            seq = urgent[0] if urgent else self.waiting[0]
            if len(self.running) + len(self.prefilling) >= self.slots:
                background = [s for s in self.running if not s.urgent]
                if not (seq.urgent and background):
                    return          # the cache is full: it waits for a slot
                victim = max(background, key=lambda s: s.admitted_at or 0.0)   # the newest background one
                self._leave(victim)
                victim.cached, victim.row = 0, -1
                victim.preempted += 1
                self.counters["preempted"] += 1
                self.waiting.appendleft(victim)   # recomputed from its context when a slot frees
            self.waiting.remove(seq)
            taken = {s.row for s in self.prefilling}
            seq.row = next(r for r in range(len(self.running), self.slots) if r not in taken)
            seq.cached = 0
            self.prefilling.append(seq)
            if len(seq.context) <= 1:
                self._join(seq)

    def _join(self, seq: Sequence) -> None:
        """A prefilled sequence joins the running rows (compact: it takes row len(running), swapping with the
        prefilling sequence that holds that row, if any)."""
        assert self.cache is not None
        row = len(self.running)
        self.prefilling.remove(seq)
        if seq.row != row:
            holder = next((s for s in self.prefilling if s.row == row), None)
            if holder is None:
                self.cache.move_row(seq.row, row, seq.cached)
            else:
                self.cache.swap_rows(seq.row, row, seq.cached, holder.cached)
                holder.row = seq.row
            seq.row = row
        self.running.append(seq)

    def _prefill(self) -> None:
        """One forward pass over the next chunk of each prefilling sequence (urgent first, then in the order they
        came, while the padded tokens stay within `prefill_tokens`), writing the context (all but its last token)
        into each one's KV row; the sequences whose context is all written join the running batch."""
        assert self.cache is not None
        chosen: list[tuple[Sequence, int]] = []
        longest = 0
        for seq in sorted(self.prefilling, key=lambda s: not s.urgent):
            end = min(len(seq.context) - 1, seq.cached + self.prefill_chunk)
            if end <= seq.cached:
                continue
            if chosen and (len(chosen) + 1) * max(longest, end - seq.cached) > self.prefill_tokens:
                break
            chosen.append((seq, end))
            longest = max(longest, end - seq.cached)
        if chosen:
            ids = torch.zeros((len(chosen), longest), dtype=torch.long)
            positions = torch.full((len(chosen), longest), self.context, dtype=torch.long)
            for i, (seq, end) in enumerate(chosen):
                ids[i, :end - seq.cached] = torch.tensor(seq.context[seq.cached:end])
                positions[i, :end - seq.cached] = torch.arange(seq.cached, end)
            ids, positions = ids.to(self.device), positions.to(self.device)
            width = max(end for _, end in chosen)
            mask = (self._columns[None, None, :width] <= positions[:, :, None])[:, None]   # [k, 1, q, width]
            rows = torch.tensor([seq.row for seq, _ in chosen], device=self.device)
            self.cache.for_prefill(rows, positions, width)
            with torch.inference_mode():
                self._forward(ids, positions, mask)
            for seq, end in chosen:
                self.counters["prefill_tokens"] += end - seq.cached
                seq.cached = end
        for seq in sorted(self.prefilling, key=lambda s: s.row):
            if seq.cached >= len(seq.context) - 1:
                self._join(seq)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.forward(ids, positions, mask, self.cache)
        kwargs: dict[str, Any] = {
            "input_ids": ids, "position_ids": positions, "use_cache": True, self._cache_kw: self.cache,
            "attention_mask": {kind: mask for kind in self.layer_types},
        }
        if self._takes_cache_position:
            kwargs["cache_position"] = positions[0]
        return self.base(**kwargs).last_hidden_state

    def _step_logits(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, width: int
                     ) -> torch.Tensor:
        assert self.cache is not None
        mask = None
        if self.decoder is None or self.decoder.split is None:   # the split kernels read the positions themselves
            mask = (self._columns[None, :width] <= positions[:, None])[:, None, None, :]   # [b, 1, 1, width]
        self.cache.for_decode(rows, positions, width)
        hidden = self._forward(ids[:, None], positions[:, None], mask)
        return self.head(hidden[:, -1]).float()

    def _graph_key(self, n: int, positions: list[int], sampling: bool) -> tuple[int, bool, int]:
        bucket = next((b for b in GRAPH_BUCKETS if b >= n and b <= self.slots), self.slots)
        width = self.context + 1
        if self.width_round:
            width = min(width, -(-(max(positions) + 1) // self.width_round) * self.width_round)
        return bucket, sampling, width

    def _launch(self, previous: Launched | None) -> Launched:
        """Launch a decode step over the running rows: from the host's tokens, or chained on `previous` (the same
        rows; its tokens, still on the device, are the inputs); the new tokens start their copy to the host."""
        seqs = list(self.running)
        n = len(seqs)
        if previous is None:
            positions = [len(s.context) - 1 for s in seqs]
        else:
            positions = [p + 1 for p in previous.positions]
        temps = [s.temperature for s in seqs]
        sampling = any(t > 0 for t in temps)
        graph, key, pos = None, None, None
        with torch.inference_mode():
            if self.graphs_on:
                key = self._graph_key(n, positions, sampling)
                graph = self._graph(*key)
                if previous is not None:
                    graph.advance(n)
                else:
                    pad = key[0] - n
                    graph.run([s.context[-1] for s in seqs] + [0] * pad, positions + [self.context] * pad,
                              temps + [0.0] * pad, [s.top_p for s in seqs] + [1.0] * pad)
                out = graph.out
            else:
                if previous is not None:
                    ids, pos = previous.out[:n], previous.pos + 1
                else:
                    ids = torch.tensor([s.context[-1] for s in seqs], device=self.device)
                    pos = torch.tensor(positions, device=self.device)
                width = self.context + 1 if self.full_width else max(positions) + 1
                logits = self._step_logits(ids, pos, self._rows[:n], width)
                t = torch.tensor(temps, device=self.device)
                p = torch.tensor([s.top_p for s in seqs], device=self.device)
                out = sample(logits, t, p) if sampling else logits.argmax(-1)
            host, ready = self._to_host(out[:n])
        self.counters["steps"] += 1
        self.counters["chained"] += previous is not None
        return Launched(seqs, positions, out, pos, graph, key, host, ready)

    def _to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start the tokens' copy to the host: into one of two pinned buffers (one step may be in flight while the
        previous one is read), with an event to wait on; on the CPU a copy."""
        if self.device.type != "cuda":
            return tokens.clone(), None
        if not self._host_tokens:
            self._host_tokens = [torch.empty(self.slots, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._flip ^= 1
        host = self._host_tokens[self._flip][:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return host, ready

    def _collect(self, launched: Launched) -> list[Sequence]:
        """Read a launched step's tokens and take them into their sequences (not into one that finished or was
        dropped since the launch); returns the sequences that finished now."""
        waited = time.perf_counter()
        if launched.ready is not None:
            launched.ready.synchronize()
        new = launched.host.tolist()
        self.counters["wait_ms"] += (time.perf_counter() - waited) * 1000.0   # the host waiting for the card
        now = self.clock()
        finished = []
        for seq, token in zip(launched.seqs, new):
            if seq.done is not None:
                continue
            self.counters["tokens"] += 1
            seq.cached = len(seq.context)
            self._accept(seq, int(token), now)
            if seq.done is not None:
                finished.append(seq)
        return finished

    def capture_graphs(self) -> int:
        """Capture the greedy step's graph for every batch bucket now (at load: ~0.1 s each on an H200), so the
        first questions that decode together do not stop the card for one capture per bucket as they join
        (1 -> 2 -> 4 -> 8 -> 16 rows). Returns how many were captured; where a capture fails, the graphs are
        captured on first use as before."""
        if not self.graphs_on or self.cache is None:
            return 0
        keys = sorted({self._graph_key(n, [self.context - 1], False) for n in range(1, self.slots + 1)})
        before = len(self._graphs)
        try:
            with torch.inference_mode():
                for key in keys:
                    self._graph(*key)
        except Exception as exc:  # noqa: BLE001 - first use captures them instead
            log.warning("capturing the decode graphs at load failed (%s); they are captured on first use", exc)
            for key in keys:
                self._graphs.pop(key, None)
            return 0
        return len(self._graphs) - before

    def _graph(self, bucket: int, sampling: bool, width: int) -> StepGraph:
        key = (bucket, sampling, width)
        graph = self._graphs.get(key)
        if graph is None:
            t0 = time.perf_counter()
            graph = StepGraph(self, bucket, sampling, width)
            self._graphs[key] = graph
            self.counters["graph_captures"] += 1
            self.counters["capture_ms"] += (time.perf_counter() - t0) * 1000.0
        return graph

    # -- tokens to text ---------------------------------------------------------------------------------------------
    def _accept(self, seq: Sequence, token: int, now: float) -> None:
        if token in self.eos:
            seq.done = "eos"
        else:
            seq.generated.append(token)
            self._detokenize(seq)
            if seq.stops and any(stop in seq.text for stop in seq.stops):
                seq.done = "stop"
            elif len(seq.generated) >= seq.max_new or len(seq.context) >= self.context:
                seq.done = "length"
        if seq.done is not None:
            # the whole text decoded at once, as `generate`'s callers decode it (a character cut in the middle of
            # its bytes shows as the replacement character); it extends what was streamed
            whole = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
            if whole.startswith(seq.text[:seq.sent]):
                seq.text = whole
        self._stream(seq, final=seq.done is not None, now=now)

    def _detokenize(self, seq: Sequence) -> None:
        decode = self.tokenizer.decode
        before = decode(seq.generated[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
        after = decode(seq.generated[seq.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            seq.text += after[len(before):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.generated)

    def _stream(self, seq: Sequence, final: bool, now: float) -> None:
        """Send what of the answer can no longer change: not the part that may begin a stop string, not
        trailing whitespace (the final answer is stripped); everything at the end."""
        if seq.start is None:
            stripped = seq.text.lstrip()
            if not stripped:
                return
            seq.start = seq.sent = len(seq.text) - len(stripped)
        if final:
            end = seq.start + len(seq.answer)
        else:
            visible = cut_at_stop(seq.text, seq.stops)
            end = len(visible.rstrip())
            if seq.stops:
                end = min(end, len(visible) - (max(len(s) for s in seq.stops) - 1))
        if end > seq.sent:
            piece = seq.text[seq.sent:end]
            seq.sent = end
            if seq.first_token_at is None:
                seq.first_token_at = now
            if seq.on_piece is not None:
                try:
                    seq.on_piece(piece)
                except Exception:   # a stream that cannot be written must not stop the decode
                    log.exception("streaming a piece of %s failed", seq.key)
