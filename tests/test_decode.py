"""The generator's decode loop on the CPU with a tiny Qwen3 (no graphs): token for token what transformers' greedy
`generate` gives, for sequences alone, together, joining mid-decode, cancelled, stopped, waiting for a slot,
preempted, and carried across a sleep and a wake — each with steps launched one at a time and with the next step
launched before the last one's tokens are read (`overlap`, the default where graphs run)."""

from __future__ import annotations

import pytest
import torch

from workers.backends.decode import Sequence
from workers.backends.decode_steps import sample
from workers.backends.loading import load_torch_model
from workers.models import ModelSpec, kv_cache_guess

PROMPTS = [
    "Question: what",
    "The GPU worker loads the embedder then the reranker and",
    "yes",
    "Postgres stores chunks and vectors with pgvector and an HNSW index. Redis is the broker; the result backend",
    "Celery routes urgent questions ahead of background ingestion. Documents from Docling pipelines are",
]
NEW = 16


def load(tiny_models, overlap: str = "off", **extra):  # type: ignore[no-untyped-def]
    spec = ModelSpec(role="generate", path=tiny_models["lm"], name="tiny-gen", max_length=96, max_new_tokens=NEW,
                     extra={"prefill_chunk": 16, "overlap": overlap, **extra})
    return load_torch_model(spec, "cpu")


@pytest.fixture(scope="module", params=["off", "on"])
def overlap(request) -> str:  # type: ignore[no-untyped-def]
    return str(request.param)


@pytest.fixture(scope="module")
def generator(tiny_models, overlap):  # type: ignore[no-untyped-def]
    return load(tiny_models, overlap)


def chained(generator) -> int:  # type: ignore[no-untyped-def]
    return int(generator.loop.counters["chained"])


@pytest.fixture(scope="module")
def reference(generator):  # type: ignore[no-untyped-def]
    """transformers' greedy generate, one prompt at a time."""
    return [generator.generate_ids([p], NEW)[0] for p in PROMPTS]


def seq(generator, index: int, **kwargs) -> Sequence:  # type: ignore[no-untyped-def]
    ids = generator.tokenizer(PROMPTS[index], add_special_tokens=False)["input_ids"]
    pieces: list[str] = []
    s = Sequence(key=index, prompt=list(ids), max_new=kwargs.pop("max_new", NEW), on_piece=pieces.append, **kwargs)
    s.pieces = pieces  # type: ignore[attr-defined]
    return s


def run_all(generator, sequences: list[Sequence], max_steps: int = 10_000) -> int:  # type: ignore[no-untyped-def]
    steps = 0
    while any(s.done is None for s in sequences):
        generator.decode_step()
        steps += 1
        assert steps < max_steps
    return steps


