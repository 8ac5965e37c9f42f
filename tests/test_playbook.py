"""The tuning playbook (pure): each symptom from injected evidence, the moves it makes, and the guard rails —
bounds, pinned knobs, settling time, no opposite move without new evidence."""

from __future__ import annotations

from scheduler.playbook import DOWN, ONCE, UP, Evidence, Knob, Thresholds, diagnose, plan

MODELS = {"embed": "emb", "rerank": "rr", "generate": "gen"}


def knobs(**overrides: Knob) -> dict[str, Knob]:
    base = {
        "batch_max:emb": Knob("batch_max:emb", 64, 1, 256, 2, factor=True),
        "batch_max:gen": Knob("batch_max:gen", 4, 1, 8, 2, factor=True),
        "max_length:emb": Knob("max_length:emb", 512, 128, 512, 1.5, factor=True),
        "max_queue_delay_ms:emb": Knob("max_queue_delay_ms:emb", 0, 0, 20, 2, integer=False),
        "max_new_tokens": Knob("max_new_tokens", 256, 16, 256, 1.5, factor=True),
        "generate_chunks": Knob("generate_chunks", 5, 1, 5, 1),
        "chunk_processes": Knob("chunk_processes", 2, 0, 8, 1),
        "cooldown_s": Knob("cooldown_s", 0, 0, 30, 2, integer=False),
        "max_background_requests": Knob("max_background_requests", 8, 1, 8, 1),
    }
    base.update({k.replace("__", ":"): v for k, v in overrides.items()})
    return base


def ev(**kwargs: object) -> Evidence:
    return Evidence(start=1000.0, end=1300.0, **kwargs)  # type: ignore[arg-type]


def names(moves) -> list[tuple[str, float, float]]:  # type: ignore[no-untyped-def]
    return [(m.knob, m.before, m.after) for m in moves]


def test_oom_halves_the_batch_and_unloads_idle_models() -> None:
    symptoms = diagnose(ev(ooms={"emb": 3}), MODELS)
    assert [(s.name, s.subject) for s in symptoms] == [("oom", "emb")]
    moves = plan(symptoms, knobs(), now=1300.0, evidence_start=1000.0)
    assert names(moves) == [("batch_max:emb", 64, 32), ("unload_idle", 0, 0)]
    assert moves[0].evidence == {"ooms": 3} and moves[1].direction == ONCE


def test_oom_at_the_smallest_batch_lowers_the_context_length() -> None:
    k = knobs(batch_max__emb=Knob("batch_max:emb", 1, 1, 256, 2, factor=True))
    moves = plan(diagnose(ev(ooms={"emb": 1}), MODELS), k, now=1300.0, evidence_start=1000.0)
    assert names(moves) == [("unload_idle", 0, 0), ("max_length:emb", 512, 341)]


def test_high_queue_time_raises_the_queue_delay_modestly() -> None:
    symptoms = diagnose(ev(queue_ms={"background": 9000.0}, compute_ms={"background": 3000.0}), MODELS)
    assert [s.name for s in symptoms] == ["high_queue_time"] and symptoms[0].evidence["ratio"] == 3.0
    assert names(plan(symptoms, knobs(), 1300.0, 1000.0)) == [("max_queue_delay_ms:emb", 0, 2),
                                                               ("batch_max:emb", 64, 128)]
    # the queue delay at its bound: the batch alone
    k = knobs(max_queue_delay_ms__emb=Knob("max_queue_delay_ms:emb", 20, 0, 20, 2, integer=False))
    assert names(plan(symptoms, k, 1300.0, 1000.0)) == [("batch_max:emb", 64, 128)]


def test_high_generation_latency_cuts_new_tokens_then_context_chunks() -> None:
    symptoms = diagnose(ev(generate_p95_ms=9000.0), MODELS)
    assert [s.name for s in symptoms] == ["high_generation_latency"]
    assert names(plan(symptoms, knobs(), 1300.0, 1000.0)) == [("max_new_tokens", 256, 171)]
    k = knobs(max_new_tokens=Knob("max_new_tokens", 16, 16, 256, 1.5, factor=True))
    assert names(plan(symptoms, k, 1300.0, 1000.0)) == [("generate_chunks", 5, 4)]


