"""Property tests over random mixed workloads, on a simulated clock: the engine never holds more than its budget,
every request completes with its own outputs, and with a cooldown an alternating load does not thrash."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.batching import BACKGROUND, URGENT
from tests.fakes import MiB, FakeClock, FakeDevice, FakeModel
from workers.engine import Engine
from workers.models import ModelSpec

ROLES = ("embed", "rerank", "generate")
BUDGET = 16 * MiB

request_st = st.tuples(
    st.sampled_from(ROLES), st.integers(1, 24), st.sampled_from([URGENT, BACKGROUND]), st.floats(0, 3),
)


def simulate(requests: list[tuple[str, int, int, float]], sizes: dict[str, float], guesses: dict[str, float],
             act_per_item: int, host_mib: float, cooldown_s: float, load_s: float, batch: int,
             ) -> tuple[Engine, FakeDevice, list[Any], list[str], FakeClock]:
    clock = FakeClock()
    device = FakeDevice(BUDGET)
    loads: list[str] = []
    specs = {r: ModelSpec(role=r, path=__import__("pathlib").Path("/m"), name=r, batch_size=batch,
                          initial_batch=max(1, batch // 2), estimate_bytes=int(guesses[r] * MiB)) for r in ROLES}

    def loader(spec: ModelSpec, _device: str) -> FakeModel:
        clock.advance(load_s)
        loads.append(spec.name)
        real = ModelSpec(role=spec.role, path=spec.path, name=spec.name, batch_size=batch,
                         estimate_bytes=int(sizes[spec.name] * MiB))
        return FakeModel(real, device, clock, run_s_per_item=0.002, act_bytes_per_item=act_per_item,
                         wake_s=load_s / 10)

    engine = Engine("sim", specs, loader, BUDGET, host_budget_bytes=int(host_mib * MiB), cooldown_s=cooldown_s,
                    clock=clock, waiter=clock.advance)
    arrivals = sorted(enumerate(requests), key=lambda r: r[1][3])
    submitted: list[Any] = [None] * len(requests)
    steps = 0
    while arrivals or engine.pending_count():
        while arrivals and arrivals[0][1][3] <= clock():
            index, (role, n, priority, _) = arrivals.pop(0)
            submitted[index] = engine.submit(role, [f"{index}.{i}" for i in range(n)], priority=priority)
        if engine.pending_count():
            engine.step()
        elif arrivals:
            clock.now = arrivals[0][1][3]
        steps += 1
        assert steps < 100_000, "the engine made no progress"
    return engine, device, submitted, loads, clock


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request_st, min_size=1, max_size=40),
    sizes=st.fixed_dictionaries({r: st.floats(1, 9) for r in ROLES}),
    guess_factor=st.floats(0.5, 1.5),
    host_mib=st.sampled_from([0, 8, 64]),
    cooldown_s=st.sampled_from([0.0, 0.05, 0.5]),
    batch=st.integers(1, 16),
)
def test_budget_holds_and_every_request_completes(requests, sizes, guess_factor, host_mib, cooldown_s, batch) -> None:  # type: ignore[no-untyped-def]
    act_per_item = int((16 - max(sizes.values())) * MiB / 8)  # some batches run out of memory; one item always fits
    guesses = {r: s * guess_factor for r, s in sizes.items()}
    engine, device, futures, _, _ = simulate(requests, sizes, guesses, act_per_item, host_mib, cooldown_s, 0.05, batch)
    assert device.peak <= BUDGET
    for index, future in enumerate(futures):
        role, n, _, _ = requests[index]
        assert future.done()
        assert future.result().outputs == [f"{role}:{index}.{i}" for i in range(n)]
    assert sum(engine.resident_models().values()) <= BUDGET


@settings(max_examples=15, deadline=None)
@given(cooldown_s=st.sampled_from([0.5, 1.0, 2.0]), spacing_s=st.floats(0.01, 0.1))
def test_cooldown_stops_alternating_load_from_thrashing(cooldown_s: float, spacing_s: float) -> None:
    # embed and generate alternate; only one fits at a time; each load costs 0.3 s
    requests = [("embed" if i % 2 == 0 else "generate", 1, BACKGROUND, i * spacing_s) for i in range(200)]
    sizes = {"embed": 9.0, "rerank": 1.0, "generate": 9.0}
    _, _, futures, loads, clock = simulate(requests, sizes, sizes, 0, 0, cooldown_s, 0.3, 8)
    assert all(f.done() for f in futures)
    swaps = loads.count("embed") + loads.count("generate")
    assert swaps <= clock() / cooldown_s + 2, f"{swaps} loads in {clock():.1f}s with a {cooldown_s}s cooldown"
    _, _, _, thrash_loads, _ = simulate(requests, sizes, sizes, 0, 0, 0.0, 0.3, 8)
    assert swaps < (thrash_loads.count("embed") + thrash_loads.count("generate"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(ROLES), st.integers(1, 30), st.sampled_from([URGENT, BACKGROUND]),
                          st.floats(0, 2)), min_size=2, max_size=30),
       st.sampled_from([0.0, 0.5]))
def test_pending_urgent_work_is_preceded_by_nothing_but_the_running_batch(requests, cooldown_s) -> None:  # type: ignore[no-untyped-def]
    """Submissions happen between micro-batches here, so from an urgent submission until that request is done,
    every micro-batch the engine runs must be urgent work."""
    clock = FakeClock()
    device = FakeDevice(BUDGET)
    runs: list[tuple[str, list[Any]]] = []
    specs = {r: ModelSpec(role=r, path=__import__("pathlib").Path("/m"), name=r, batch_size=8, initial_batch=8,
                          urgent_batch=4, estimate_bytes=7 * MiB) for r in ROLES}
    engine = Engine("sim", specs, lambda s, d: FakeModel(s, device, clock, run_s_per_item=0.01, runs=runs),
                    BUDGET, host_budget_bytes=64 * MiB, cooldown_s=cooldown_s, clock=clock, waiter=clock.advance)
    arrivals = sorted(enumerate(requests), key=lambda r: r[1][3])
    futures: dict[int, Any] = {}
    while arrivals or engine.pending_count():
        while arrivals and arrivals[0][1][3] <= clock():
            index, (role, n, priority, _) = arrivals.pop(0)
            tag = "u" if priority == URGENT else "b"
            futures[index] = engine.submit(role, [f"{tag}{index}.{i}" for i in range(n)], priority=priority)
        urgent_waiting = any(not f.done() for i, f in futures.items() if requests[i][2] == URGENT)
        before = len(runs)
        if engine.pending_count():
            engine.step()
        elif arrivals:
            clock.now = arrivals[0][1][3]
        if urgent_waiting and len(runs) > before:
            assert all(str(item).startswith("u") for item in runs[-1][1]), runs[-1]
    assert all(f.done() and not f.exception() for f in futures.values())
