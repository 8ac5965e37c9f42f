"""Torch backend: transformers models from local directories, offline.

embed    mean / last-token / CLS pooling, L2-normalised, optional Matryoshka truncation (Qwen3-Embedding: last)
rerank   Qwen3-Reranker: p(yes) from the last-token logits of "yes" and "no" under its prompt template;
         or a sequence-classification cross-encoder
generate causal LM, greedy or sampled, max_new_tokens, stop strings
Batches are padded on the left for the causal models, with position ids from the attention mask, so a batch of
mixed lengths gives what each input gives alone. Embed and rerank batches of decoder models run packed on CUDA
(`workers.backends.packed`: one padding-free forward pass per batch, variable-length attention); otherwise as
length-sorted forward passes (`scheduler.batching.length_groups`), so a batch of mixed lengths is not padded to its
longest item.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from ragq.core.errors import DeviceOutOfMemory, ModelLoadFailed
from scheduler.batching import PassCostModel, length_groups
from workers.backends import BatchOutput, ModelBase
from workers.backends.packed import Packed
from workers.backends.tokens import Encoded
from workers.models import ModelSpec, dtype_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from workers.backends.quantize import Leaf, leaves_bytes, tensor_leaves  # noqa: E402

hf_logging.disable_progress_bar()

log = logging.getLogger(__name__)

QWEN3_RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def _dtype(spec: ModelSpec, device: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name(spec, device)]
    except KeyError:
        raise ModelLoadFailed(f"model {spec.name}: dtype {spec.dtype!r} is not float32, bfloat16 or float16") from None


def _check_dir(spec: ModelSpec) -> Path:
    path = spec.path
    if not path.is_dir():
        raise ModelLoadFailed(f"model {spec.name}: directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadFailed(f"model {spec.name}: {path} has no config.json")
    return path


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's weights as stored (8-bit where quantized)."""
    return leaves_bytes(module)


def _left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


_HOST_ALIGN = 256  # bytes: every tensor's view in the host buffer starts aligned for any dtype


def _pinned_buffer(nbytes: int) -> tuple[torch.Tensor, bool]:
    """`nbytes` of page-locked host memory: an ordinary allocation registered with CUDA (exact size), or, where
    registering fails, the caching host allocator's (rounded up to a power of two)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    try:
        error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        if int(error) == 0:
            return buffer, True
        log.warning("cudaHostRegister of %d bytes failed (%s); using the caching host allocator", nbytes, error)
    except Exception as exc:  # noqa: BLE001 - an older or stub runtime: fall back, never fail the sleep
        log.warning("cudaHostRegister is unavailable (%s); using the caching host allocator", exc)
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), False


class _CudaReady:
    """An asynchronous wake in flight: `wait` makes the device's current stream wait for it (no CPU stall)."""

    def __init__(self, event: torch.cuda.Event, device: torch.device) -> None:
        self.event = event
        self.device = device

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)