def test_a_fallback_waits_while_the_knob_before_it_settles() -> None:
    # seen in bench/tuning_cpu.py --scenario tokens: with max_new_tokens settling after a cut, each step cut the
    # passages instead, so both fell together
    symptoms = diagnose(ev(generate_p95_ms=6000.0), MODELS)
    settling = knobs(max_new_tokens=Knob("max_new_tokens", 171, 16, 256, 1.5, factor=True, last_direction=DOWN,
                                         last_moved_at=1250.0))
    assert plan(symptoms, settling, now=1300.0, evidence_start=1000.0) == []
    # settled, but the window still holds samples from before the cut: cutting again would overshoot
    assert plan(symptoms, settling, now=1500.0, evidence_start=1200.0) == []
    assert names(plan(symptoms, settling, now=1500.0, evidence_start=1260.0)) == [("max_new_tokens", 171, 114)]
    floor = knobs(max_new_tokens=Knob("max_new_tokens", 16, 16, 256, 1.5, factor=True, last_direction=DOWN,
                                      last_moved_at=1000.0))
    assert names(plan(symptoms, floor, now=1300.0, evidence_start=1000.0)) == [("generate_chunks", 5, 4)]


def test_low_throughput_with_an_idle_device_grows_batches() -> None:
    symptoms = diagnose(ev(device_busy=0.2, background_pending=40, embed_items=300,
                           compute_ms={"background": 1000.0}, queue_ms={"background": 100.0}), MODELS)
    assert [s.name for s in symptoms] == ["low_throughput_low_util"]
    assert names(plan(symptoms, knobs(), 1300.0, 1000.0)) == [("batch_max:emb", 64, 128)]
    assert diagnose(ev(device_busy=0.2, background_pending=0), MODELS) == []  # idle because there is no work
    assert diagnose(ev(device_busy=0.0, background_pending=40), MODELS) == []  # a worker that has not begun yet


def test_oscillating_loads_add_cooldown() -> None:
    symptoms = diagnose(ev(swaps={"emb": 40, "gen": 38, "rr": 1}), MODELS)  # 8 and 7.6 a minute
    assert [s.name for s in symptoms] == ["oscillating_loads"]
    assert names(plan(symptoms, knobs(), 1300.0, 1000.0)) == [("cooldown_s", 0, 2)]
    assert diagnose(ev(swaps={"emb": 40}), MODELS) == []  # one model reloading alone is not oscillation
    # with their time known: only swaps that cost a real share of the window (5 %) call for a cooldown
    costly = diagnose(ev(swaps={"emb": 40, "gen": 38}, swap_ms=40_000.0), MODELS)
    assert [s.name for s in costly] == ["oscillating_loads"] and costly[0].evidence["swap_share"] > 0.05
    assert diagnose(ev(swaps={"emb": 40, "gen": 38}, swap_ms=6_000.0), MODELS) == []   # 78 wakes of 77 ms: 2 %


def test_pinned_knobs_never_move() -> None:
    k = knobs(cooldown_s=Knob("cooldown_s", 0, 0, 30, 2, integer=False, pinned=True))
    assert plan(diagnose(ev(swaps={"emb": 40, "gen": 40}), MODELS), k, 1300.0, 1000.0) == []
    k = knobs(max_new_tokens=Knob("max_new_tokens", 256, 16, 256, 1.5, factor=True, pinned=True))
    moves = plan(diagnose(ev(generate_p95_ms=9000.0), MODELS), k, 1300.0, 1000.0)
    assert names(moves) == [("generate_chunks", 5, 4)]  # the next action of the row


def test_a_knob_settles_and_never_swings_back_without_new_evidence() -> None:
    t = Thresholds(settle_s=120.0)
    grown = Knob("batch_max:emb", 128, 1, 256, 2, factor=True, last_direction=UP, last_moved_at=1250.0)
    oom = diagnose(ev(ooms={"emb": 1}), MODELS)
    # moved 50 s ago: settling
    assert "batch_max:emb" not in [m.knob for m in plan(oom, knobs(batch_max__emb=grown), 1300.0, 1000.0, t)]
    # settled, but this window began before the move: the OOM may be the old size's; no opposite move
    assert "batch_max:emb" not in [m.knob for m in plan(oom, knobs(batch_max__emb=grown), 1400.0, 1000.0, t)]
    # evidence gathered after the move: the larger size itself ran out of memory, so shrink it
    moves = plan(oom, knobs(batch_max__emb=grown), 1600.0, 1300.0, t)
    assert ("batch_max:emb", 128, 64) in names(moves) and moves[0].direction == DOWN


def test_a_healthy_window_moves_nothing() -> None:
    healthy = ev(queue_ms={"background": 100.0}, compute_ms={"background": 1000.0}, generate_p95_ms=900.0,
                 device_busy=0.9, background_pending=10, swaps={"emb": 2, "gen": 2})
    assert diagnose(healthy, MODELS) == []
