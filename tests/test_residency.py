from dataclasses import replace

import pytest

from ragq.core.errors import BudgetExceeded
from scheduler.residency import (
    DISK, DROP_HOST, HOST, LOAD, SLEEP, UNLOAD, VRAM, WAKE, Deferred, ModelView, Move, ResidencyPolicy, admit, prewarm,
)

GiB = 2**30
POLICY = ResidencyPolicy(budget_bytes=int(13.6 * GiB), host_budget_bytes=20 * GiB, cooldown_s=2.0)


def view(name: str, tier: str, gib: float, last_used: float = 0.0, since: float | None = None,
         pending: int = 0) -> ModelView:
    size = int(gib * GiB)
    return ModelView(name, tier, size, size, last_used, since, pending)


def models(*views: ModelView) -> dict[str, ModelView]:
    return {v.name: v for v in views}


def actions(moves: object) -> list[tuple[str, str]]:
    assert isinstance(moves, list)
    return [(m.model, m.action) for m in moves]


def test_cold_model_that_fits_is_loaded() -> None:
    state = models(view("embed", VRAM, 7.5, since=0), view("rerank", DISK, 1.1))
    assert actions(admit(state, "rerank", POLICY, now=10)) == [("rerank", LOAD)]


def test_resident_model_needs_nothing() -> None:
    assert admit(models(view("embed", VRAM, 7.5)), "embed", POLICY, now=10) == []


def test_sleeping_model_is_woken() -> None:
    state = models(view("embed", VRAM, 7.5, since=0), view("rerank", HOST, 1.1))
    assert actions(admit(state, "rerank", POLICY, now=10)) == [("rerank", WAKE)]


def test_the_cheapest_set_of_idle_models_sleeps_to_make_room() -> None:
    state = models(view("embed", VRAM, 7.5, last_used=5, since=0), view("rerank", VRAM, 1.1, last_used=1, since=0),
                   view("generate", DISK, 7.5))
    # evicting rerank (used longest ago) is not enough, and embed alone is: the reranker stays
    assert actions(admit(state, "generate", POLICY, now=10)) == [("embed", SLEEP), ("generate", LOAD)]
    roomy = ResidencyPolicy(16 * GiB, 20 * GiB, 2.0)
    assert actions(admit(state, "generate", roomy, now=10)) == [("rerank", SLEEP), ("generate", LOAD)]


def test_a_question_through_three_models_swaps_the_small_one_and_keeps_its_next_stage() -> None:
    # 16 GiB: embed 7.5 + rerank 1.1 + generate 7.5 do not fit together. LRU slept a 7.5 GiB model at every stage
    # change (two big wakes a question); by cost, the reranker goes when the embedder comes back, and the embedder
    # (not the expected generator) when the reranker comes
    budget = ResidencyPolicy(16 * GiB, 20 * GiB, 0.0)
    after_question = models(view("embed", HOST, 7.5, last_used=1), view("rerank", VRAM, 1.1, last_used=2, since=0),
                            view("generate", VRAM, 7.5, last_used=3, since=0))
    embed_in = admit(after_question, "embed", budget, now=10)
    assert actions(embed_in) == [("rerank", SLEEP), ("embed", WAKE)]
    at_rerank = models(view("embed", VRAM, 7.5, last_used=10, since=10), view("rerank", HOST, 1.1, last_used=2),
                       ModelView("generate", VRAM, int(7.5 * GiB), int(7.5 * GiB), 3, 0, 0, expected=True))
    assert actions(admit(at_rerank, "rerank", budget, now=11)) == [("embed", SLEEP), ("rerank", WAKE)]
    # without the expectation, least recently used decides between the two equal models
    plain = dict(at_rerank, generate=view("generate", VRAM, 7.5, last_used=3, since=0))
    assert actions(admit(plain, "rerank", budget, now=11)) == [("generate", SLEEP), ("rerank", WAKE)]


def test_models_needed_by_pending_work_go_last() -> None:
    state = models(view("embed", VRAM, 7.5, last_used=1, since=0, pending=3), view("rerank", VRAM, 1.1, last_used=5, since=0),
                   view("big", DISK, 5.5))
    assert actions(admit(state, "big", POLICY, now=10)) == [("rerank", SLEEP), ("big", LOAD)]


def test_evicted_models_unload_when_the_host_tier_is_too_small() -> None:
    small_host = ResidencyPolicy(int(13.6 * GiB), 4 * GiB, 0.0)
    state = models(view("embed", VRAM, 7.5, since=0), view("generate", DISK, 7.5))
    assert actions(admit(state, "generate", small_host, now=1)) == [("embed", UNLOAD), ("generate", LOAD)]


