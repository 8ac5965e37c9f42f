"""Batch forming and the adaptive batch size: pure functions and a small state machine, no engine."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.batching import (
    BACKGROUND, URGENT, BatchLimits, BatchTuner, PassCostModel, Pending, expired, form_batch, length_groups,
    padded_tokens,
    should_wait_for_fuller_batch,
)

LIMITS = BatchLimits(max_items=8, max_tokens=4096, urgent_items=4)


def p(key: int, lengths: list[int], role: str = "embed", priority: int = BACKGROUND, enqueued: float = 0.0,
      group: object = (), deadline: float | None = None) -> Pending:
    return Pending(key, role, group, priority, enqueued, tuple(enumerate(lengths)), deadline)


def test_urgent_batch_is_small_and_holds_only_urgent_items() -> None:
    pending = [p(1, [10] * 20, enqueued=0.0), p(2, [10] * 6, priority=URGENT, enqueued=5.0),
               p(3, [10], priority=URGENT, enqueued=6.0)]
    assert form_batch(pending, "embed", LIMITS) == [(2, [0, 1, 2, 3])]


def test_urgent_requests_share_a_batch() -> None:
    pending = [p(2, [10, 10], priority=URGENT, enqueued=5.0), p(3, [10], priority=URGENT, enqueued=6.0)]
    assert form_batch(pending, "embed", LIMITS) == [(2, [0, 1]), (3, [0])]


def test_background_batches_fill_across_requests_up_to_the_count() -> None:
    pending = [p(1, [10] * 5), p(2, [10] * 5, enqueued=1), p(3, [10] * 5, enqueued=2)]
    plan = form_batch(pending, "embed", LIMITS)
    assert sum(len(i) for _, i in plan) == 8 and plan[0] == (1, [0, 1, 2, 3, 4])


def test_background_requests_finish_one_after_another_not_all_together() -> None:
    """Eight ingest tasks' requests of 70 items, batches of 128: every batch finishes the oldest request, so the
    tasks' threads return to store and fetch work staggered while the engine keeps running the others (run on a
    GPU, requests mixed by length all finished in the same batch and the engine idled while they stored)."""
    import random

    rng = random.Random(3)
    pending = [p(k, [rng.randint(150, 256) for _ in range(70)], enqueued=float(k)) for k in range(8)]
    limits = BatchLimits(max_items=128, max_tokens=128 * 256, urgent_items=4)
    finished_per_batch = []
    while pending:
        plan = form_batch(pending, "embed", limits)
        taken = dict(plan)
        assert taken[pending[0].key] == [i for i, _ in pending[0].items]  # the oldest goes in whole
        left = [Pending(q.key, q.role, q.group, q.priority, q.enqueued,
                        tuple(item for item in q.items if item[0] not in set(taken.get(q.key, ()))))
                for q in pending]
        finished_per_batch.append(sum(1 for q in left if not q.items))
        pending = [q for q in left if q.items]
    assert all(n >= 1 for n in finished_per_batch) and len(finished_per_batch) >= 5


def test_background_groups_similar_lengths_around_the_oldest_item() -> None:
    lengths = [100, 10, 500, 110, 12, 95, 480, 105]
    plan = form_batch([p(1, lengths)], "embed", BatchLimits(max_items=4, max_tokens=100_000, urgent_items=4))
    chosen = sorted(lengths[i] for i in plan[0][1])
    assert chosen == [95, 100, 105, 110]


def test_padded_token_cap_is_respected_and_a_long_item_runs_alone() -> None:
    limits = BatchLimits(max_items=64, max_tokens=1000, urgent_items=8)
    plan = form_batch([p(1, [200] * 10)], "embed", limits)
    assert padded_tokens([200] * len(plan[0][1])) <= 1000 and len(plan[0][1]) == 5
    assert form_batch([p(1, [5000, 10])], "embed", limits) == [(1, [0])]


def test_other_roles_and_groups_wait() -> None:
    pending = [p(1, [10], role="rerank"), p(2, [10], enqueued=1), p(3, [10], role="rerank", group=("x",), enqueued=2)]
    assert form_batch(pending, "rerank", LIMITS) == [(1, [0])]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 600), min_size=1, max_size=12), st.sampled_from([URGENT, BACKGROUND])),
                min_size=1, max_size=8),
       st.integers(1, 32), st.integers(600, 8000), st.integers(1, 8))
def test_batches_respect_caps_and_always_include_the_head(requests, max_items, max_tokens, urgent_items) -> None:  # type: ignore[no-untyped-def]
    pending = [p(k, lengths, priority=prio, enqueued=float(k)) for k, (lengths, prio) in enumerate(requests)]
    limits = BatchLimits(max_items, max_tokens, urgent_items)
    plan = form_batch(pending, "embed", limits)
    by_key = {q.key: q for q in pending}
    chosen = [dict(by_key[k].items)[i] for k, indices in plan for i in indices]
    head = min(pending, key=lambda q: (q.priority, q.enqueued, q.key))
    assert plan and plan[0][0] == head.key and 0 in plan[0][1]  # the oldest, most urgent item always goes
    cap = urgent_items if head.priority == URGENT else max_items
    assert len(chosen) <= cap
    assert len(chosen) == 1 or padded_tokens(chosen) <= max_tokens
    if head.priority == URGENT:  # nothing but urgent work rides along
        assert all(by_key[k].priority == URGENT for k, _ in plan)


def test_expired() -> None:
    assert expired([p(1, [1], deadline=1.0), p(2, [1], deadline=3.0), p(3, [1])], now=2.0) == [1]


def test_max_queue_delay_waits_for_a_fuller_background_batch() -> None:
    pending = [p(1, [10] * 3, enqueued=10.0)]
    assert should_wait_for_fuller_batch(pending, "embed", 8, now=10.002, max_queue_delay_s=0.005) > 0
    assert should_wait_for_fuller_batch(pending, "embed", 8, now=10.006, max_queue_delay_s=0.005) == 0
    assert should_wait_for_fuller_batch(pending, "embed", 3, now=10.002, max_queue_delay_s=0.005) == 0
    urgent = [p(2, [10], priority=URGENT, enqueued=10.0)]
    assert should_wait_for_fuller_batch(urgent, "embed", 8, now=10.0, max_queue_delay_s=0.005) == 0
    assert should_wait_for_fuller_batch(pending, "embed", 8, now=10.0, max_queue_delay_s=0) == 0


def feed(tuner: BatchTuner, ms_per_item: float, fixed_ms: float, batches: int) -> None:
    for _ in range(batches):
        tuner.observe(tuner.size, fixed_ms + ms_per_item * tuner.size)


def test_tuner_ramps_while_throughput_improves_and_latency_holds() -> None:
    tuner = BatchTuner(size=8, maximum=256, latency_target_ms=500)
    feed(tuner, ms_per_item=1.0, fixed_ms=20.0, batches=60)  # a fixed cost per batch: bigger is better
    assert tuner.size >= 64
    assert all(b > a for a, b, _ in tuner.changes)


def test_tuner_stops_ramping_when_larger_batches_stop_paying() -> None:
    tuner = BatchTuner(size=8, maximum=256, latency_target_ms=10_000)
    feed(tuner, ms_per_item=2.0, fixed_ms=0.0, batches=60)  # no fixed cost: throughput flat in batch size
    assert tuner.size <= 16


def test_tuner_shrinks_when_latency_passes_its_target() -> None:
    tuner = BatchTuner(size=64, maximum=256, latency_target_ms=100)
    feed(tuner, ms_per_item=3.0, fixed_ms=0.0, batches=30)  # 64 items take 192 ms
    assert tuner.size <= 33
    assert any("over the 100ms target" in why for _, _, why in tuner.changes)


def test_a_target_no_size_meets_does_not_cost_the_throughput() -> None:
    """A slow, busy device (ragq eval on a loaded 2-core machine): a fixed cost per batch, the cost per item
    rising past 24 items, an 800 ms target that no size meets. The tuner used to shrink to 1 and stay (throughput
    down ~6x); it now goes down only while that costs no throughput and settles where throughput peaks."""
    def ms(n: int) -> float:
        return 700.0 + 28.0 * n + 4.0 * max(0, n - 24) ** 2

    def rate(n: int) -> float:
        return n / ms(n)

    tuner = BatchTuner(size=64, maximum=128, latency_target_ms=800)
    sizes = []
    for _ in range(400):
        tuner.observe(tuner.size, ms(tuner.size))
        sizes.append(tuner.size)
    peak = max(range(1, 129), key=rate)
    assert rate(tuner.size) >= 0.9 * rate(peak), (tuner.size, peak, tuner.changes)
    assert min(sizes[200:]) == max(sizes[200:])   # settled, not oscillating
    assert min(sizes) >= 16                       # never down to the sizes that lose most of the throughput


def test_tuner_halves_on_oom_and_does_not_ramp_past_it() -> None:
    tuner = BatchTuner(size=64, maximum=256, latency_target_ms=1000)
    tuner.out_of_memory(64)
    assert tuner.size == 32 and tuner.ceiling == 32
    feed(tuner, ms_per_item=0.1, fixed_ms=50.0, batches=40)
    assert tuner.size == 32


def test_a_ceiling_is_lifted_after_a_while_so_one_bad_spell_does_not_pin_the_size() -> None:
    # an OOM beside another resident model, or a slow spell (a first sleep pinning host memory), once set a ceiling
    # for good: in a GPU run the embedder stayed at 7 items while 64 ran at 0.92 of the best rate
    tuner = BatchTuner(size=16, maximum=256, latency_target_ms=400, relearn_after=30)
    tuner.out_of_memory(16)
    for _ in range(tuner.window):
        tuner.observe(tuner.size, 2000.0)  # a slow spell at 8: shrink, ceiling 7
    assert tuner.size <= 7
    feed(tuner, ms_per_item=5.0, fixed_ms=20.0, batches=200)  # healthy again: 5 ms an item, 400 ms target
    assert 32 <= tuner.size <= 128  # near the largest size under the target (76), probing around it
    assert any("lifted" in why for _, _, why in tuner.changes)


def test_underfull_batches_do_not_move_the_size() -> None:
    tuner = BatchTuner(size=32, maximum=256, latency_target_ms=10)
    for _ in range(50):
        tuner.observe(3, 500.0)
    assert tuner.size == 32


def test_far_under_the_target_the_tuner_ramps_after_two_batches() -> None:
    tuner = BatchTuner(size=8, maximum=256, latency_target_ms=400)
    feed(tuner, ms_per_item=5.0, fixed_ms=20.0, batches=6)  # 8, 16, 32 items take 60, 100, 180 ms
    assert tuner.size == 64
    feed(tuner, ms_per_item=5.0, fixed_ms=20.0, batches=5)  # 64 take 340 ms: near the target, a full window
    assert tuner.size == 64


def test_background_batches_yield_to_recent_urgent_work() -> None:
    from scheduler.batching import yield_to_urgent

    assert yield_to_urgent(64, last_urgent=None, now=100.0, recent_s=10.0) == 64
    assert yield_to_urgent(64, last_urgent=95.0, now=100.0, recent_s=10.0) == 32
    assert yield_to_urgent(64, last_urgent=89.0, now=100.0, recent_s=10.0) == 64
    assert yield_to_urgent(1, last_urgent=99.0, now=100.0, recent_s=10.0) == 1
    assert yield_to_urgent(64, last_urgent=99.0, now=100.0, recent_s=0.0) == 64
    # with a measured rate: batches of about yield_ms (180 items/s, 150 ms: 27 items), never above half
    assert yield_to_urgent(128, last_urgent=99.0, now=100.0, recent_s=10.0, rate_per_s=180.0, yield_ms=150) == 27
    assert yield_to_urgent(16, last_urgent=99.0, now=100.0, recent_s=10.0, rate_per_s=180.0, yield_ms=150) == 8
    assert yield_to_urgent(128, last_urgent=99.0, now=100.0, recent_s=10.0, rate_per_s=2.0, yield_ms=150) == 1
    assert yield_to_urgent(128, last_urgent=80.0, now=100.0, recent_s=10.0, rate_per_s=180.0, yield_ms=150) == 128


def test_the_rate_at_a_size_falls_back_to_the_nearest_measured_size_below() -> None:
    tuner = BatchTuner(size=8, maximum=256, latency_target_ms=400)
    assert tuner.rate() is None
    feed(tuner, ms_per_item=5.0, fixed_ms=20.0, batches=4)  # 8 and 16 measured; now at 32
    assert tuner.size == 32 and tuner.rate() == tuner.rate(16) and tuner.rate(8) < tuner.rate(16)
    assert tuner.rate(4) is None


def _passes_cost(lengths: list[int], groups: list[list[int]], overhead: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=9), st.integers(0, 200))
def test_length_groups_is_the_cheapest_split_into_sorted_passes(lengths: list[int], overhead: int) -> None:
    """Against every split of the length-sorted items into contiguous passes (brute force)."""
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))   # each item in exactly one pass
    ordered = sorted(lengths)
    n = len(ordered)
    best = None
    for mask in range(1 << (n - 1)):   # bit k set: a cut after the k-th item
        cost, start = 0, 0
        for k in range(n):
            if k == n - 1 or mask >> k & 1:
                cost += (k + 1 - start) * ordered[k] + overhead
                start = k + 1
        best = cost if best is None else min(best, cost)
    assert _passes_cost(lengths, groups, overhead) == best
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)   # passes shortest first, each sorted


def test_length_groups_cuts_a_mixed_batch_only_where_padding_outweighs_a_pass() -> None:
    lengths = [140 + (i * 37) % 121 for i in range(128)]   # 140..260, as the stack's chunks
    assert length_groups(lengths, 10**9) == [sorted(range(128), key=lambda i: (lengths[i], i))]   # one pass
    groups = length_groups(lengths, 1024)
    assert 2 <= len(groups) <= 6
    real = sum(lengths)
    assert real / padded_tokens(lengths) < 0.8 < 0.9 < real / sum(padded_tokens([lengths[i] for i in g]) for g in groups)
    assert length_groups([50] * 10, 0) == [list(range(10))]   # equal lengths never gain from a cut
    assert length_groups([], 1024) == []


def test_pass_cost_model_finds_the_fixed_cost_of_a_pass_in_tokens() -> None:
    import random

    rng = random.Random(3)
    model = PassCostModel()
    assert model.overhead_tokens() is None                      # nothing seen yet
    for _ in range(40):   # 0.02 ms a token, 60 ms a pass: one pass costs what 3000 tokens cost
        padded, passes = rng.randint(2000, 30000), rng.randint(1, 4)
        model.observe(padded, passes, (0.02 * padded + 60 * passes) * rng.uniform(0.97, 1.03))
    assert 2500 <= (model.overhead_tokens() or 0) <= 3500
    single = PassCostModel()   # batches of one pass each still tell the fixed cost, when their sizes vary
    for padded in range(2000, 30000, 2000):
        single.observe(padded, 1, 0.02 * padded + 60)
    assert 2900 <= (single.overhead_tokens() or 0) <= 3100
    same = PassCostModel()     # no variation: nothing to tell tokens from passes
    for _ in range(20):
        same.observe(8000, 2, 200.0)
    assert same.overhead_tokens() is None
    free = PassCostModel()     # passes cost nothing (or the fit says less): never a negative cost
    for padded in range(2000, 30000, 2000):
        free.observe(padded, 1 + padded % 3, 0.02 * padded)
    assert free.overhead_tokens() == 0
