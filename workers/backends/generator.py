"""The torch generator: a causal LM answering prompts through the decode loop (`workers.backends.decode`).

Items are prompts; each is put in the model's chat template (thinking off unless the models file says
`thinking = true`, so that max_new_tokens go to the answer) unless the caller templated it already. With the decode
loop (`decode = "auto"`, the default, for full-attention models) the engine feeds requests in as they come
(`start_sequence` / `decode_step`) and sequences share decode steps; `execute` runs a batch to the end through the
same loop. `decode = "off"` answers batches with transformers' `generate`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ragq.core.errors import DeviceOutOfMemory
from workers.backends.decode import DecodeLoop, Sequence, cut_at_stop
from workers.backends.decoder import pack_projections
from workers.backends.fastpaths import fuse_norms
from workers.backends.torch_backend import _TorchModel
from workers.models import GENERATOR_CHOICES, decode_slots

log = logging.getLogger(__name__)


class TorchGenerator(_TorchModel):
    loop: DecodeLoop | None = None

    def setup_decode(self) -> None:
        """Build the decode loop and allocate its KV cache now, so the cache counts in the measured footprint."""
        spec = self.spec
        mode = str(spec.extra.get("decode", "auto"))
        if mode == "off":
            return
        slots = decode_slots(spec, self.device.type)
        graphs = str(spec.extra.get("graphs", os.environ.get("RAGQ_CUDA_GRAPHS", "auto"))) != "off"
        try:
            loop = DecodeLoop(
                self.model, self.tokenizer, slots=slots, context=spec.max_length + spec.max_new_tokens,
                device=self.device, graphs=graphs, prefill_chunk=int(spec.extra.get("prefill_chunk", 512)),
                prefill_tokens=int(spec.extra.get("prefill_tokens", 2048)),
                eos_ids=self._eos_ids(), own_decoder=str(spec.extra.get("decoder", "auto")) != "off")
        except ValueError as exc:
            log.info("%s answers with transformers' generate: %s", spec.name, exc)
            return
        overlap = str(spec.extra.get("overlap", "auto"))   # auto: where graphs run (the host's work hides there)
        if overlap != "auto":
            loop.overlap = overlap == "on"
        if str(spec.extra.get("fused_norms", "on")) != "off":
            fuse_norms(self.model)
        if loop.decoder is not None:
            packed = pack_projections(self.model)   # before the move to the fixed-address range, which keeps the order
            compiled = self._compile_decoder(loop)
            attention = self._decode_attention(loop)
            log.info("%s runs ragq's decoder: %d projection groups side by side, elementwise parts %s, decode "
                     "attention %s", spec.name, packed, compiled, attention)
        else:
            log.info("%s runs transformers' modules in the decode loop: %s", spec.name, loop.why_not_decoder)
        self.stable: Any = None
        if self.is_cuda and str(spec.extra.get("keep_addresses", "auto")) != "off":
            self._move_to_stable_range(loop)
        loop.allocate(self._carve if self.stable is not None else None)
        self.loop = loop
        self.nbytes += loop.kv_bytes
        captured = loop.capture_graphs() if str(spec.extra.get("capture_at_load", "on")) != "off" else 0
        log.info("%s decodes continuously on %s: %d slots x %d tokens, KV cache %.2f GiB, graphs %s%s", spec.name,
                 self.device, slots, loop.context, loop.kv_bytes / 2**30, "on" if loop.graphs_on else "off",
                 f" ({captured} batch sizes captured in {loop.counters['capture_ms']:.0f} ms)" if captured else "")

    def _compile_decoder(self, loop: DecodeLoop) -> str:
        """`compile = "auto"` (the default) compiles the decoder's elementwise parts on a CUDA card, where they are
        a third of a one-row step; "on" compiles on the CPU too (needs a C++ compiler), "off" runs them eager."""
        assert loop.decoder is not None
        mode = str(self.spec.extra.get("compile", "auto"))
        if mode not in GENERATOR_CHOICES["compile"]:
            raise ValueError(f"model {self.name}: compile must be auto, on or off, not {mode!r}")
        if mode == "off" or (mode == "auto" and not self.is_cuda):
            return "eager"
        try:
            loop.decoder.compile()
            seconds = loop.decoder.warm(self.device)
        except Exception as exc:  # noqa: BLE001 - inductor missing a compiler or Triton: the eager parts still work
            if mode == "on":
                raise
            loop.decoder.eager()
            log.warning("%s: torch.compile of the decoder failed, its parts run eager: %s", self.name,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return "eager (compile failed)"
        return f"compiled in {seconds:.1f} s"

    def _decode_attention(self, loop: DecodeLoop) -> str:
        """`attention = "auto"` (the default) runs decode steps' attention through the split kernels where Triton
        runs them (a CUDA card), else SDPA; "split" requires the kernels (on the CPU: under TRITON_INTERPRET=1,
        as the tests run them), "sdpa" keeps torch's SDPA."""
        from workers.backends.split_attention import warm, why_not_available

        assert loop.decoder is not None
        mode = str(self.spec.extra.get("attention", "auto"))
        if mode not in GENERATOR_CHOICES["attention"]:
            raise ValueError(f"model {self.name}: attention must be auto, split or sdpa, not {mode!r}")
        why_not = why_not_available(self.device) if mode != "sdpa" else "sdpa chosen"
        if why_not is None:
            loop.decoder.use_split_attention()
            decoder = loop.decoder
            seconds = warm(decoder.heads, decoder.kv_heads, decoder.head_dim, loop.context, loop.dtype, self.device)
            return f"split along the keys (Triton, ready in {seconds:.1f} s)"
        if mode == "split":
            raise ValueError(f"model {self.name}: attention = \"split\" cannot run here: {why_not}")
        return f"SDPA ({why_not})"

    def _move_to_stable_range(self, loop: DecodeLoop) -> None:
        """Weights and KV cache into one device range whose addresses outlive a sleep, so the decode graphs need
        no recapture after a wake (workers/backends/vmm.py)."""
        from workers.backends import vmm

        why_not = vmm.available()
        if why_not is not None:
            log.info("%s: its graphs are captured again after each wake: %s", self.name, why_not)
            return
        leaves = self._leaves()
        tensors = [leaf.get() for leaf in leaves]
        shapes = [(tuple(t.shape), t.dtype) for t in tensors] + loop.kv_shapes()
        try:
            stable = vmm.StableRange(vmm.Carver.size_of(shapes), self.device)
        except Exception as exc:  # noqa: BLE001 - the ordinary path still works
            log.warning("%s: no stable device range (%s); graphs are captured again after each wake", self.name, exc)
            return
        self._carver = vmm.Carver(stable)
        for leaf, tensor in zip(leaves, tensors):
            placed = self._carver.take(tuple(tensor.shape), tensor.dtype)
            placed.copy_(tensor)
            leaf.set(placed)
        del tensors
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.stable = stable

    def _carve(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._carver.take(shape, dtype).zero_()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    @property
    def continuous(self) -> bool:
        return self.loop is not None

    # -- prompts ----------------------------------------------------------------------------------------------------
    def _prompt(self, text: str, templated: bool) -> str:
        if templated or not getattr(self.tokenizer, "chat_template", None):
            return text
        return str(self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
            enable_thinking=bool(self.spec.extra.get("thinking", False)),
        ))

    def encode_prompt(self, text: str, params: dict[str, Any]) -> list[int]:
        prompt = self._prompt(text, bool(params.get("templated")))
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(ids[-self.spec.max_length:])

    # -- the decode loop (the engine's thread) ------------------------------------------------------------------------
    def start_sequence(self, key: Any, text: str, params: dict[str, Any], *, urgent: bool = False,
                       on_piece: Any = None, alive: Any = None) -> Sequence:
        assert self.loop is not None
        sample = bool(params.get("sample"))
        seq = Sequence(
            key=key, prompt=self.encode_prompt(text, params),
            max_new=int(params.get("max_new_tokens") or self.spec.max_new_tokens),
            stops=tuple(params.get("stop") or self.spec.stop),
            temperature=float(params.get("temperature", 0.7)) if sample else 0.0,
            top_p=float(params.get("top_p", 0.9)) if sample else 1.0,
            urgent=urgent, on_piece=on_piece, alive=alive)
        self.loop.add(seq)
        return seq

    def decode_step(self) -> list[Sequence]:
        assert self.loop is not None
        try:
            return self.loop.step()
        except torch.cuda.OutOfMemoryError as exc:
            raise DeviceOutOfMemory(f"{self.name}: decode step: {str(exc).splitlines()[0]}") from None

    def settle_decode(self) -> list[Sequence]:
        """Read the decode step still in flight (the engine does before it gives the device to other work)."""
        assert self.loop is not None
        return self.loop.settle()

    def _run(self, items: list[str], params: dict[str, Any]) -> list[str]:
        if self.loop is None:
            return self._generate(items, params)
        sequences = [self.start_sequence(("batch", i), text, params) for i, text in enumerate(items)]
        while any(s.done is None for s in sequences):
            self.decode_step()
        return [s.answer for s in sequences]

    # -- sleep and wake carry the sequences in flight ------------------------------------------------------------------
    def sleep(self) -> None:
        if getattr(self, "stable", None) is not None:
            self.prepare_host_copy()          # the weights' pinned copy (made once; they never change)
            assert self.loop is not None
            self.loop.release(keep=True)      # the KV rows in use to the host; cache and graphs stay
            torch.cuda.synchronize(self.device)
            self.stable.release()             # the physical memory goes; the addresses stay reserved
            return
        if self.loop is not None:
            self.loop.release()
        super().sleep()

    def wake(self, asynchronous: bool = False) -> Any:
        if getattr(self, "stable", None) is not None:
            self.stable.remap()
            assert self._host is not None and self.loop is not None
            stream = self._wake_stream(asynchronous)   # a prewarm: beside the device's other work
            with torch.cuda.stream(stream):
                for leaf, host in zip(self._leaves(), self._host):   # the same addresses: the graphs still hold
                    leaf.get().copy_(host, non_blocking=True)
                self.loop.restore()
            return self._wake_done(stream, asynchronous)
        ready = super().wake(asynchronous)
        if self.loop is not None:
            self.loop.restore()
        return ready

    def unload(self) -> None:
        self.loop = None
        stable, self.stable = getattr(self, "stable", None), None
        super().unload()
        if stable is not None:
            torch.cuda.synchronize(self.device)
            stable.close()

    # -- transformers' generate (decode = "off", and the reference in tests) ----------------------------------------------
    def _generate(self, items: list[str], params: dict[str, Any]) -> list[str]:
        max_new = int(params.get("max_new_tokens") or self.spec.max_new_tokens)
        stops = list(params.get("stop") or self.spec.stop)
        prompts = [self._prompt(text, bool(params.get("templated"))) for text in items]
        batch = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.spec.max_length, return_tensors="pt",
            padding_side="left", add_special_tokens=False,
        ).to(self.device)
        sample = bool(params.get("sample"))
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": sample, "pad_token_id": self._pad_id()}
        if sample:
            kwargs.update(temperature=float(params.get("temperature", 0.7)), top_p=float(params.get("top_p", 0.9)))
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [cut_at_stop(text, tuple(stops)).strip() for text in texts]

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def generate_ids(self, items: list[str], max_new_tokens: int) -> list[list[int]]:
        """transformers' greedy new token ids per prompt (stopped at eos): the reference the loop is tested on."""
        batch = self.tokenizer(items, padding=True, return_tensors="pt", padding_side="left",
                               add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self._pad_id(), temperature=None, top_p=None, top_k=None)
        eos = self._eos_ids()
        result = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            kept = []
            for token in row:
                if token in eos:
                    break
                kept.append(token)
            result.append(kept)
        return result

    def loop_ids(self, items: list[str], max_new_tokens: int) -> list[list[int]]:
        """The decode loop's greedy new token ids per prompt (all in flight together)."""
        assert self.loop is not None
        sequences = [Sequence(key=i, prompt=self.tokenizer(t, add_special_tokens=False)["input_ids"],
                              max_new=max_new_tokens) for i, t in enumerate(items)]
        for seq in sequences:
            self.loop.add(seq)
        while any(s.done is None for s in sequences):
            self.decode_step()
        return [s.generated for s in sequences]
