"""The engine with a continuously decoding generator (tiny Qwen3 on the CPU): questions asked at different times
share decode steps, urgent ones are admitted first, a deadline drops a sequence mid-decode, answers stream, and a
generator that sleeps for an urgent embed with sequences in flight continues them exactly."""

from __future__ import annotations

import pytest

from ragq.core.errors import RequestExpired
from workers.backends import load_model
from workers.backends.tokens import count_tokens
from workers.engine import BACKGROUND, URGENT, Engine, EngineConfig
from workers.models import ModelSpec

PROMPTS = ["Question: what", "The GPU worker loads the embedder then the reranker and", "yes", "Postgres stores"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def generate_spec(tiny_models, **extra) -> ModelSpec:  # type: ignore[no-untyped-def]
    return ModelSpec(role="generate", path=tiny_models["lm"], name="tiny-gen", max_new_tokens=24, max_length=96,
                     batch_size=8, urgent_batch=8, extra=extra)


def make_engine(specs, budget: int = 2**30, clock=None, slice_s: float = 0.0) -> Engine:  # type: ignore[no-untyped-def]
    """Driven by `step()`, each of which runs one decode step (a slice of 0 s)."""
    return Engine("cpu", specs, load_model, budget, host_budget_bytes=2**30, token_counter=count_tokens,
                  config=EngineConfig(decode_slice_s=slice_s),
                  **({"clock": clock, "waiter": lambda s: None} if clock else {}))


def steps_until(engine: Engine, done, limit: int = 2000) -> int:  # type: ignore[no-untyped-def]
    for n in range(limit):
        if done():
            return n
        engine.step()
    raise AssertionError("the engine did not get there")


@pytest.fixture(scope="module")
def alone(tiny_models):  # type: ignore[no-untyped-def]
    """Each prompt's answer when it runs alone (24 new tokens, greedy, templated by the caller)."""
    engine = make_engine({"generate": generate_spec(tiny_models)}).start()
    try:
        return [engine.run("generate", [p], params={"templated": True}).outputs[0] for p in PROMPTS]
    finally:
        engine.stop()


def test_questions_asked_at_different_times_share_decode_steps(tiny_models, alone) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine({"generate": generate_spec(tiny_models)})
    first = engine.submit("generate", [PROMPTS[1]], priority=URGENT, params={"templated": True})
    engine.step()   # loads the model, admits the first question, runs its first slice
    loop = engine._slots["tiny-gen"].model.loop
    assert loop.running and not first.done()
    later = [engine.submit("generate", [p], priority=URGENT, params={"templated": True, "max_new_tokens": 6})
             for p in (PROMPTS[0], PROMPTS[3])]
    steps_until(engine, lambda: all(f.done() for f in later))
    assert not first.done()                # the short ones joined the running batch and left before it ended
    steps_until(engine, first.done)
    assert first.result().outputs == [alone[1]]
    assert first.result().batch_size >= 2  # it shared decode steps with the others
    assert first.result().first_token_ms is not None
    engine.stop()


def test_urgent_questions_are_admitted_before_background_ones(tiny_models, alone) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine({"generate": generate_spec(tiny_models, decode_slots=1)})
    background = engine.submit("generate", [PROMPTS[3]], priority=BACKGROUND, params={"templated": True})
    engine.step()
    urgent = engine.submit("generate", [PROMPTS[1]], priority=URGENT, params={"templated": True})
    steps_until(engine, urgent.done)
    assert not background.done()           # preempted for the urgent one, then resumed
    steps_until(engine, background.done)
    assert urgent.result().outputs == [alone[1]]
    assert background.result().outputs == [alone[3]]
    assert engine._slots["tiny-gen"].model.loop.counters["preempted"] == 1
    engine.stop()


def test_a_deadline_drops_the_sequence_mid_decode(tiny_models, alone) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    engine = make_engine({"generate": generate_spec(tiny_models)}, clock=clock)
    doomed = engine.submit("generate", [PROMPTS[1]], priority=URGENT, deadline=clock.now + 5,
                           params={"templated": True, "max_new_tokens": 60})
    kept = engine.submit("generate", [PROMPTS[0]], priority=URGENT, params={"templated": True})
    engine.step()
    loop = engine._slots["tiny-gen"].model.loop
    assert len(loop.running) + len(loop.prefilling) + len(loop.waiting) == 2
    clock.now += 10
    steps_until(engine, doomed.done)
    with pytest.raises(RequestExpired):
        doomed.result()
    steps_until(engine, kept.done)
    assert kept.result().outputs == [alone[0]]
    assert loop.active == 0 and not engine._pending
    engine.stop()


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_answers_stream_in_pieces_that_add_up(tiny_models, alone, overlap) -> None:  # type: ignore[no-untyped-def]
    # slices of many steps: with overlap a step is in flight at each slice's end, read before the engine moves on
    engine = make_engine({"generate": generate_spec(tiny_models, overlap=overlap)}, slice_s=0.05)
    pieces: dict[str, list[str]] = {}
    engine.streamer = lambda key, piece: pieces.setdefault(key, []).append(piece)
    futures = [engine.submit("generate", [p], priority=URGENT, params={"templated": True, "stream": f"s{i}"})
               for i, p in enumerate(PROMPTS)]
    engine.start()
    results = [f.result(60) for f in futures]
    loop = engine._slots["tiny-gen"].model.loop
    summary = engine.stats.summary()   # the engine's periodic log line: the decode slices' steps and tokens
    engine.stop()
    assert f"tokens {loop.counters['tokens']}," in summary and f"({loop.counters['chained']} chained)" in summary
    assert [r.outputs[0] for r in results] == alone
    for i, result in enumerate(results):
        assert "".join(pieces.get(f"s{i}", [])) == result.outputs[0]
    assert sum(len(p) for p in pieces.values()) > len(PROMPTS)   # streamed piece by piece, not in one go
    assert (loop.counters["chained"] > 0) == (overlap == "on") and loop._ahead is None


def test_the_generator_sleeps_for_an_urgent_embed_and_continues_exactly(tiny_models, alone) -> None:  # type: ignore[no-untyped-def]
    embed = ModelSpec(role="embed", path=tiny_models["embed"], name="tiny-embed", kind="last", max_length=64)
    generate = generate_spec(tiny_models)
    probe = make_engine({"embed": embed, "generate": generate}).start()
    probe.run("embed", ["x"])
    probe.run("generate", ["x"], params={"templated": True, "max_new_tokens": 1})
    sizes = probe.resident_models()
    probe.stop()
    budget = max(sizes.values()) + min(sizes.values()) // 2   # one model at a time
    engine = make_engine({"embed": embed, "generate": generate}, budget=budget)
    answers = [engine.submit("generate", [p], priority=BACKGROUND, params={"templated": True})
               for p in (PROMPTS[1], PROMPTS[3])]
    engine.step()
    generator = engine._slots["tiny-gen"].model
    assert generator.loop.running and not any(a.done() for a in answers)
    vector = engine.submit("embed", ["an urgent question"], priority=URGENT)
    steps_until(engine, vector.done)
    assert engine.tiers()["tiny-gen"] != "vram"   # it made way, its sequences' KV went with it
    steps_until(engine, lambda: all(a.done() for a in answers))
    assert [a.result().outputs[0] for a in answers] == [alone[1], alone[3]]
    engine.stop()


def test_a_questions_rerank_runs_between_decode_slices_of_other_answers(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """16 questions at once reach their rerank at different times: a rerank must not wait for the answers already
    decoding (that made questions asked together answer in waves)."""
    rerank = ModelSpec(role="rerank", path=tiny_models["lm"], name="tiny-rerank", kind="qwen3", max_length=64)
    engine = make_engine({"rerank": rerank, "generate": generate_spec(tiny_models)})
    answer = engine.submit("generate", [PROMPTS[1]], priority=URGENT, params={"templated": True})
    engine.step()
    assert engine._slots["tiny-gen"].model.loop.running
    scores = engine.submit("rerank", [["what", "Redis is the broker"]], priority=URGENT)
    steps_until(engine, scores.done)
    assert not answer.done()            # the rerank ran while the answer was still decoding
    steps_until(engine, answer.done)
    engine.stop()
