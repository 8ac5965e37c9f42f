"""8-bit weights (`quantize` in the models file) on the CPU: the configuration path, INT8 weight-only models of the
three roles against the same models unquantized, the decode loop on an INT8 generator (token for token what
transformers' greedy `generate` gives with the same weights), and sleep/wake moving the 8-bit bytes. FP8 needs a
CUDA card of compute capability 8.9: its numbers come from bench/quant_gpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragq.core.errors import ConfigError
from tests.conftest import ragq_env, run_ragq
from workers.backends.loading import load_torch_model
from workers.backends.quantize import tensor_leaves
from workers.backends.torch_backend import module_bytes
from workers.models import ModelSpec, check_format, load_model_specs

PROMPTS = ["Question: what", "The GPU worker loads the embedder then the reranker and",
           "Postgres stores chunks and vectors with pgvector"]


def _spec(tiny_models, role: str, quantize: str = "none", **kw):  # type: ignore[no-untyped-def]
    path = tiny_models["embed"] if role == "embed" else tiny_models["lm"]
    return ModelSpec(role=role, path=path, name=f"tiny-{role}", kind="last" if role == "embed" else
                     ("qwen3" if role == "rerank" else "causal"), max_length=96, max_new_tokens=12,
                     quantize=quantize, **kw)


def test_the_models_file_takes_quantize_and_refuses_what_cannot_run(tmp_path: Path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models.toml"
    models.write_text(f'[generate]\npath = "{tiny_models["lm"]}"\nquantize = "int4"\n')
    with pytest.raises(ConfigError, match=r'\[generate\] quantize must be "none", "fp8" or "int8", not \'int4\''):
        load_model_specs(models)
    models.write_text(f'[generate]\npath = "{tiny_models["lm"]}"\nquantize = "int8"\n')
    spec = load_model_specs(models)["generate"]
    assert spec.quantize == "int8" and spec.precision == "auto+int8"   # its own measured profile
    assert load_model_specs(None)["embed"].precision == "auto"
    with pytest.raises(ConfigError, match=r'\[generate\] tiny-lm: quantize = "fp8" needs a CUDA card of compute '
                                          r'capability 8.9 or later, and this worker runs on cpu'):
        check_format("tiny-lm", "generate", "fp8", "cpu")
    check_format("tiny-lm", "generate", "int8", "cpu")


def test_a_worker_with_fp8_on_the_cpu_stops_at_start_naming_the_model(tmp_path: Path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models.toml"
    models.write_text(f'[generate]\npath = "{tiny_models["lm"]}"\nname = "tiny-gen"\nquantize = "fp8"\n')
    result = run_ragq(ragq_env(tmp_path, RAGQ_MODELS=str(models)), "worker", "--device", "cpu", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'tiny-gen: quantize = "fp8" needs a CUDA card' in result.stderr


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def test_int8_embedder_and_reranker_agree_with_the_same_models_unquantized(tiny_models) -> None:  # type: ignore[no-untyped-def]
    texts = [f"{p} chunk {i}" for i, p in enumerate(PROMPTS * 4)]
    plain, int8 = (load_torch_model(_spec(tiny_models, "embed", q), "cpu") for q in ("none", "int8"))
    linear = sum(m.weight.numel() * 4 for m in plain.model.modules() if isinstance(m, torch.nn.Linear))
    saved = module_bytes(plain.model) - module_bytes(int8.model)    # fp32 on the CPU: 4 bytes -> 1 (+ row scales)
    assert 0.7 * linear < saved < 0.75 * linear
    assert all(leaf.get().dtype in (torch.int8, torch.float32) for leaf in tensor_leaves(int8.model))
    assert all(leaf.get().is_contiguous() for leaf in tensor_leaves(int8.model))
    a = torch.tensor(plain.execute(texts, {"kind": "document"}).outputs)
    b = torch.tensor(int8.execute(texts, {"kind": "document"}).outputs)
    assert _cosine(a, b).min() > 0.99
    pairs = [("what stores vectors?", t) for t in texts]
    rerank_plain, rerank_int8 = (load_torch_model(_spec(tiny_models, "rerank", q), "cpu") for q in ("none", "int8"))
    s1 = torch.tensor(rerank_plain.execute(pairs, {}).outputs)
    s2 = torch.tensor(rerank_int8.execute(pairs, {}).outputs)
    assert (s1 - s2).abs().max() < 0.02
    # the output head stays as it is (the reranker reads two of its rows; tied to the input embeddings)
    assert type(rerank_int8.model.get_output_embeddings().weight) is torch.nn.Parameter


def test_the_decode_loop_on_an_int8_generator_equals_greedy_generate_with_the_same_weights(tiny_models) -> None:  # type: ignore[no-untyped-def]
    gen = load_torch_model(_spec(tiny_models, "generate", "int8", extra={"prefill_chunk": 16}), "cpu")
    plain = load_torch_model(_spec(tiny_models, "generate", extra={"prefill_chunk": 16}), "cpu")
    assert gen.continuous
    reference = [gen.generate_ids([p], 12)[0] for p in PROMPTS]
    assert all(reference)
    assert gen.loop_ids(PROMPTS, 12) == reference          # together, in the decode loop
    assert [gen.loop_ids([p], 12)[0] for p in PROMPTS] == reference
    ids = plain.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = [m.model(input_ids=ids).logits[0] for m in (plain, gen)]
    assert _cosine(*logits).min() > 0.99
    top1 = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean()
    assert top1 >= 0.75   # a random tiny model's logits are nearly flat: its top token is fragile (0.81 here)


def test_an_int8_models_leaves_are_what_sleep_and_wake_move(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """On the CPU sleep is a no-op; what the host copy and the stable range move is the leaf list: the 8-bit data
    and scales of each quantized weight, replaced in place so the model still computes the same."""
    gen = load_torch_model(_spec(tiny_models, "generate", "int8"), "cpu")
    leaves = tensor_leaves(gen.model)
    names = {leaf.attr for leaf in leaves}
    assert {"qdata", "scale"} <= names and None in names     # quantized weights' parts, and plain norms/embeddings
    ids = gen.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        before = gen.model(input_ids=ids).logits
        for leaf in leaves:                                 # what a wake does: new storage, same values
            leaf.set(leaf.get().clone())
        after = gen.model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert sum(leaf.get().numel() * leaf.get().element_size() for leaf in leaves) == module_bytes(gen.model)