class _TorchModel(ModelBase):
    """Weights on the device; `sleep` keeps them in pinned host memory, `wake` copies them back."""

    def __init__(self, spec: ModelSpec, device: str, model: torch.nn.Module, tokenizer: Any) -> None:
        self.spec = spec
        self.name = spec.name
        self.device = torch.device(device)
        self.model = model
        self.tokenizer = tokenizer
        self.nbytes = module_bytes(model)
        # set by _launch inside a batch: the times, events and token counts its phases are made of (BatchOutput)
        self._mark: tuple[float, float, Any, Any, int, int, int] | None = None
        self.pass_costs = PassCostModel()
        self.packed = False   # one padding-free forward pass per batch (enable_packing said yes at load)
        self._host: list[torch.Tensor] | None = None   # per leaf (`_leaves`), in pinned host memory
        self._host_buffer: torch.Tensor | None = None
        self._registered = False
        self._host_lock = threading.Lock()
        self._side_stream: torch.cuda.Stream | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def _leaves(self) -> list[Leaf]:
        """The plain tensors the weights are made of (a quantized weight's 8-bit data and scales), in a fixed order:
        what sleep, wake and the host copy move."""
        return tensor_leaves(self.model)

    def execute(self, items: list[Any], params: dict[str, Any]) -> BatchOutput:
        self._mark = None
        if not self.is_cuda:
            t_start = time.perf_counter()
            outputs = self._run(items, params)
            return BatchOutput(outputs, phases=self._phases(t_start, time.perf_counter()))
        t_start = time.perf_counter()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        retries = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            outputs = self._run(items, params)
        except torch.cuda.OutOfMemoryError as exc:
            raise DeviceOutOfMemory(f"{self.name}: batch of {len(items)}: {str(exc).splitlines()[0]}") from None
        end.record(stream)
        end.synchronize()  # the outputs are on the host already; this returns at once
        phases = self._phases(t_start, time.perf_counter())
        # allocations that had to free cached blocks first (each a device synchronisation): churn near the budget
        return BatchOutput(
            outputs, device_ms=start.elapsed_time(end),
            peak_bytes=int(torch.cuda.max_memory_allocated(self.device) - before),
            alloc_retries=torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0) - retries, phases=phases)

    def _run(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    def _phases(self, t_start: float, t_end: float) -> dict[str, float]:
        if self._mark is None:
            return {}
        t0, t1, e0, e1, real, padded, passes = self._mark
        phases = {"prep": (t0 - t_start) * 1000.0, "launch": (t1 - t0) * 1000.0, "tail": (t_end - t1) * 1000.0,
                  "real_tokens": float(real), "padded_tokens": float(padded), "passes": float(passes)}
        if e0 is not None:
            phases["passes_gpu"] = e0.elapsed_time(e1)
        self.pass_costs.observe(padded, passes, phases.get("passes_gpu", phases["launch"] + phases["tail"]))
        return phases

    def pad(self, rows: list[dict[str, list[int]]], side: str) -> dict[str, torch.Tensor]:
        """What tokenizer.pad(rows, padding=True, return_tensors="pt") gives, several times faster (it pads row by
        row in Python; this fills one array per key): the batch's longest row sets the width."""
        import numpy as np

        width = max(len(row["input_ids"]) for row in rows)
        fills = {"input_ids": self.tokenizer.pad_token_id,
                 "token_type_ids": getattr(self.tokenizer, "pad_token_type_id", 0) or 0}
        out = {}
        for key in rows[0]:
            array = np.full((len(rows), width), fills.get(key, 0), dtype=np.int64)
            for i, row in enumerate(rows):
                values = row[key]
                if side == "left":
                    array[i, width - len(values):] = values
                else:
                    array[i, :len(values)] = values
            out[key] = torch.from_numpy(array)
        return out

    def pass_overhead_tokens(self) -> int:
        """The fixed cost of one more forward pass, in tokens: measured once enough batches ran (unless the spec
        turns that off), else the spec's value."""
        fitted = self.pass_costs.overhead_tokens() if self.spec.fit_pass_overhead else None
        return self.spec.pass_overhead_tokens if fitted is None else fitted

    def _passes(self, rows: list[dict[str, list[int]]], forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                padding_side: str | None = None) -> torch.Tensor:
        """`forward` over unpadded rows in length-sorted passes (each padded to its own longest row), launched
        back to back with no synchronisation between them; one output row per input row, in input order."""
        lengths = [len(row["input_ids"]) for row in rows]
        groups = length_groups(lengths, self.pass_overhead_tokens())
        padded = [self.pad([rows[i] for i in group], padding_side or self.tokenizer.padding_side) for group in groups]
        parts = self._launch(
            lambda: [forward({k: v.to(self.device, non_blocking=True) for k, v in batch.items()}) for batch in padded],
            sum(lengths), sum(len(g) * max(lengths[i] for i in g) for g in groups), len(groups))
        order = [i for group in groups for i in group]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return out[inverse.to(out.device)]

    def _packed(self, ids: list[list[int]], forward: Callable[[Packed, dict[str, Any]], torch.Tensor]
                ) -> torch.Tensor:
        """`forward` over the rows' token ids packed into one padding-free pass; one output row per input row."""
        packed = Packed(ids)
        return self._launch(lambda: forward(packed, packed.forward_kwargs(self.device)), packed.tokens,
                            packed.tokens, 1)

    def _launch(self, queue: Callable[[], Any], real: int, padded: int, passes: int) -> Any:
        """Run `queue` (which queues the forward passes) between two CUDA events, and mark the batch's phases."""
        t0 = time.perf_counter()
        e0 = e1 = None
        if self.is_cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(torch.cuda.current_stream(self.device))
        out = queue()
        if e1 is not None:
            e1.record(torch.cuda.current_stream(self.device))
        self._mark = (t0, time.perf_counter(), e0, e1, real, padded, passes)
        return out

    def _last_tokens(self, packed: Packed, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's last token's hidden state from a packed pass's (1, tokens, hidden)."""
        return hidden[0].index_select(0, packed.last.to(hidden.device, non_blocking=True))

    def prepare_host_copy(self) -> None:
        """Make the pinned host copy that `sleep` switches to, ahead of time (the engine calls this from its loader
        thread after a load): pinning gigabytes of host memory takes seconds, which a sleep must not spend while
        urgent work waits. One exactly-sized buffer, registered with CUDA (the caching host allocator would round
        each block up to a power of two); the weights are read on a side stream while the model keeps serving."""
        if not self.is_cuda:
            return
        with self._host_lock:
            if self._host is not None or self.model is None:
                return
            tensors = [leaf.get() for leaf in self._leaves()]
            offsets, total = [], 0
            for tensor in tensors:
                offsets.append(total)
                total += -(-tensor.numel() * tensor.element_size() // _HOST_ALIGN) * _HOST_ALIGN
            buffer, self._registered = _pinned_buffer(total)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            host = []
            with torch.cuda.stream(stream):
                for tensor, offset in zip(tensors, offsets):
                    nbytes = tensor.numel() * tensor.element_size()
                    view = buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
                    view.copy_(tensor, non_blocking=True)
                    host.append(view)
            stream.synchronize()
            self._host_buffer, self._host = buffer, host

    def sleep(self) -> None:
        """Device -> pinned host RAM: switch to the host copy (made once, ahead of time if the engine asked; the
        weights never change here). No synchronisation needed: freed device blocks are reused only by work queued
        after the kernels still reading them."""
        if not self.is_cuda:
            return
        self.prepare_host_copy()  # at once if the copy exists; waits for one being made
        assert self._host is not None
        for leaf, host in zip(self._leaves(), self._host):
            leaf.set(host)

    def wake(self, asynchronous: bool = False) -> _CudaReady | None:
        """Pinned host RAM -> device: one copy per tensor, on a side stream when asynchronous."""
        if not self.is_cuda or self._host is None:
            return None
        leaves = list(zip(self._leaves(), self._host))
        stream = self._wake_stream(asynchronous)
        try:
            with torch.cuda.stream(stream):
                for leaf, host in leaves:
                    leaf.set(host.to(self.device, non_blocking=True))
        except BaseException:   # out of memory part way: back to the host copy, no device memory left held unseen
            stream.synchronize()   # the copies already queued finish before their blocks can be reused
            for leaf, host in leaves:
                leaf.set(host)
            raise
        if asynchronous:
            for leaf, _ in leaves:  # the default stream uses them: don't recycle their memory before it is done
                leaf.get().record_stream(torch.cuda.current_stream(self.device))
        return self._wake_done(stream, asynchronous)

    def _wake_stream(self, asynchronous: bool) -> torch.cuda.Stream:
        """Where a wake's copies go: a side stream (after the device's current work) when asynchronous, so other
        work runs beside them; else the current stream."""
        current = torch.cuda.current_stream(self.device)
        if not asynchronous:
            return current
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        self._side_stream.wait_stream(current)
        return self._side_stream

    def _wake_done(self, stream: torch.cuda.Stream, asynchronous: bool) -> _CudaReady | None:
        """The asynchronous wake's handle (its users' stream waits on it), or, synchronous, the copies finished."""
        if asynchronous:
            event = torch.cuda.Event()
            event.record(stream)
            return _CudaReady(event, self.device)
        stream.synchronize()
        return None

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._host or []))

    def count_tokens(self, items: list[Any]) -> list[int]:
        texts = [item if isinstance(item, str) else " ".join(item) for item in items]
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.spec.max_length)
        return [len(ids) for ids in encoded["input_ids"]]

    def unload(self) -> None:
        import gc

        with self._host_lock:
            self.model = None  # type: ignore[assignment]
            self._host = None
            gc.collect()
            if self.is_cuda:
                torch.cuda.synchronize(self.device)  # no copy may still read the host buffer
                torch.cuda.empty_cache()
            if self._host_buffer is not None and self._registered:
                torch.cuda.cudart().cudaHostUnregister(self._host_buffer.data_ptr())
            self._host_buffer = None


