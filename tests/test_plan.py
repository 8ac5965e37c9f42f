"""The planner (scheduler/plan.py) driven with invented snapshots: waits, admissions, room for larger batches,
fuller-batch waits, urgent first, and a model too large for the budget."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from scheduler.batching import BACKGROUND, URGENT, BatchTuner, Pending
from scheduler.footprints import ModelProfile
from scheduler.plan import EngineSnapshot, FailRole, RoleConfig, RunBatch, Wait, plan
from scheduler.residency import DISK, SLEEP, VRAM, WAKE, HOST, ModelView, ResidencyPolicy

MiB = 2**20


def pending(key: int, role: str, items: int, priority: int = BACKGROUND, enqueued: float = 0.0,
            tokens: int = 10) -> Pending:
    return Pending(key, role, (), priority, enqueued, tuple((i, tokens) for i in range(items)))


def snapshot(pending_list: list[Pending], models: dict[str, ModelView], *, now: float = 100.0,
             budget_mib: float = 100, cooldown_s: float = 0.0, tuner_size: int = 8,
             footprints: dict[str, ModelProfile | None] | None = None, delay_s: float = 0.0,
             **kwargs: Any) -> EngineSnapshot:
    roles = {name: RoleConfig(name, batch_size=64, urgent_batch=4, max_batch_tokens=100_000,
                              max_queue_delay_s=delay_s) for name in models}
    return EngineSnapshot(
        now=now, pending=pending_list, roles=roles, models=models,
        tuners={name: BatchTuner(size=tuner_size, maximum=64, latency_target_ms=1000.0) for name in models},
        footprints=footprints or {}, swap_in_s={name: 0.1 for name in models},
        policy=ResidencyPolicy(int(budget_mib * MiB), 1000 * MiB, cooldown_s), **kwargs)


def model(name: str, tier: str, mib: float, *, since: float | None = None, last_used: float = 0.0,
          waiting: int = 0) -> ModelView:
    return ModelView(name, tier, int(mib * MiB), int(mib * MiB), last_used, since, waiting)


def test_nothing_pending_waits_for_a_message() -> None:
    decision = plan(snapshot([], {"embed": model("embed", VRAM, 10)}))
    assert decision == Wait(float("inf"))


def test_a_resident_model_runs_its_work_with_no_moves() -> None:
    decision = plan(snapshot([pending(1, "embed", 3)], {"embed": model("embed", VRAM, 10, waiting=1)}))
    assert isinstance(decision, RunBatch)
    assert decision.role == "embed" and decision.moves == () and decision.room == ()
    assert decision.take == ((1, (0, 1, 2)),)


def test_background_work_waits_for_a_model_in_its_cooldown() -> None:
    """The embedder came in a second ago and would take 10 s to bring back: its 5 s cooldown holds."""
    models = {"embed": replace(model("embed", VRAM, 60, since=99.0, last_used=99.5), return_s=10.0),
              "rerank": model("rerank", DISK, 60, waiting=1)}
    decision = plan(snapshot([pending(1, "rerank", 2)], models, cooldown_s=5.0))
    assert isinstance(decision, Wait) and decision.until == 104.0


def test_urgent_work_overrides_the_cooldown_and_the_plan_says_which_moves() -> None:
    models = {"embed": model("embed", VRAM, 60, since=99.0, last_used=99.5),
              "rerank": model("rerank", HOST, 60, waiting=1)}
    decision = plan(snapshot([pending(1, "rerank", 2, priority=URGENT)], models, cooldown_s=5.0))
    assert isinstance(decision, RunBatch)
    assert [(m.model, m.action) for m in decision.moves] == [("embed", SLEEP), ("rerank", WAKE)]


def test_urgent_requests_are_planned_before_background_ones() -> None:
    work = [pending(1, "embed", 6, enqueued=1.0), pending(2, "embed", 1, priority=URGENT, enqueued=50.0)]
    decision = plan(snapshot(work, {"embed": model("embed", VRAM, 10, waiting=2)}))
    assert isinstance(decision, RunBatch) and decision.take[0] == (2, (0,))


def test_a_model_larger_than_the_budget_fails_its_role() -> None:
    decision = plan(snapshot([pending(1, "embed", 1)], {"embed": model("embed", DISK, 200, waiting=1)}))
    assert isinstance(decision, FailRole) and decision.role == "embed" and "budget" in str(decision.error)


def footprint(name: str, per_item_mib: float) -> ModelProfile:
    profile = ModelProfile(name, "cpu", "float32", 10 * MiB)
    for batch in (2, 4, 8, 16):
        profile.observe(batch, 10, int(batch * per_item_mib * MiB))
    return profile


def test_idle_models_go_to_make_room_for_the_tuned_background_batch() -> None:
    """8 items need 40 MiB of activations; 10 + 60 MiB resident leave 30: the idle reranker (unused for the
    cooldown) is planned to sleep first, and the batch is formed at the tuner's size."""
    models = {"embed": model("embed", VRAM, 10, waiting=1), "rerank": model("rerank", VRAM, 60, last_used=1.0)}
    decision = plan(snapshot([pending(1, "embed", 8)], models, footprints={"embed": footprint("embed", 5)},
                             cooldown_s=5.0))
    assert isinstance(decision, RunBatch)
    assert [(m.model, m.action) for m in decision.room] == [("rerank", SLEEP)]
    assert decision.max_items == 8 and len(decision.take[0][1]) == 8


