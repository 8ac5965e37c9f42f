"""The engine driving real torch models (tiny Qwen3 of the real architecture) on the CPU."""

from __future__ import annotations

from workers.backends import load_model
from workers.backends.tokens import count_tokens
from workers.engine import URGENT, Engine
from workers.models import ModelSpec

PROMPTS = ["Question: what", "The GPU worker loads the embedder then the reranker and", "yes", "Postgres stores"]


def test_concurrent_urgent_questions_are_generated_in_one_batch(tiny_models) -> None:  # type: ignore[no-untyped-def]
    spec = ModelSpec(role="generate", path=tiny_models["lm"], name="tiny-gen", max_new_tokens=10, batch_size=8,
                     urgent_batch=8)
    engine = Engine("cpu", {"generate": spec}, load_model, 2**30, token_counter=count_tokens)
    futures = [engine.submit("generate", [prompt], priority=URGENT, params={"max_new_tokens": 10})
               for prompt in PROMPTS]
    engine.start()
    batched = [f.result(60) for f in futures]
    singles = [engine.run("generate", [prompt], priority=URGENT, params={"max_new_tokens": 10}) for prompt in PROMPTS]
    engine.stop()
    assert all(r.batch_size == len(PROMPTS) for r in batched)
    assert all(r.batch_size == 1 for r in singles)
    assert [r.outputs for r in batched] == [r.outputs for r in singles]
    assert all(r.tokens > 0 for r in batched)