class TorchEmbedder(_TorchModel):
    def _run(self, items: list[Any], params: dict[str, Any]) -> list[list[float]]:
        prefix = self.spec.query_prefix if params.get("kind") == "query" else self.spec.document_prefix
        rows: list[dict[str, list[int]]] = [{} for _ in items]
        texts = [i for i, item in enumerate(items) if not isinstance(item, Encoded)]
        if texts:   # not tokenised by the submitter (an in-process engine, a direct call): here
            encoded = self.tokenizer([prefix + str(items[i]) for i in texts], truncation=True,
                                     max_length=self.spec.max_length)
            for j, i in enumerate(texts):
                rows[i] = {key: encoded[key][j] for key in encoded.keys()}
        if self.packed:   # token ids are all a packed pass needs
            ids = [item.ids if isinstance(item, Encoded) else rows[i]["input_ids"] for i, item in enumerate(items)]
            with torch.inference_mode():
                return self._packed(ids, self._pool_packed).cpu().tolist()
        names = set(self.tokenizer.model_input_names)
        for i, item in enumerate(items):
            if isinstance(item, Encoded):
                rows[i] = {"input_ids": item.ids, "attention_mask": [1] * len(item.ids)}
                if "token_type_ids" in names:
                    rows[i]["token_type_ids"] = [0] * len(item.ids)
        with torch.inference_mode():
            pooled = self._passes(rows, self._pool)
        return pooled.cpu().tolist()

    def _pool_packed(self, packed: Packed, kwargs: dict[str, Any]) -> torch.Tensor:
        hidden = self.model(**kwargs).last_hidden_state
        if self.spec.pooling == "mean":
            rows = torch.repeat_interleave(torch.arange(len(packed.lengths)), torch.from_numpy(packed.lengths))
            sums = torch.zeros(len(packed.lengths), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
            sums.index_add_(0, rows.to(hidden.device, non_blocking=True), hidden[0].float())
            pooled = sums / torch.from_numpy(packed.lengths).to(hidden.device, torch.float32).unsqueeze(1)
        elif self.spec.pooling == "cls":
            starts = packed.cu[:-1].long()
            pooled = hidden[0].index_select(0, starts.to(hidden.device, non_blocking=True))
        else:
            pooled = self._last_tokens(packed, hidden)
        return self._finish_pool(pooled)

    def _pool(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        if self.spec.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        elif self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # last token: the last real token of each row, whichever side the padding is on
            if self.tokenizer.padding_side == "left":
                pooled = hidden[:, -1]
            else:
                last = mask.sum(1) - 1
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self._finish_pool(pooled)

    def _finish_pool(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.spec.dim:
            pooled = pooled[:, : self.spec.dim]
        return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)

    @property
    def dim(self) -> int:
        hidden = int(self.model.config.hidden_size)
        return min(hidden, self.spec.dim) if self.spec.dim else hidden


class TorchQwen3Reranker(_TorchModel):
    """p(yes) of the Qwen3-Reranker prompt; items are (query, document) pairs."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        tok = self.tokenizer
        self.prefix_ids = tok.encode(QWEN3_RERANK_PREFIX, add_special_tokens=False)
        self.suffix_ids = tok.encode(QWEN3_RERANK_SUFFIX, add_special_tokens=False)
        self.yes_id = tok.convert_tokens_to_ids("yes")
        self.no_id = tok.convert_tokens_to_ids("no")
        if self.yes_id is None or self.no_id is None or self.yes_id == tok.unk_token_id:
            raise ModelLoadFailed(f"model {self.name}: tokenizer has no single 'yes'/'no' tokens for reranking")

    def _encode(self, items: list[tuple[str, str]], instruction: str) -> list[dict[str, list[int]]]:
        room = max(8, self.spec.max_length - len(self.prefix_ids) - len(self.suffix_ids))
        rows = []
        for query, document in items:
            content = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
            ids = self.tokenizer.encode(content, add_special_tokens=False, truncation=True, max_length=room)
            full = self.prefix_ids + ids + self.suffix_ids
            rows.append({"input_ids": full, "attention_mask": [1] * len(full)})
        return rows

    def _score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            position_ids=_left_padded_positions(batch["attention_mask"]), logits_to_keep=1,
        )
        last = out.logits[:, -1, :].float()
        pair = torch.stack([last[:, self.no_id], last[:, self.yes_id]], dim=1)
        return torch.log_softmax(pair, dim=1)[:, 1].exp()

    def _score_packed(self, packed: Packed, kwargs: dict[str, Any]) -> torch.Tensor:
        """The same p(yes), from the "no" and "yes" rows of the output head applied to each row's last token only."""
        last = self._last_tokens(packed, self.model.base_model(**kwargs).last_hidden_state)
        head = self.model.get_output_embeddings()
        ids = torch.tensor([self.no_id, self.yes_id], device=last.device)
        bias = head.bias.index_select(0, ids) if getattr(head, "bias", None) is not None else None
        pair = torch.nn.functional.linear(last, head.weight.index_select(0, ids), bias).float()
        return torch.log_softmax(pair, dim=1)[:, 1].exp()

    def _run(self, items: list[Any], params: dict[str, Any]) -> list[float]:
        rows = self._encode([tuple(item) for item in items], params.get("instruction") or self.spec.instruction)
        with torch.inference_mode():
            if self.packed:
                scores = self._packed([row["input_ids"] for row in rows], self._score_packed)
            else:
                scores = self._passes(rows, self._score, padding_side="left")
        return scores.cpu().tolist()

    def count_tokens(self, items: list[Any]) -> list[int]:
        extra = len(self.prefix_ids) + len(self.suffix_ids)
        return [n + extra for n in super().count_tokens([f"{q}\n{d}" for q, d in items])]


class TorchCrossEncoder(_TorchModel):
    def _run(self, items: list[Any], params: dict[str, Any]) -> list[float]:
        encoded = self.tokenizer([q for q, _ in items], [d for _, d in items], truncation=True,
                                 max_length=self.spec.max_length)
        rows = [{key: encoded[key][i] for key in encoded.keys()} for i in range(len(items))]
        with torch.inference_mode():
            scores = self._passes(rows, self._score)
        return scores.cpu().tolist()

    def _score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(**batch).logits.float()
        return logits[:, 0].sigmoid() if logits.shape[1] == 1 else logits.softmax(-1)[:, 1]
