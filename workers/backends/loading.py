"""Loading a torch model for its role: the tokenizer and weights from a local directory, onto the device, wrapped
in the role's class (embedder, reranker, generator); decoder embedders and rerankers get packed passes where the
device has variable-length attention."""

from __future__ import annotations

import logging

import torch

from ragq.core.errors import DeviceOutOfMemory, ModelLoadFailed
from workers.backends.generator import TorchGenerator
from workers.backends.packed import enable_packing, varlen_available
from workers.backends.torch_backend import (
    TorchCrossEncoder, TorchEmbedder, TorchQwen3Reranker, _check_dir, _dtype, _TorchModel,
)
from workers.models import ModelSpec

log = logging.getLogger(__name__)


def load_torch_model(spec: ModelSpec, device: str) -> _TorchModel:
    from transformers import (
        AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
    )

    path = _check_dir(spec)
    dtype = _dtype(spec, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if spec.role == "embed":
            if spec.pooling == "last":
                tokenizer.padding_side = "left"
            model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
            cls: type[_TorchModel] = TorchEmbedder
        elif spec.role == "rerank" and spec.kind == "cross-encoder":
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, local_files_only=True)
            cls = TorchCrossEncoder
        elif spec.role == "rerank":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            cls = TorchQwen3Reranker
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            cls = TorchGenerator
    except torch.cuda.OutOfMemoryError as exc:
        raise DeviceOutOfMemory(f"loading {spec.name}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # transformers/safetensors raise many types for a bad directory
        raise ModelLoadFailed(f"model {spec.name}: cannot load {path}: {exc}") from exc
    model.eval()
    try:
        model.to(device)
    except torch.cuda.OutOfMemoryError as exc:
        del model
        torch.cuda.empty_cache()
        raise DeviceOutOfMemory(f"loading {spec.name}: {str(exc).splitlines()[0]}") from None
    if spec.quantize != "none":
        from workers.backends.quantize import quantize_model
        from workers.models import check_format

        check_format(spec.name, spec.role, spec.quantize, device)
        try:
            layers = quantize_model(model, spec.quantize)
        except torch.cuda.OutOfMemoryError as exc:
            del model
            torch.cuda.empty_cache()
            raise DeviceOutOfMemory(f"quantizing {spec.name}: {str(exc).splitlines()[0]}") from None
        log.info("%s: %d linear layers in %s", spec.name, layers, spec.quantize)
    if spec.role in ("embed", "rerank") and str(spec.extra.get("fused_norms", "on")) != "off":
        from workers.backends.fastpaths import fuse_norms

        fuse_norms(model)   # one kernel per RMSNorm instead of seven: a short query's pass is launch-bound
    loaded = cls(spec, device, model, tokenizer)
    if spec.role == "generate":
        loaded.setup_decode()   # type: ignore[attr-defined]
    if cls in (TorchEmbedder, TorchQwen3Reranker) and spec.packed != "off" \
            and (spec.packed == "on" or varlen_available(device)):
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        why_not = enable_packing(model, lambda m, kwargs: m.base_model(**kwargs).last_hidden_state,
                                 tolerance=tolerance)
        loaded.packed = why_not is None
        if why_not is None:
            log.info("%s runs packed (padding-free) forward passes on %s", spec.name, device)
        else:
            (log.warning if spec.packed == "on" else log.info)(
                "%s runs padded forward passes on %s: %s", spec.name, device, why_not)
    return loaded
