"""The engine with a fake device and fake models: batching, priority, expiry, residency, OOM, prewarm."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from ragq.core.errors import BudgetExceeded, RequestExpired
from scheduler.batching import BACKGROUND, URGENT
from scheduler.residency import VRAM
from tests.fakes import MiB, FakeClock, FakeDevice, FakeModel, spec
from workers.backends import BatchOutput
from workers.engine import Engine, EngineConfig
from workers.observer import EventLog
from workers.models import ModelSpec
from workers.profiles import MemoryProfileStore


class Harness:
    def __init__(self, budget_mib: float = 100, batch: int = 8, sizes: dict[str, float] | None = None,
                 host_mib: float = 1000, cooldown_s: float = 0.0, clock: Any = None, real_time: bool = True,
                 capacity_mib: float | None = None, config: EngineConfig | None = None, **model_kwargs: Any) -> None:
        sizes = sizes or {}
        self.specs = {role: spec(role, sizes.get(role, 1), batch) for role in ("embed", "rerank", "generate")}
        self.device = FakeDevice(int((capacity_mib or budget_mib) * MiB))
        self.runs: list[tuple[str, list[Any]]] = []
        self.loads: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.timeline: list[tuple[str, float, float]] = []
        self.clock = clock or time.monotonic
        self.profiles = MemoryProfileStore()
        self.model_kwargs = model_kwargs

        def loader(model_spec: ModelSpec, device: str) -> FakeModel:
            self.loads.append(model_spec.name)
            return FakeModel(model_spec, self.device, self.clock, real_time=real_time, runs=self.runs,
                             timeline=self.timeline, **self.model_kwargs)

        self.engine = Engine(
            "fake", self.specs, loader, int(budget_mib * MiB), host_budget_bytes=int(host_mib * MiB),
            cooldown_s=cooldown_s, observer=EventLog(self.events), profiles=self.profiles,
            clock=self.clock, waiter=self.clock.advance if isinstance(self.clock, FakeClock) else None,
            **({"config": config} if config is not None else {}),
        )

    def kinds(self) -> list[tuple[str, str]]:
        return [(e["event"], e["model"]) for e in self.events]


def test_requests_from_many_callers_share_one_micro_batch() -> None:
    h = Harness(batch=16)
    futures = [h.engine.submit("embed", [f"t{i}a", f"t{i}b"]) for i in range(5)]
    h.engine.start()
    results = [f.result(5) for f in futures]
    h.engine.stop()
    assert h.runs == [("embed", [f"t{i}{s}" for i in range(5) for s in "ab"])]
    assert results[2].outputs == ["embed:t2a", "embed:t2b"]
    assert all(r.batch_size == 10 for r in results)
    assert h.loads == ["embed"]


def test_large_request_is_split_into_micro_batches_and_reassembled() -> None:
    h = Harness(batch=4)
    h.engine.start()
    result = h.engine.run("embed", [str(i) for i in range(10)])
    h.engine.stop()
    assert [len(items) for _, items in h.runs] == [4, 4, 2]
    assert result.outputs == [f"embed:{i}" for i in range(10)]


def test_urgent_jumps_ahead_at_a_micro_batch_boundary() -> None:
    gate = threading.Event()
    h = Harness(batch=2, gate=gate)
    h.engine.start()
    background = h.engine.submit("embed", [f"b{i}" for i in range(8)], priority=BACKGROUND)
    time.sleep(0.1)  # the first background micro-batch is now running, held by the gate
    urgent = h.engine.submit("embed", ["u0"], priority=URGENT)
    gate.set()
    urgent.result(5)
    background.result(5)
    h.engine.stop()
    batches = [items for _, items in h.runs]
    assert batches[0] == ["b0", "b1"]
    assert batches[1][0] == "u0"  # right after the running micro-batch, not after the whole backlog


def test_models_sleep_lru_to_stay_in_budget_and_wake_later() -> None:
    h = Harness(budget_mib=10, sizes={"embed": 6, "rerank": 3, "generate": 6})
    h.engine.start()
    h.engine.run("embed", ["a"])
    h.engine.run("rerank", ["b"])
    assert set(h.engine.resident_models()) == {"embed", "rerank"}
    h.engine.run("generate", ["c"])
    tiers = h.engine.tiers()
    assert tiers == {"embed": "host", "rerank": "vram", "generate": "vram"}
    h.engine.run("embed", ["d"])
    h.engine.stop()
    assert h.loads == ["embed", "rerank", "generate"]  # embed came back by a wake, not a second load
    assert ("sleep", "embed") in h.kinds() and ("wake", "embed") in h.kinds() and ("evict", "embed") in h.kinds()
    assert h.device.peak <= 10 * MiB


def test_model_larger_than_budget_fails_its_requests_only() -> None:
    h = Harness(budget_mib=4, sizes={"generate": 8})
    h.engine.start()
    with pytest.raises(BudgetExceeded):
        h.engine.run("generate", ["x"])
    assert h.engine.run("embed", ["y"]).outputs == ["embed:y"]
    h.engine.stop()


def test_expired_requests_never_run() -> None:
    h = Harness()
    late = h.engine.submit("embed", ["late"], priority=URGENT, deadline=time.monotonic() - 0.01)
    on_time = h.engine.submit("embed", ["fine"], priority=URGENT, deadline=time.monotonic() + 30)
    h.engine.start()
    with pytest.raises(RequestExpired):
        late.result(5)
    assert on_time.result(5).outputs == ["embed:fine"]
    h.engine.stop()
    assert all("late" not in items for _, items in h.runs)


def test_failing_batch_fails_its_requests_and_the_engine_goes_on() -> None:
    h = Harness(fail_on="poison")
    h.engine.start()
    with pytest.raises(RuntimeError, match="poison"):
        h.engine.run("embed", ["poison"])
    assert h.engine.run("embed", ["ok"]).outputs == ["embed:ok"]
    h.engine.stop()


def test_oom_splits_the_batch_evicts_idle_models_and_loses_nothing() -> None:
    # 16 items x 1 MiB of activations do not fit next to the weights; 4 do
    h = Harness(budget_mib=12, sizes={"embed": 4, "rerank": 3}, batch=16, act_bytes_per_item=MiB)
    h.engine.start()
    h.engine.run("rerank", ["r"])  # resident and idle: the first thing to go on OOM
    result = h.engine.run("embed", [str(i) for i in range(16)])
    h.engine.stop()
    assert result.outputs == [f"embed:{i}" for i in range(16)]
    assert h.engine.stats.ooms >= 1
    assert ("oom", "embed") in h.kinds() and ("evict", "rerank") in h.kinds()
    assert sorted(int(i) for _, items in h.runs if _ == "embed" for i in items) == list(range(16))
    assert h.device.peak <= 12 * MiB


def test_an_oom_that_evicting_an_idle_model_cures_does_not_shrink_the_batch_size() -> None:
    # 6 items fit beside the embedder alone, not beside the idle reranker too: the room was the reranker's
    h = Harness(budget_mib=12, sizes={"embed": 4, "rerank": 3}, batch=8, act_bytes_per_item=MiB)
    h.engine.start()
    h.engine.run("rerank", ["r"])
    result = h.engine.run("embed", [str(i) for i in range(6)])
    h.engine.stop()
    assert result.outputs == [f"embed:{i}" for i in range(6)]
    assert [len(items) for name, items in h.runs if name == "embed"] == [6]  # retried whole, not split
    assert h.engine.tuners["embed"].size == 8 and h.engine.tuners["embed"].changes == []
    assert ("evict", "rerank") in h.kinds()


def test_measured_footprints_replace_the_first_guess_and_persist() -> None:
    h = Harness(sizes={"embed": 2}, act_bytes_per_item=1000)
    h.engine.start()
    h.engine.run("embed", ["a", "b", "c"])
    h.engine.stop()
    profile = h.profiles.get("embed", "cpu", "auto")
    assert profile is not None and profile.weights_bytes == 2 * MiB
    assert profile.activation_reserve() == 3000
    # a later engine plans with the measured bytes, not the configured guess
    wrong_guess = {role: spec(role, 50) for role in ("embed",)}
    later = Engine("fake", wrong_guess, lambda s, d: None, 100 * MiB, profiles=h.profiles)  # type: ignore[arg-type,return-value]
    assert later._slots["embed"].vram_bytes == 2 * MiB


def test_the_tuned_batch_size_is_kept_for_the_next_start() -> None:
    clock = FakeClock()
    h = Harness(batch=64, clock=clock, real_time=False, run_s_fixed=0.02, run_s_per_item=0.001)
    h.engine.tuners["embed"].size = 8  # as a first start with no profile would begin
    request = h.engine.submit("embed", [f"t{i}" for i in range(400)])
    while not request.done():
        h.engine.step()
    learned = h.engine.tuners["embed"].size
    assert learned > 8  # it ramped (a fixed cost per batch: larger pays)
    assert h.profiles.get("embed", "cpu", "auto").tuned_batch == learned
    # a restarted engine (same profile store, as Postgres is across restarts) starts where this one settled
    later = Engine("fake", h.specs, h.engine.loader, 100 * MiB, profiles=h.profiles, clock=clock,
                   waiter=clock.advance)
    assert later.tuners["embed"].size == learned


def test_prewarm_overlaps_the_wake_with_other_work() -> None:
    h = Harness(budget_mib=10, sizes={"embed": 4, "rerank": 3, "generate": 6}, run_s_per_item=0.1, wake_s=0.3)
    h.engine.start()
    h.engine.run("rerank", ["warm-up"])
    h.engine.run("generate", ["push rerank to host"])  # rerank sleeps, generate stays
    h.engine.run("embed", ["x"])
    assert h.engine.tiers()["rerank"] == "host"
    h.timeline.clear()
    t0 = time.monotonic()
    h.engine.prewarm("rerank")                                  # a query's rerank will follow its search
    background = h.engine.submit("embed", [f"b{i}" for i in range(4)])  # 0.4 s of other device work
    time.sleep(0.2)                                             # the search, on the CPU
    rerank = h.engine.submit("rerank", ["q"], priority=URGENT)
    result = rerank.result(5)
    background.result(5)
    h.engine.stop()
    spans = {name: (start - t0, end - t0) for name, start, end in h.timeline}
    wake, embed = spans["wake:rerank"], spans["run:embed"]
    assert wake[0] < embed[1] and embed[0] < wake[1], f"wake {wake} does not overlap embed {embed}"
    assert result.load_ms < 150  # the wake had finished, or nearly, when rerank was needed


def test_an_urgent_questions_generator_wakes_while_its_search_and_rerank_run() -> None:
    h = Harness(budget_mib=10, sizes={"embed": 6, "rerank": 1, "generate": 6}, wake_s=0.3)
    h.engine.start()
    h.engine.run("generate", ["g"])
    h.engine.run("rerank", ["r"])
    h.engine.run("embed", ["q"], priority=URGENT)           # the generator goes to sleep for it
    assert h.engine.tiers()["generate"] == "host"
    h.engine.prewarm("generate", urgent=True)                # the question's own next stage: the idle embedder goes
    time.sleep(0.1)                                          # its search
    rerank = h.engine.run("rerank", ["r"], priority=URGENT)
    generate = h.engine.run("generate", ["q"], priority=URGENT)
    h.engine.stop()
    assert h.engine.tiers()["embed"] != "vram"
    assert rerank.load_ms < 100              # the rerank did not wait for the wake
    assert generate.load_ms < 300            # the wake was under way before the generate stage asked


@pytest.mark.parametrize("restore_s", [1.0, 0.0])
def test_an_idle_engine_brings_back_the_embedder_the_generator_put_to_sleep(restore_s: float) -> None:
    """The budget holds the embedder or the generator: a question's answer leaves the generator resident. Idle
    for `idle_restore_s`, the engine wakes the embedder (the generator goes), so the next question's embed does not
    wait for a wake; 0 leaves them as they are."""
    clock = FakeClock()
    h = Harness(budget_mib=10, sizes={"embed": 6, "generate": 6}, clock=clock, real_time=False,
                config=EngineConfig(idle_restore_s=restore_s))
    for role in ("embed", "generate"):   # one question: its embed, then its answer
        done = h.engine.submit(role, ["q"], priority=URGENT)
        while not done.done():
            h.engine.step()
    assert h.engine.tiers()["embed"] == "host" and h.engine.tiers()["generate"] == VRAM
    clock.advance(0.5)
    h.engine.step()
    assert h.engine.tiers()["embed"] == "host"   # not idle for long enough yet
    clock.advance(1.0)
    h.engine.step()
    back = restore_s > 0
    assert (h.engine.tiers()["embed"] == VRAM) == back and (h.engine.tiers()["generate"] == VRAM) != back
    loads_before = h.kinds().count(("wake", "embed"))
    embed = h.engine.submit("embed", ["the next question"], priority=URGENT)
    while not embed.done():
        h.engine.step()
    assert h.kinds().count(("wake", "embed")) == loads_before + (0 if back else 1)   # no wake of its own


def test_the_idle_restore_counts_from_the_end_of_the_last_batch() -> None:
    """A long answer (3 s) is not idle time: the embedder comes back `idle_restore_s` after it ended, not at once
    (it once came back between a question's rerank and its generate, 2 ms apart, and the generator's load ran out
    of memory beside it)."""
    clock = FakeClock()
    h = Harness(budget_mib=10, sizes={"embed": 6, "generate": 6}, clock=clock, real_time=False, run_s_per_item=3.0,
                config=EngineConfig(idle_restore_s=1.0))
    for role in ("embed", "generate"):
        done = h.engine.submit(role, ["q"], priority=URGENT)
        while not done.done():
            h.engine.step()
    h.engine.step()
    assert h.engine.tiers()["embed"] == "host" and h.engine.tiers()["generate"] == VRAM
    clock.advance(1.5)
    h.engine.step()
    assert h.engine.tiers()["embed"] == VRAM


def test_cooldown_lets_the_resident_model_finish_before_a_swap() -> None:
    clock = FakeClock()
    h = Harness(budget_mib=10, sizes={"embed": 6, "generate": 6}, cooldown_s=1.0, clock=clock, real_time=False,
                run_s_per_item=0.01, batch=1)
    embeds = [h.engine.submit("embed", [f"e{i}"]) for i in range(5)]
    gens = [h.engine.submit("generate", [f"g{i}"]) for i in range(5)]
    while h.engine.pending_count():
        h.engine.step()
    assert all(f.done() for f in embeds + gens)
    assert h.loads.count("embed") + h.loads.count("generate") <= 3


def test_activation_estimates_do_not_scale_up_fixed_costs() -> None:
    from workers.profiles import ModelProfile

    profile = ModelProfile("m", "gpu", "bf16", 10)
    profile.observe(1, 16, 300 * MiB)        # a single short query: mostly one-time workspace
    assert profile.activation_for(64, 256) is None                # one measurement: no extrapolation
    profile.observe(8, 256, 340 * MiB)
    profile.observe(64, 256, 900 * MiB)      # real batches
    assert profile.activation_for(32, 256) == 900 * MiB          # bounded by the larger measured batch
    assert profile.activation_for(128, 256) == 1540 * MiB        # beyond: the slope between the two largest
    assert profile.activation_for(1, 16) == 300 * MiB


def test_background_batches_ramp_up_where_larger_batches_pay() -> None:
    clock = FakeClock()
    h = Harness(budget_mib=100, clock=clock, real_time=False, run_s_fixed=0.02, run_s_per_item=0.001, batch=8)
    h.specs["embed"] = spec("embed", 1, 256)
    h.engine = Engine("fake", {"embed": ModelSpec(role="embed", path=h.specs["embed"].path, name="embed",
                                                   batch_size=256, initial_batch=8, estimate_bytes=MiB)},
                      h.engine.loader, 100 * MiB, clock=clock, waiter=clock.advance)
    futures = [h.engine.submit("embed", [f"{i}.{j}" for j in range(66)]) for i in range(40)]
    while h.engine.pending_count():
        h.engine.step()
    sizes = [len(items) for _, items in h.runs]
    assert all(f.done() for f in futures)
    assert sizes[0] == 8 and max(sizes) >= 128  # a fixed cost per batch: larger batches pay, so it ramped
    assert all(b > a for a, b, _ in h.engine.tuners["embed"].changes)


def test_batches_beside_a_background_load_leave_no_activation_sample() -> None:
    # a load allocates on the device while the batch runs: its peak would read as the batch's activations (a GPU
    # run recorded a 16-item embed batch as gigabytes and then capped every batch at 16)
    h = Harness(batch=16, act_bytes_per_item=MiB)
    inner = h.engine.loader

    def loader(model_spec: ModelSpec, device: str) -> Any:
        if model_spec.name == "generate":
            time.sleep(0.8)
        return inner(model_spec, device)

    h.engine.loader = loader
    h.engine.start()
    h.engine.run("embed", ["a"] * 2)
    h.engine.prewarm("generate")  # cold: loads in the background
    time.sleep(0.1)
    h.engine.run("embed", ["b"] * 4)
    h.engine.run("generate", ["g"])
    h.engine.run("embed", ["c"] * 8)
    h.engine.stop()
    sizes = sorted(int(key.split(":")[0]) for key in h.profiles.get("embed", "cpu", "auto").activations)
    assert sizes == [2, 8]


def test_background_batches_run_at_half_size_for_a_while_after_urgent_work() -> None:
    clock = FakeClock()
    h = Harness(batch=8, clock=clock, real_time=False, run_s_per_item=0.1)
    h.engine.urgent_yield_s = 3.0
    urgent = h.engine.submit("embed", ["u"], priority=URGENT)
    background = h.engine.submit("embed", [f"b{i}" for i in range(48)])
    while not background.done():
        h.engine.step()
    assert urgent.result().outputs == ["embed:u"]
    sizes = [len(items) for _, items in h.runs]
    assert sizes[0] == 1                      # the urgent item first, alone
    assert sizes[1] == 4                      # then half-size background batches while urgent work is recent
    assert sizes[-1] == 8 or sizes[-2] == 8   # and the tuned size once it is 3 s in the past
    assert sum(sizes[1:]) == 48


def test_live_knobs_from_the_tuner_apply_to_the_engine() -> None:
    h = Harness(batch=64, sizes={"embed": 1, "rerank": 1})
    h.engine.start()
    h.engine.run("rerank", ["r"])
    h.engine.run("embed", ["e"])
    engine = h.engine
    engine.apply_knobs({})  # the first read only notes the unload counter
    engine.apply_knobs({"batch_max:embed": 16, "max_length:embed": 128, "max_queue_delay_ms:embed": 4.0,
                        "cooldown_s": 6.0, "unload_idle": 1})
    tuner = engine.tuners["embed"]
    assert (tuner.maximum, tuner.size) == (16, 16)
    assert engine.specs["embed"].max_length == 128 and engine.specs["embed"].max_queue_delay_ms == 4.0
    assert engine.policy.cooldown_s == 6.0
    assert engine.tiers()["rerank"] != "vram" and engine.tiers()["embed"] != "vram"  # idle models went
    engine.apply_knobs({"unload_idle": 1})  # the same counter: nothing more to do
    engine.apply_knobs({"batch_max:embed": 32})
    assert tuner.maximum == 32 and tuner.ceiling == 32  # raised again: it may ramp up to the new cap
    result = engine.run("embed", [str(i) for i in range(40)])
    h.engine.stop()
    assert len(result.outputs) == 40


def test_the_stats_line_says_where_a_roles_run_time_went() -> None:
    from workers.engine import EngineStats, thread_schedstat

    stats = EngineStats()
    role = stats.role("generate")
    role.batches, role.items, role.wall_ms, role.device_ms, role.cpu_ms, role.runq_ms = 4, 4, 4000.0, 3900.0, 2500.0, 900.0
    line = stats.summary()
    assert "generate 4 batches 4 items (mean 1.0) run 4.0s device 3.9s (98%) on-cpu 2.5s cpu-wait 0.9s" in line
    on_cpu, waiting = thread_schedstat()
    assert on_cpu >= 0.0 and waiting >= 0.0


def test_an_idle_model_makes_room_for_the_tuned_background_batch() -> None:
    # the embedder's measured activations: 1 MiB an item. Beside the idle generator only 4 items fit in the
    # budget; with the generator asleep the tuned 8 do (on the H200 the resident generator held ingestion at
    # half its best batch for as long as it ran)
    h = Harness(budget_mib=12, sizes={"embed": 4, "generate": 4}, batch=8, act_bytes_per_item=MiB)
    h.engine.start()
    h.engine.run("embed", ["a", "b"])
    h.engine.run("embed", ["a", "b", "c", "d"])
    h.engine.run("generate", ["g"])            # resident, then idle
    h.runs.clear()
    h.engine.run("embed", [str(i) for i in range(8)])
    h.engine.stop()
    assert [len(items) for role, items in h.runs] == [8]
    assert h.engine.stats.ooms == 0
    assert any(e["event"] == "evict" and e["model"] == "generate" and "room for larger" in e["reason"]
               for e in h.events)
    assert h.device.peak <= 12 * MiB


def test_a_model_inside_its_cooldown_is_not_put_to_sleep_for_a_larger_batch() -> None:
    clock = FakeClock()
    h = Harness(budget_mib=12, sizes={"embed": 4, "generate": 4}, batch=8, act_bytes_per_item=MiB,
                cooldown_s=30.0, clock=clock, real_time=False)
    for items in (["a", "b"], ["a", "b", "c", "d"]):
        future = h.engine.submit("embed", items)
        while not future.done():
            h.engine.step()
    future = h.engine.submit("generate", ["g"], priority=URGENT)
    while not future.done():
        h.engine.step()
    h.runs.clear()
    future = h.engine.submit("embed", [str(i) for i in range(8)])
    while not future.done():
        h.engine.step()
    assert [len(items) for role, items in h.runs] == [4, 4]  # the generator was used 0 s ago: it stays
    assert not any("room for larger" in e.get("reason", "") for e in h.events)


def test_questions_through_three_models_that_do_not_fit_swap_the_small_one() -> None:
    # embed 7.5 + rerank 1.1 + generate 7.5 in a 16 budget (the reference case's shape): each question wakes the
    # embedder and the small reranker once; the generator, expected by the question's later stages, stays
    h = Harness(budget_mib=16, sizes={"embed": 7.5, "rerank": 1.1, "generate": 7.5}, host_mib=100)
    h.engine.start()
    for i in range(5):
        for role in ("embed", "rerank", "generate"):
            h.engine.run(role, [f"q{i}"], priority=URGENT)
    h.engine.stop()
    brought_in = [(e["model"]) for e in h.events if e["event"] in ("load", "wake")]
    assert brought_in.count("generate") == 1                  # loaded once, never slept
    assert brought_in.count("embed") <= 5 and brought_in.count("rerank") <= 5
    assert h.device.peak <= 16 * MiB


def test_urgent_micro_batches_are_marked_for_backends_that_take_a_priority() -> None:
    """A backend with its own queue (Triton's priority levels) learns which micro-batches are urgent; background
    micro-batches keep the requests' parameters unchanged."""
    seen: list[dict[str, Any]] = []

    class Prioritised(FakeModel):
        takes_priority = True

        def execute(self, items: list[Any], params: dict[str, Any]) -> BatchOutput:
            seen.append(dict(params))
            return super().execute(items, params)

    h = Harness()
    h.engine.loader = lambda spec, device: Prioritised(spec, h.device, h.clock, real_time=True, runs=h.runs)
    h.engine.start()
    try:
        h.engine.run("embed", ["a"], priority=URGENT, params={"kind": "query"})
        h.engine.run("embed", ["b"], params={"kind": "document"})
    finally:
        h.engine.stop()
    assert seen == [{"kind": "query", "urgent": True}, {"kind": "document"}]


def test_submissions_arrive_in_the_inbox_and_only_the_engine_thread_schedules_them() -> None:
    """submit() from any thread only queues a message; the engine's pending work is the engine thread's alone."""
    h = Harness()
    threads = [threading.Thread(target=lambda i=i: h.engine.submit("embed", [f"t{i}"])) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert h.engine._pending == {} and h.engine.pending_count() == 8    # nothing scheduled yet: all in the inbox
    seen: set[str] = set()
    handle = h.engine._handle

    def on_engine_thread(message: Any) -> None:
        seen.add(threading.current_thread().name)
        handle(message)

    h.engine._handle = on_engine_thread  # type: ignore[method-assign]
    h.engine.start()
    h.engine.prewarm("rerank")
    h.engine.push_knobs({"cooldown_s": 1.5})
    assert h.engine.run("embed", ["last"]).outputs == ["embed:last"]
    assert h.engine.tiers()["embed"] == VRAM
    h.engine.stop()
    assert seen == {"ragq-engine-fake"}
    assert h.engine.policy.cooldown_s == 1.5 and h.engine.pending_count() == 0


def test_the_engine_counts_what_the_backend_measured_and_a_failing_observer_breaks_nothing() -> None:
    """A backend's BatchOutput (device time, allocator retries, phases) reaches the stats and the observers; an
    observer that raises is logged and the others still hear."""
    from workers.observer import EngineObserver

    class Measured(FakeModel):
        def execute(self, items: list[Any], params: dict[str, Any]) -> BatchOutput:
            output = super().execute(items, params)
            return BatchOutput(output.outputs, device_ms=2.5, alloc_retries=1,
                               phases={"prep": 1.0, "padded_tokens": 8.0, "real_tokens": 4.0})

    class Broken(EngineObserver):
        def batch(self, report: Any) -> None:
            raise RuntimeError("observer down")

        def model_event(self, row: dict[str, Any]) -> None:
            raise RuntimeError("observer down")

    batches: list[Any] = []

    class Batches(EngineObserver):
        def batch(self, report: Any) -> None:
            batches.append(report)

    h = Harness()
    h.engine.observer.add(Broken())
    h.engine.observer.add(Batches())
    h.engine.loader = lambda spec, device: Measured(spec, h.device, h.clock, real_time=True, runs=h.runs)
    h.engine.start()
    try:
        assert h.engine.run("embed", ["a", "b"]).outputs == ["embed:a", "embed:b"]
        assert h.engine.run("embed", ["c"]).outputs == ["embed:c"]
    finally:
        h.engine.stop()
    stats = h.engine.stats.roles["embed"]
    assert stats.device_ms == 5.0 and stats.alloc_retries == 2 and stats.phases["prep"] == 2.0
    assert [(b.items, b.alloc_retries) for b in batches] == [(2, 1), (1, 1)]
    assert ("load", "embed") in h.kinds()       # the EventLog heard the load although Broken raised before it