def test_loop_equals_greedy_generate_alone_and_together(generator, reference, overlap) -> None:  # type: ignore[no-untyped-def]
    assert generator.continuous
    before = chained(generator)
    assert generator.loop.packed_gqa   # decode steps attend on the key/value heads (the tiny model has 2 groups)
    assert all(len(r) > 0 for r in reference)
    assert [generator.loop_ids([p], NEW)[0] for p in PROMPTS] == reference
    assert generator.loop_ids(PROMPTS[:4], NEW) == reference[:4]   # four slots: all in flight together
    # the long prompts are prefilled in chunks of 16 tokens
    assert max(len(generator.tokenizer(p)["input_ids"]) for p in PROMPTS) > 16
    # with overlap, most steps were launched on the one before (all but those after a change of rows)
    assert (chained(generator) - before > 5 * NEW // 2) if overlap == "on" else chained(generator) == before
    assert generator.loop._ahead is None   # nothing left in flight once every sequence finished


def test_sequences_join_mid_decode_and_leave_when_done(generator, reference) -> None:  # type: ignore[no-untyped-def]
    first = seq(generator, 3)
    generator.loop.add(first)
    for _ in range(6):
        generator.decode_step()
    assert 0 < len(first.generated) < NEW
    later = [seq(generator, 0, max_new=5), seq(generator, 1)]
    for s in later:
        generator.loop.add(s)
    steps_before = generator.loop.counters["steps"]
    run_all(generator, [first, *later])
    assert first.generated == reference[3]
    assert later[0].generated == reference[0][:5] and later[0].done in ("length", "eos")
    assert later[1].generated == reference[1]
    # they shared decode steps: fewer steps than one after another
    assert generator.loop.counters["steps"] - steps_before < (NEW - 6) + 5 + NEW
    assert generator.loop.active == 0


def test_prompts_that_arrive_together_are_prefilled_together(tiny_models, reference, overlap) -> None:  # type: ignore[no-untyped-def]
    # a long prompt first (row 0, three chunks), short ones after it (rows 1.., one chunk): the short ones are
    # prefilled in the same forward passes and join the running rows first, swapping rows with the long one
    generator = load(tiny_models, overlap, prefill_tokens=48)
    loop = generator.loop
    order = [3, 0, 2, 1]
    sequences = [seq(generator, i) for i in order]
    for s in sequences:
        loop.add(s)
    long_ids = len(generator.tokenizer(PROMPTS[3], add_special_tokens=False)["input_ids"])
    assert long_ids > 2 * 16
    before = loop.counters["prefill_tokens"]
    generator.decode_step()
    assert len(loop.prefilling) + len(loop.running) == 4
    assert loop.counters["prefill_tokens"] - before > 16   # more than one sequence's chunk in the first pass
    assert sequences[0] in loop.prefilling and sequences[1] in loop.running   # short ones joined first
    assert sorted(s.row for s in loop.running + loop.prefilling) == [0, 1, 2, 3]
    assert [s.row for s in loop.running] == list(range(len(loop.running)))   # running rows stay compact
    cancelled = sequences[2]
    loop.cancel(cancelled.key)
    run_all(generator, [s for s in sequences if s is not cancelled])
    assert cancelled.done == "cancelled"
    for index, s in zip(order, sequences):
        if s is not cancelled:
            assert s.generated == reference[index], index
    assert loop.active == 0


def test_a_cancelled_or_abandoned_sequence_frees_its_slot(generator, reference) -> None:  # type: ignore[no-untyped-def]
    keep, cancel = seq(generator, 1), seq(generator, 3)
    caller_here = [True]
    gone = seq(generator, 4, alive=lambda: caller_here[0])
    for s in (cancel, keep, gone):
        generator.loop.add(s)
    for _ in range(8):
        generator.decode_step()
    assert generator.loop.cancel(3)
    caller_here[0] = False
    finished = generator.decode_step()
    assert {s.key for s in finished} >= {3, 4}
    assert cancel.done == "cancelled" and gone.done == "cancelled"
    assert len(generator.loop.running) <= 1
    run_all(generator, [keep])
    assert keep.generated == reference[1]


def test_stop_strings_cut_the_answer_and_the_stream_adds_up(generator) -> None:  # type: ignore[no-untyped-def]
    whole = seq(generator, 1)
    generator.loop.add(whole)
    run_all(generator, [whole])
    assert "".join(whole.pieces) == whole.answer and len(whole.answer) > 4
    stop = whole.answer[3:5]
    cut = seq(generator, 1, stops=(stop,))
    generator.loop.add(cut)
    run_all(generator, [cut])
    assert cut.done == "stop"
    assert stop not in cut.answer and whole.answer.startswith(cut.answer)
    assert "".join(cut.pieces) == cut.answer   # no piece of the stop string was streamed
    assert len(cut.generated) < len(whole.generated)


def test_a_full_cache_makes_new_sequences_wait(tiny_models, reference, overlap) -> None:  # type: ignore[no-untyped-def]
    generator = load(tiny_models, overlap, decode_slots=2)
    sequences = [seq(generator, i) for i in range(len(PROMPTS))]
    for s in sequences:
        generator.loop.add(s)
    most = 0
    while any(s.done is None for s in sequences):
        generator.decode_step()
        most = max(most, len(generator.loop.running))
    assert most == 2
    assert [s.generated for s in sequences] == reference


def test_urgent_preempts_background_which_resumes_exactly(tiny_models, reference, overlap) -> None:  # type: ignore[no-untyped-def]
    generator = load(tiny_models, overlap, decode_slots=1)
    background = seq(generator, 3)
    generator.loop.add(background)
    for _ in range(5):
        generator.decode_step()
    done_before = len(background.generated)
    assert done_before > 0
    urgent = seq(generator, 1, urgent=True)
    generator.loop.add(urgent)
    generator.decode_step()
    assert generator.loop.counters["preempted"] == 1 and background.preempted == 1
    run_all(generator, [urgent, background])
    assert urgent.generated == reference[1]
    assert background.generated == reference[3]   # recomputed from its context, then continued
    assert "".join(background.pieces) == background.answer


def test_sleep_and_wake_with_sequences_in_flight_continue_exactly(tiny_models, reference, overlap) -> None:  # type: ignore[no-untyped-def]
    generator = load(tiny_models, overlap)
    sequences = [seq(generator, i) for i in (0, 1, 3)]
    for s in sequences:
        generator.loop.add(s)
    for _ in range(9):
        generator.decode_step()
    assert not generator.loop.prefilling and len(generator.loop.running) >= 2
    assert (generator.loop._ahead is not None) == (overlap == "on")   # a step in flight as it goes to sleep
    generator.sleep()
    assert generator.loop.cache is None and generator.loop._ahead is None   # read, then the rows to the host
    generator.wake()
    run_all(generator, sequences)
    assert [s.generated for s in sequences] == [reference[0], reference[1], reference[3]]


def test_execute_runs_a_batch_through_the_loop(generator) -> None:  # type: ignore[no-untyped-def]
    texts = generator.run(PROMPTS[:3], {"max_new_tokens": 8, "templated": True})
    assert texts == [generator.run([p], {"max_new_tokens": 8, "templated": True})[0] for p in PROMPTS[:3]]
    off = generator._generate(PROMPTS[:3], {"max_new_tokens": 8, "templated": True})
    assert texts == off   # the same text as transformers' generate gives


def test_sampling_on_the_device() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, torch.zeros(6), torch.ones(6)), greedy)
    assert torch.equal(sample(logits, torch.full((6,), 1.0), torch.full((6,), 1e-9)), greedy)   # top-p: one token
    draws = torch.stack([sample(logits, torch.full((6,), 2.0), torch.ones(6)) for _ in range(50)])
    assert (draws != greedy).any()
    mixed = sample(logits, torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]), torch.ones(6))
    assert torch.equal(mixed[::2], greedy[::2])


