"""Torch backends on tiny models of the real architectures, loaded through from_pretrained(local_dir)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from ragq.core.errors import ModelLoadFailed
from workers.backends.loading import load_torch_model
from workers.models import ModelSpec, default_embed_spec

PAIRS = [
    ("what is redis", "Redis is the broker; the result backend answers the synchronous call."),
    ("gpu", "The GPU worker loads the embedder, then the reranker, then the generator. " * 4),
    ("x", "yes"),
    ("Which queue is urgent?", "Celery routes urgent questions ahead of background ingestion."),
]
PROMPTS = ["Question: what", "The GPU worker loads the embedder then the reranker and", "yes", "Postgres stores"]


@pytest.fixture(scope="module")
def reranker(tiny_models):  # type: ignore[no-untyped-def]
    return load_torch_model(ModelSpec(role="rerank", path=tiny_models["lm"], name="tiny-rerank"), "cpu")


@pytest.fixture(scope="module")
def generator(tiny_models):  # type: ignore[no-untyped-def]
    return load_torch_model(ModelSpec(role="generate", path=tiny_models["lm"], name="tiny-gen", max_new_tokens=12), "cpu")


def test_qwen3_rerank_batch_equals_one_by_one(reranker) -> None:  # type: ignore[no-untyped-def]
    batched = reranker.run(PAIRS, {})
    single = [reranker.run([pair], {})[0] for pair in PAIRS]
    assert batched == pytest.approx(single, abs=1e-5)
    assert all(0.0 < s < 1.0 for s in batched)
    assert len(set(round(s, 4) for s in batched)) > 1


def test_qwen3_rerank_is_p_yes_of_the_prompt(reranker) -> None:  # type: ignore[no-untyped-def]
    import torch

    from workers.backends.torch_backend import QWEN3_RERANK_PREFIX, QWEN3_RERANK_SUFFIX

    query, doc = PAIRS[0]
    text = f"{QWEN3_RERANK_PREFIX}<Instruct>: {reranker.spec.instruction}\n<Query>: {query}\n<Document>: {doc}" \
        f"{QWEN3_RERANK_SUFFIX}"
    ids = reranker.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = reranker.model(input_ids=ids).logits[0, -1]
    yes, no = logits[reranker.yes_id].item(), logits[reranker.no_id].item()
    expected = math.exp(yes) / (math.exp(yes) + math.exp(no))
    assert reranker.run([PAIRS[0]], {})[0] == pytest.approx(expected, abs=1e-5)


def test_generate_batch_equals_one_by_one(generator) -> None:  # type: ignore[no-untyped-def]
    batched = generator.generate_ids(PROMPTS, 12)
    single = [generator.generate_ids([p], 12)[0] for p in PROMPTS]
    assert batched == single
    assert any(len(tokens) > 0 for tokens in batched)
    texts = generator.run(PROMPTS, {"max_new_tokens": 12})
    assert texts == [generator.run([p], {"max_new_tokens": 12})[0] for p in PROMPTS]


def test_generate_stop_strings_cut_the_text(generator) -> None:  # type: ignore[no-untyped-def]
    full = generator.run([PROMPTS[1]], {"max_new_tokens": 12})[0]
    assert len(full) > 2
    stop = full[1:3]
    cut = generator.run([PROMPTS[1]], {"max_new_tokens": 12, "stop": [stop]})[0]
    assert stop not in cut and full.startswith(cut)


def test_qwen3_last_token_embedding(tiny_models) -> None:  # type: ignore[no-untyped-def]
    embedder = load_torch_model(
        ModelSpec(role="embed", path=tiny_models["embed"], name="tiny-embed", kind="last", dim=32), "cpu")
    texts = ["hello there", "a much longer text about redis and postgres and the GPU worker", "yes"]
    batched = embedder.run(texts, {})
    single = [embedder.run([t], {})[0] for t in texts]
    assert all(len(v) == 32 for v in batched)
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-5 for v in batched)
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, abs=1e-5)


def test_embed_and_rerank_run_fused_norms_with_the_same_outputs(tiny_models, reranker) -> None:  # type: ignore[no-untyped-def]
    """RMSNorm as torch's one fused kernel (a short query's pass on a card is launch-bound: seven kernels a norm
    became one); `fused_norms = "off"` keeps transformers' own."""
    texts = ["hello there", "a much longer text about redis and postgres and the GPU worker"]
    specs = {name: ModelSpec(role="embed", path=tiny_models["embed"], name="tiny-embed", kind="last",
                             extra={"fused_norms": name}) for name in ("on", "off")}
    fused, plain = (load_torch_model(specs[name], "cpu") for name in ("on", "off"))
    norms = [m for m in fused.model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all("forward" in m.__dict__ for m in norms)   # switched
    assert not any("forward" in m.__dict__ for m in plain.model.modules() if type(m).__name__.endswith("RMSNorm"))
    for a, b in zip(fused.run(texts, {}), plain.run(texts, {})):
        assert a == pytest.approx(b, abs=1e-5)
    assert any("forward" in m.__dict__ for m in reranker.model.modules() if type(m).__name__.endswith("RMSNorm"))
    plain_reranker = load_torch_model(ModelSpec(role="rerank", path=tiny_models["lm"], name="tiny-rerank",
                                                extra={"fused_norms": "off"}), "cpu")
    assert reranker.run(PAIRS, {}) == pytest.approx(plain_reranker.run(PAIRS, {}), abs=1e-5)


MIXED = ["yes", "a short one", "Redis is the broker; " * 3, "The GPU worker loads the embedder. " * 6, "no",
         "Celery routes urgent questions ahead of background ingestion.", "Postgres " * 20, "x y z"]


@pytest.mark.parametrize("overhead", [0, 16])
def test_length_sorted_passes_give_what_one_padded_pass_gives(tiny_models, overhead: int) -> None:  # type: ignore[no-untyped-def]
    """A micro-batch of mixed lengths split into length-sorted forward passes returns, in input order, what one
    pass padded to the longest item returns: Qwen3 last-token (left padding), MiniLM mean (right padding, token
    type ids) and the Qwen3 reranker."""
    import dataclasses

    from scheduler.batching import length_groups

    cases = [
        (ModelSpec(role="embed", path=tiny_models["embed"], name="tiny-embed", kind="last"), MIXED),
        (default_embed_spec(), MIXED),
        (ModelSpec(role="rerank", path=tiny_models["lm"], name="tiny-rerank"), [("q", t) for t in MIXED]),
    ]
    for spec, items in cases:
        split = load_torch_model(dataclasses.replace(spec, pass_overhead_tokens=overhead, fit_pass_overhead=False), "cpu")
        whole = load_torch_model(dataclasses.replace(spec, pass_overhead_tokens=10**9, fit_pass_overhead=False), "cpu")
        lengths = split.count_tokens(items)
        assert len(length_groups(lengths, overhead)) >= 3, spec.name   # really several passes
        for a, b in zip(split.run(items, {}), whole.run(items, {})):
            assert a == pytest.approx(b, abs=1e-5), spec.name


def test_minilm_puts_related_sentences_closer() -> None:
    embedder = load_torch_model(default_embed_spec(), "cpu")
    a, b, c = embedder.run([
        "How long does it take to load a model onto the GPU?",
        "Loading the weights into GPU memory takes about a second.",
        "Bananas are rich in potassium.",
    ], {"kind": "query"})
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731
    assert len(a) == 384
    assert dot(a, b) > dot(a, c) + 0.2
    assert embedder.nbytes > 80 * 2**20


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        load_torch_model(ModelSpec(role="embed", path=tmp_path / "nope", name="nope"), "cpu")


def test_corrupted_model_directory(tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["lm"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadFailed, match="broken"):
        load_torch_model(ModelSpec(role="generate", path=broken, name="broken"), "cpu")


def test_fast_padding_equals_the_tokenizers(tiny_models) -> None:  # type: ignore[no-untyped-def]
    import torch

    for spec in (default_embed_spec(), ModelSpec(role="embed", path=tiny_models["embed"], name="tiny", kind="last")):
        model = load_torch_model(spec, "cpu")
        encoded = model.tokenizer(MIXED, truncation=True, max_length=64)
        rows = [{key: encoded[key][i] for key in encoded.keys()} for i in range(len(MIXED))]
        for side in ("left", "right"):
            mine = model.pad(rows, side)
            theirs = model.tokenizer.pad(rows, padding=True, return_tensors="pt", padding_side=side)
            assert set(mine) == set(theirs.keys())
            for key in mine:
                assert torch.equal(mine[key], theirs[key]), (spec.name, side, key)


def test_texts_tokenised_by_the_submitter_embed_as_the_texts_do(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """prepare_items (run by the consumer that submits) gives the backend token ids; the vectors are the ones the
    backend makes from the texts itself, for either kind of prefix, with and without token type ids."""
    import dataclasses

    from workers.backends.tokens import Encoded, prepare_items

    specs = [
        dataclasses.replace(default_embed_spec(), query_prefix="query: ", document_prefix="passage: "),
        ModelSpec(role="embed", path=tiny_models["embed"], name="tiny", kind="last", max_length=16),  # truncates
    ]
    for spec in specs:
        model = load_torch_model(spec, "cpu")
        for kind in ("query", "document"):
            prepared, tokens = prepare_items(spec, MIXED, {"kind": kind})
            assert all(isinstance(item, Encoded) for item in prepared)
            assert tokens == [len(item.ids) for item in prepared] and max(tokens) <= spec.max_length
            mixed = [prepared[0], *MIXED[1:]]   # prepared and plain items in one batch
            for a, b in zip(model.run(prepared, {"kind": kind}), model.run(MIXED, {"kind": kind})):
                assert a == pytest.approx(b, abs=1e-5), (spec.name, kind)
            assert model.run(mixed, {"kind": kind})[0] == pytest.approx(model.run(MIXED, {"kind": kind})[0], abs=1e-5)


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_packed_forward_gives_what_padded_passes_give(tiny_models, pooling: str) -> None:  # type: ignore[no-untyped-def]
    """One padding-free pass (rows concatenated, positions restarting per row, attention kept inside each row)
    returns, in input order, what padded passes return: a Qwen3 embedder with each pooling, and the reranker."""
    import dataclasses

    cases = [
        (ModelSpec(role="embed", path=tiny_models["embed"], name="tiny-embed", kind=pooling, dim=32), MIXED),
        (ModelSpec(role="rerank", path=tiny_models["lm"], name="tiny-rerank"), [("q", t) for t in MIXED]),
    ]
    for spec, items in cases:
        packed = load_torch_model(dataclasses.replace(spec, packed="on"), "cpu")
        padded = load_torch_model(dataclasses.replace(spec, packed="off"), "cpu")
        assert packed.packed and not padded.packed
        assert packed.model.config._attn_implementation == "ragq_packed"
        packed_out, padded_out = packed.execute(items, {}), padded.execute(items, {})
        got, expected = packed_out.outputs, padded_out.outputs
        for a, b in zip(got, expected):
            assert a == pytest.approx(b, abs=1e-5), spec.name
        assert packed_out.phases["passes"] == 1
        assert packed_out.phases["real_tokens"] == packed_out.phases["padded_tokens"] \
            == padded_out.phases["real_tokens"] < padded_out.phases["padded_tokens"]
        assert packed.run(items[2:3], {})[0] == pytest.approx(expected[2], abs=1e-5)   # a batch of one


def test_packing_is_refused_where_the_model_cannot_do_it(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """MiniLM (BERT) has no packed attention path: asked for packing, it stays padded and still embeds; on a CPU
    "auto" means padded; a bad setting is a configuration error naming the model's table."""
    from ragq.core.errors import ConfigError
    from workers.models import spec_from_table

    import dataclasses

    bert = load_torch_model(dataclasses.replace(default_embed_spec(), packed="on"), "cpu")
    assert not bert.packed and len(bert.run(["hello"], {})[0]) == 384
    auto = load_torch_model(ModelSpec(role="embed", path=tiny_models["embed"], name="tiny", kind="last"), "cpu")
    assert not auto.packed
    with pytest.raises(ConfigError, match=r"\[embed\] packed"):
        spec_from_table("embed", {"path": "/x", "packed": "yes"}, "models.toml")


def test_packed_batch_layout() -> None:
    """Ids back to back, positions restarting at 0 per row, cumulative lengths, each row's last token."""
    from workers.backends.packed import Packed

    packed = Packed([[5, 6, 7], [8], [9, 10]])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed.cu.tolist() == [0, 3, 4, 6] and packed.longest == 3 and packed.tokens == 6
    assert packed.last.tolist() == [2, 3, 5]
    with pytest.raises(ValueError):
        Packed([[1], []])


def test_a_questions_rerank_candidates_are_one_urgent_pass_by_default() -> None:
    """The reranker's urgent batches hold a question's default 20 candidates; a models file can still set it."""
    from ragq.core.settings import Settings
    from workers.models import spec_from_table

    assert spec_from_table("rerank", {"path": "/x"}, "models.toml").urgent_batch >= Settings().rerank_candidates
    assert spec_from_table("embed", {"path": "/x"}, "models.toml").urgent_batch == 8
    assert spec_from_table("rerank", {"path": "/x", "urgent_batch": 4}, "models.toml").urgent_batch == 4


def test_a_cpu_engine_sets_torch_threads_from_the_cores_or_the_setting() -> None:
    import os

    import torch

    from ragq.core.settings import Settings
    from workers.start import cpu_threads

    before = torch.get_num_threads()
    try:
        assert cpu_threads(Settings(torch_threads=3)) == 3 and torch.get_num_threads() == 3
        cores = len(os.sched_getaffinity(0))
        assert cpu_threads(Settings()) == max(1, cores // 2) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
