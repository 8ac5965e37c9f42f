import pytest

from ragq.errors import BudgetExceeded
from scheduler.residency import Resident, plan_admission

GiB = 2**30


def resident(**models: tuple[float, float]) -> dict[str, Resident]:
    return {name: Resident(name, int(size * GiB), used) for name, (size, used) in models.items()}


def test_fits_without_eviction() -> None:
    assert plan_admission(resident(embed=(7.5, 1.0)), "rerank", int(1.1 * GiB), int(13.6 * GiB)) == []


def test_evicts_least_recently_used_first() -> None:
    current = resident(embed=(7.5, 5.0), rerank=(1.1, 1.0))
    # the generator (7.5) needs room: rerank was used longest ago, but evicting it is not enough; then embed
    assert plan_admission(current, "generate", int(7.5 * GiB), int(13.6 * GiB)) == ["rerank", "embed"]
    # with a bigger budget, evicting rerank alone would not do either; with 16 GiB, evicting rerank does
    assert plan_admission(current, "generate", int(7.5 * GiB), int(16 * GiB)) == ["rerank"]


def test_prefers_idle_models_over_busy_ones() -> None:
    current = resident(embed=(7.5, 1.0), rerank=(1.1, 5.0))
    assert plan_admission(current, "big", int(7 * GiB), int(13.6 * GiB), busy={"embed"}) == ["rerank", "embed"]
    assert plan_admission(current, "mid", int(5.5 * GiB), int(13.6 * GiB), busy={"embed"}) == ["rerank"]


def test_model_larger_than_budget_is_refused() -> None:
    with pytest.raises(BudgetExceeded, match="huge"):
        plan_admission({}, "huge", 20 * GiB, 16 * GiB)


def test_already_resident_incoming_is_not_counted_twice() -> None:
    current = resident(embed=(7.5, 1.0))
    assert plan_admission(current, "embed", int(7.5 * GiB), 8 * GiB) == []