def test_full_host_tier_drops_its_oldest_sleeper() -> None:
    host = ResidencyPolicy(int(13.6 * GiB), 9 * GiB, 0.0)
    state = models(view("old", HOST, 2.0, last_used=1), view("embed", VRAM, 7.5, last_used=2, since=0),
                   view("generate", DISK, 7.5))
    assert actions(admit(state, "generate", host, now=5)) == [("old", DROP_HOST), ("embed", SLEEP), ("generate", LOAD)]


def test_cooldown_defers_evicting_a_busy_model() -> None:
    state = models(view("embed", VRAM, 7.5, since=9.0, pending=4), view("generate", DISK, 7.5, pending=1))
    decision = admit(state, "generate", POLICY, now=10.0)
    assert decision == Deferred(("embed",), until=11.0)
    assert actions(admit(state, "generate", POLICY, now=11.5)) == [("embed", SLEEP), ("generate", LOAD)]
    assert actions(admit(state, "generate", POLICY, now=10.0, urgent=True)) == [("embed", SLEEP), ("generate", LOAD)]


def test_an_idle_model_is_held_only_as_long_as_bringing_it_back_would_take() -> None:
    """Ski rental: inside its cooldown an idle model (nothing pending) is kept for more work at most as long as its
    measured return (wake or load) takes; a busy one for the whole cooldown."""
    waiting = view("generate", DISK, 7.5, pending=1)
    just_used = models(replace(view("embed", VRAM, 7.5, last_used=9.8, since=9.0), return_s=0.4), waiting)
    assert admit(just_used, "generate", POLICY, now=10.0) == Deferred(("embed",), until=pytest.approx(10.2))
    assert actions(admit(just_used, "generate", POLICY, now=10.25)) == [("embed", SLEEP), ("generate", LOAD)]
    long_idle = models(replace(view("embed", VRAM, 7.5, last_used=9.2, since=9.0), return_s=0.4), waiting)
    assert actions(admit(long_idle, "generate", POLICY, now=10.0)) == [("embed", SLEEP), ("generate", LOAD)]
    costly = models(replace(view("embed", VRAM, 7.5, last_used=9.2, since=9.0), return_s=5.0), waiting)
    assert admit(costly, "generate", POLICY, now=10.0) == Deferred(("embed",), until=11.0)   # the cooldown ends first


def test_activation_headroom_counts() -> None:
    state = models(view("embed", VRAM, 7.5, since=0), view("rerank", VRAM, 1.1, since=0, last_used=3))
    assert actions(admit(state, "embed", POLICY, now=10, extra_bytes=6 * GiB)) == [("rerank", SLEEP)]
    with pytest.raises(BudgetExceeded, match="embed"):
        admit(state, "embed", POLICY, now=10, extra_bytes=7 * GiB)


def test_prewarm_only_when_it_costs_nothing_busy() -> None:
    idle = models(view("embed", VRAM, 7.5, since=0), view("rerank", HOST, 1.1))
    assert prewarm(idle, "rerank", POLICY, now=10) == [Move("rerank", WAKE, "prewarm: needed by pending work")]
    busy = models(view("embed", VRAM, 7.5, since=0, pending=2), view("generate", DISK, 7.5))
    assert prewarm(busy, "generate", POLICY, now=10) == []
    cooling = models(replace(view("embed", VRAM, 7.5, last_used=9.8, since=9.5), return_s=0.5),
                     view("generate", DISK, 7.5))
    assert prewarm(cooling, "generate", POLICY, now=10) == []
    assert prewarm(idle, "embed", POLICY, now=10) == []
    # an urgent question's own next stage: the idle embedder's cooldown does not hold it, pending work still does
    assert actions(prewarm(cooling, "generate", POLICY, now=10, urgent=True)) == [("embed", SLEEP), ("generate", LOAD)]
    assert prewarm(cooling, "generate", POLICY, now=10, urgent=True)[-1].reason.startswith("prewarm: ")
    assert prewarm(busy, "generate", POLICY, now=10, urgent=True) == []


def test_trim_to_budget_evicts_idle_then_least_recently_used() -> None:
    from scheduler.residency import trim_to_budget

    state = models(view("new", VRAM, 9.0, last_used=9), view("busy", VRAM, 4.0, last_used=1, pending=2),
                   view("idle", VRAM, 3.0, last_used=5))
    assert actions(trim_to_budget(state, "new", POLICY, "measured larger")) == [("idle", SLEEP)]
    fits = models(view("new", VRAM, 9.0), view("idle", VRAM, 3.0))
    assert trim_to_budget(fits, "new", POLICY, "measured larger") == []