def measured_tuner(rate_at_4: float, rate_at_8: float) -> BatchTuner:
    """A tuner at size 8 (its maximum) that measured full batches of 4 and of 8 at these rates (items/s)."""
    tuner = BatchTuner(size=4, maximum=8, latency_target_ms=1000.0)
    for _ in range(2):
        tuner.observe(4, 4000.0 / rate_at_4)
    assert tuner.size == 8   # far under its latency target: it doubled
    for _ in range(2):
        tuner.observe(8, 8000.0 / rate_at_8)
    assert tuner.size == 8 and tuner.measured(8) is not None
    return tuner


def test_residents_stay_when_the_capped_batch_costs_little_throughput() -> None:
    """The reranker leaves room for 4 items of 8: batches of 4 were measured at 95 % of batches of 8's rate, so it
    stays (a question would pay its wake) and the batch runs at 4; at 60 % it goes to sleep as before."""
    models = {"embed": model("embed", VRAM, 10, waiting=1), "rerank": model("rerank", VRAM, 60, last_used=1.0)}
    work = [pending(1, "embed", 8)]
    for rate_at_4, slept in ((95.0, False), (60.0, True)):
        base = snapshot(work, models, footprints={"embed": footprint("embed", 5)}, cooldown_s=5.0, budget_mib=95)
        decision = plan(replace(base, tuners={**base.tuners, "embed": measured_tuner(rate_at_4, 100.0)}))
        assert isinstance(decision, RunBatch)
        assert [(m.model, m.action) for m in decision.room] == ([("rerank", SLEEP)] if slept else [])
        assert decision.max_items == (8 if slept else 4)


def test_no_room_is_made_while_urgent_work_of_the_role_waits() -> None:
    models = {"embed": model("embed", VRAM, 10, waiting=1), "rerank": model("rerank", VRAM, 60, last_used=1.0)}
    work = [pending(1, "embed", 8, priority=URGENT)]
    decision = plan(snapshot(work, models, footprints={"embed": footprint("embed", 5)}, cooldown_s=5.0))
    assert isinstance(decision, RunBatch) and decision.room == ()
    assert decision.max_items < 8     # capped by what fits beside the resident reranker


def test_a_background_batch_that_is_not_full_waits_its_queue_delay() -> None:
    work = [pending(1, "embed", 2, enqueued=99.99)]
    decision = plan(snapshot(work, {"embed": model("embed", VRAM, 10, waiting=1)}, delay_s=0.05))
    assert isinstance(decision, Wait) and abs(decision.until - 100.04) < 1e-9


def test_recent_urgent_work_halves_background_batches() -> None:
    work = [pending(1, "embed", 20)]
    quiet = plan(snapshot(work, {"embed": model("embed", VRAM, 10, waiting=1)}))
    after_urgent = plan(snapshot(work, {"embed": model("embed", VRAM, 10, waiting=1)}, last_urgent=99.0,
                                 urgent_yield_s=3.0))
    assert isinstance(quiet, RunBatch) and isinstance(after_urgent, RunBatch)
    assert quiet.max_items == 8 and after_urgent.max_items == 4