def test_the_chat_template_turns_thinking_off(tiny_models, generator) -> None:  # type: ignore[no-untyped-def]
    ids = generator.encode_prompt("what is redis?", {})
    text = generator.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nwhat is redis?") and text.endswith("<think>\n\n</think>\n\n")
    thinking = load(tiny_models, thinking=True)
    assert not thinking.tokenizer.decode(thinking.encode_prompt("what is redis?", {})).endswith("</think>\n\n")
    assert generator.tokenizer.decode(generator.encode_prompt("raw", {"templated": True})) == "raw"


def test_the_kv_cache_counts_in_the_footprint(tiny_models, generator) -> None:  # type: ignore[no-untyped-def]
    off = load(tiny_models, decode="off")
    assert not off.continuous
    assert generator.nbytes == off.nbytes + generator.loop.kv_bytes
    assert generator.loop.kv_bytes == generator.loop.cache.nbytes
    # before any load measured it, the first guess adds the same bytes from config.json (the planner sees them)
    assert kv_cache_guess(generator.spec, "cpu") == generator.loop.kv_bytes
    assert kv_cache_guess(off.spec, "cpu") == 0


def test_the_loop_runs_its_own_decoder_with_fused_projections_as_views(generator) -> None:  # type: ignore[no-untyped-def]
    decoder = generator.loop.decoder
    assert decoder is not None and not decoder.compiled   # eager parts on the CPU by default
    for i, layer in enumerate(decoder.base.layers):
        fused = decoder.fused(i)
        attn, mlp = layer.self_attn, layer.mlp
        # one weight each for q/k/v and gate/up, lying where the modules' own weights are (views, no copies)
        assert fused.qkv is not None and fused.gate_up is not None
        assert fused.qkv.data_ptr() == attn.q_proj.weight.data_ptr()
        assert fused.qkv.shape[0] == sum(m.weight.shape[0] for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        assert torch.equal(fused.qkv[-attn.v_proj.weight.shape[0]:], attn.v_proj.weight)
        assert fused.gate_up.data_ptr() == mlp.gate_proj.weight.data_ptr()
        assert torch.equal(fused.gate_up[mlp.gate_proj.weight.shape[0]:], mlp.up_proj.weight)


def test_weights_moved_apart_run_unfused_and_transformers_modules_still_work(tiny_models, reference) -> None:  # type: ignore[no-untyped-def]
    moved = load(tiny_models)
    layer = moved.loop.decoder.base.layers[0]
    with torch.no_grad():   # as after an ordinary wake: each weight in an allocation of its own
        for module in (layer.self_attn.k_proj, layer.mlp.up_proj):
            module.weight.data = module.weight.data.clone()
    assert moved.loop.decoder.fused(0).qkv is None and moved.loop.decoder.fused(0).gate_up is None
    assert moved.loop.decoder.fused(1).qkv is not None
    assert moved.loop_ids(PROMPTS, NEW) == reference
    modules = load(tiny_models, decoder="off")   # transformers' own modules in the loop
    assert modules.loop.decoder is None and modules.loop.why_not_decoder == "turned off"
    assert modules.loop_ids(PROMPTS, NEW) == reference


def test_the_compiled_decoder_equals_generate(tiny_models, reference) -> None:  # type: ignore[no-untyped-def]
    """What runs on a CUDA card by default: decode steps' elementwise parts through torch.compile (here inductor's
    C++ code), compiled at load for one row and for any other count, so serving recompiles nothing."""
    compiled = load(tiny_models, compile="on")
    assert compiled.loop.decoder.compiled
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0   # compiled at load
    assert compiled.loop_ids(PROMPTS, NEW) == reference
    assert [compiled.loop_ids([p], NEW)[0] for p in PROMPTS[:2]] == reference[:2]
    assert counters["stats"]["unique_graphs"] == graphs   # no shape in prefill or decode compiled again
    with pytest.raises(ValueError, match="compile must be auto, on or off"):
        load(tiny_models, compile="sometimes")


def test_graphs_for_every_batch_size_are_captured_at_load_where_graphs_run(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """On a card the generator captures the greedy step for each batch bucket when it loads (the first questions
    asked together no longer stop the card for a capture per bucket as they join); a failed capture leaves them to
    first use. Here (no CUDA) graphs are off and nothing is captured; the buckets and the fallback are checked with
    the capture itself stood in for."""
    generator = load(tiny_models, decode_slots=12)
    loop = generator.loop
    assert loop.capture_graphs() == 0 and not loop._graphs   # no graphs on the CPU
    made: list[tuple[int, bool, int]] = []

    def capture(bucket: int, sampling: bool, width: int) -> object:
        made.append((bucket, sampling, width))
        loop._graphs[(bucket, sampling, width)] = object()
        return loop._graphs[(bucket, sampling, width)]

    loop.graphs_on, loop._graph = True, capture
    assert loop.capture_graphs() == 5
    assert [m[0] for m in made] == [1, 2, 4, 8, 12] and not any(m[1] for m in made)   # greedy, every bucket
    assert {m[2] for m in made} == {loop.context + 1}

    def broken(bucket: int, sampling: bool, width: int) -> object:
        if bucket == 4:
            raise RuntimeError("capture failed")
        return capture(bucket, sampling, width)

    loop._graphs.clear()
    loop._graph = broken
    assert loop.capture_graphs() == 0 and not loop._graphs   # left to first use
