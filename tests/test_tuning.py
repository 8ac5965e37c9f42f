"""The periodic tuner against a real Postgres: injected evidence (dated in 2099) -> knob moves written to
tuning_knobs with an audit row each; settling; --dry-run writes nothing; pinned knobs stay; `ragq tune` CLI."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from workers.models import ModelSpec

T0 = datetime(2099, 3, 1, tzinfo=timezone.utc)
SPECS = {
    "embed": ModelSpec(role="embed", path=Path("/nonexistent"), name="tune-test-emb", batch_size=64),
    "generate": ModelSpec(role="generate", path=Path("/nonexistent"), name="tune-test-gen", max_new_tokens=128),
}


@pytest.fixture()
def db(db_engine):  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from tests.conftest import delete_rows_from

    def clean() -> None:
        delete_rows_from(db_engine, T0)
        with db_engine.begin() as conn:
            conn.execute(text("DELETE FROM tuning_knobs WHERE name LIKE '%tune-test%' OR name IN "
                              "('max_new_tokens', 'generate_chunks', 'cooldown_s', 'unload_idle')"))
            conn.execute(text("DELETE FROM tuning_actions WHERE ts >= :t"), {"t": T0})

    clean()
    yield db_engine
    clean()


def events(engine, seconds: float, model: str, event: str, n: int) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import insert

    from ragq.core.db import ModelEvent

    with engine.begin() as conn:
        conn.execute(insert(ModelEvent), [{"ts": T0 + timedelta(seconds=seconds + i), "device": "cuda:0",
                                           "model": model, "event": event, "ms": 1.0} for i in range(n)])


def generations(engine, compute_ms: float, n: int = 10) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import insert

    from ragq.core.db import StageTiming

    with engine.begin() as conn:
        conn.execute(insert(StageTiming), [{"stage": "generate", "model": "tune-test-gen", "priority": "urgent",
                                            "outcome": "ok", "finished_at": T0 + timedelta(seconds=i),
                                            "queue_ms": 10.0, "load_ms": 0.0, "compute_ms": compute_ms}
                                           for i in range(n)])


def test_an_oom_shrinks_the_batch_cap_unloads_idle_models_and_is_audited(db, settings) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from workers.tuning import live_values, tick

    events(db, 10, "tune-test-emb", "oom", 2)
    symptoms, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=100), dry_run=True)
    assert [s.name for s in symptoms] == ["oom"] and {m.knob for m in moves} == {"batch_max:tune-test-emb",
                                                                                   "unload_idle"}
    assert "batch_max:tune-test-emb" not in live_values(db)  # a dry run changes nothing
    symptoms, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=100))
    values = live_values(db)
    assert values["batch_max:tune-test-emb"] == 32 and values["unload_idle"] == 1
    with db.connect() as conn:
        actions = [dict(r) for r in conn.execute(text(
            "SELECT knob, before, after, symptom, evidence FROM tuning_actions WHERE ts >= :t ORDER BY id"),
            {"t": T0}).mappings()]
    assert [(a["knob"], a["before"], a["after"], a["symptom"]) for a in actions] == [
        ("batch_max:tune-test-emb", 64, 32, "oom"), ("unload_idle", 0, 1, "oom")]
    assert actions[0]["evidence"] == {"ooms": 2}
    # the next step, a minute later, sees the same OOMs but the knob is settling: no second halving
    _, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=160))
    assert "batch_max:tune-test-emb" not in {m.knob for m in moves}


def test_slow_generation_cuts_new_tokens_unless_pinned(db, settings) -> None:  # type: ignore[no-untyped-def]
    from workers.tuning import live_values, tick

    generations(db, compute_ms=9000.0)
    pinned = settings.model_copy(update={"tuning_pinned": "max_new_tokens"})
    _, moves = tick(db, pinned, SPECS, now=T0 + timedelta(seconds=60))
    assert [(m.knob, m.before, m.after) for m in moves] == [("generate_chunks", settings.top_k, settings.top_k - 1)]
    assert "max_new_tokens" not in live_values(db)


def test_swaps_for_urgent_work_are_not_oscillation_a_cooldown_could_stop(db, settings) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import insert

    from ragq.core.db import ModelEvent
    from workers.tuning import tick

    def swaps(offset: float, reason: str) -> None:
        with db.begin() as conn:
            conn.execute(insert(ModelEvent), [
                {"ts": T0 + timedelta(seconds=offset + 4 * i), "device": "cuda:0", "model": model, "event": "wake",
                 "ms": 150.0, "reason": reason}
                for i in range(15) for model in ("tune-test-emb", "tune-test-gen")])

    settings = settings.model_copy(update={"tune_window_s": 60.0})  # 15 wakes of each model in the window
    swaps(0, "needed by urgent work")  # questions wake both models in turn: urgent work passes any cooldown
    swaps(0.2, "prewarm: needed by pending work")  # and the next stage of a question, woken early
    symptoms, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=60), dry_run=True)
    assert "oscillating_loads" not in {s.name for s in symptoms} and not moves
    swaps(0.5, "needed by pending work")  # background work bringing its model back at once: a cooldown helps
    symptoms, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=60), dry_run=True)
    assert "oscillating_loads" in {s.name for s in symptoms}
    assert [(m.knob, m.before, m.after) for m in moves] == [("cooldown_s", settings.cooldown_s,
                                                            settings.cooldown_s + 2)]


def test_the_generation_latency_target_is_configurable(db, settings) -> None:  # type: ignore[no-untyped-def]
    from workers.tuning import tick

    generations(db, compute_ms=1500.0)
    symptoms, _ = tick(db, settings, SPECS, now=T0 + timedelta(seconds=60), dry_run=True)
    assert "high_generation_latency" not in {s.name for s in symptoms}  # under the default 4000 ms
    strict = settings.model_copy(update={"tune_generate_p95_ms": 1000.0})
    symptoms, moves = tick(db, strict, SPECS, now=T0 + timedelta(seconds=60), dry_run=True)
    slow = [s for s in symptoms if s.name == "high_generation_latency"]
    assert slow and slow[0].evidence == {"generate_p95_ms": 1500, "target_ms": 1000.0}
    assert [(m.knob, m.before, m.after) for m in moves] == [("max_new_tokens", 128, 85)]


@pytest.mark.integration
def test_tune_cli(worker, ragq_home) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import ragq_env, run_ragq

    out = run_ragq(ragq_env(ragq_home), "tune", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["dry_run"] is True and "cooldown_s" in data["knobs"] and isinstance(data["symptoms"], list)
    text = run_ragq(ragq_env(ragq_home, RAGQ_TUNING_PINNED="cooldown_s"), "tune", "--dry-run")
    assert text.returncode == 0 and "symptoms:" in text.stdout and "cooldown_s" in text.stdout


def test_queue_time_in_the_engine_grows_batches_a_broker_backlog_does_not(db, settings) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import insert

    from ragq.core.db import StageTiming
    from workers.tuning import tick

    def rows(seconds: float, broker_ms: float, engine_ms: float) -> None:
        with db.begin() as conn:
            conn.execute(insert(StageTiming), [{
                "stage": "embed", "model": "tune-test-emb", "priority": "background", "outcome": "ok",
                "finished_at": T0 + timedelta(seconds=seconds + i), "queue_ms": broker_ms + engine_ms,
                "engine_queue_ms": engine_ms, "load_ms": 0.0, "compute_ms": 100.0, "items": 10} for i in range(10)])

    rows(0, broker_ms=60_000.0, engine_ms=20.0)  # a long backlog in Redis, batches that keep up
    symptoms, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=60), dry_run=True)
    assert symptoms == [] and moves == []
    rows(1000, broker_ms=0.0, engine_ms=900.0)  # requests waiting in the engine for small batches
    symptoms, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=1060), dry_run=True)
    assert [s.name for s in symptoms] == ["high_queue_time"]
    assert ("batch_max:tune-test-emb", 64, 128) in [(m.knob, m.before, m.after) for m in moves]


def test_a_batch_cap_that_stopped_paying_is_not_raised_again(db, settings) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import insert

    from ragq.core.db import StageTiming
    from workers.tuning import live_values, tick

    def window(seconds: float, items: int) -> None:
        with db.begin() as conn:
            conn.execute(insert(StageTiming), [{
                "stage": "embed", "model": "tune-test-emb", "priority": "background", "outcome": "ok",
                "finished_at": T0 + timedelta(seconds=seconds + i), "queue_ms": 900.0, "engine_queue_ms": 900.0,
                "load_ms": 0.0, "compute_ms": 100.0, "items": items} for i in range(10)])

    window(0, items=30)  # 300 items in the 300 s window: requests queue in the engine
    _, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=300))
    assert ("batch_max:tune-test-emb", 64, 128) in [(m.knob, m.before, m.after) for m in moves]
    window(400, items=30)  # after the raise: the same throughput, still queueing
    _, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=700))
    assert "batch_max:tune-test-emb" not in [m.knob for m in moves]  # it did not pay: held
    assert live_values(db)["batch_max:tune-test-emb"] == 128
    window(800, items=60)  # a window that did improve (throughput doubled): raising may go on
    _, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=1100))
    assert ("batch_max:tune-test-emb", 128, 256) in [(m.knob, m.before, m.after) for m in moves]


def test_a_pinned_knob_that_does_not_exist_is_a_config_error(settings) -> None:  # type: ignore[no-untyped-def]
    from ragq.core.errors import ConfigError
    from workers.tuning import knob_defaults

    with pytest.raises(ConfigError, match="RAGQ_TUNING_PINNED: no knob named cooldown"):
        knob_defaults(settings.model_copy(update={"tuning_pinned": "cooldown"}), SPECS)


@pytest.mark.integration
def test_tune_cli_rejects_bad_input(ragq_home) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import ragq_env, run_ragq

    out = run_ragq(ragq_env(ragq_home, RAGQ_TUNING_PINNED="batch_size"), "tune", "--dry-run")
    assert out.returncode == 2 and "RAGQ_TUNING_PINNED: no knob named batch_size" in out.stderr + out.stdout
    assert run_ragq(ragq_env(ragq_home), "tune", "--history", "-1").returncode == 2


def test_a_cooldown_raise_that_did_not_space_the_swaps_out_is_not_repeated(db, settings) -> None:  # type: ignore[no-untyped-def]
    """The cooldown moved 2 -> 4 against 30 swaps a minute; in the window after the move the two models still swap
    as often: the cooldown is `stalled` and not raised again, though the oscillation is still there. Had the swaps
    fallen, it would go on."""
    from sqlalchemy import insert

    from ragq.core.db import ModelEvent, TuningAction, TuningKnob
    from workers.tuning import tick

    settings = settings.model_copy(update={"tune_window_s": 60.0, "tune_settle_s": 10.0})
    with db.begin() as conn:
        conn.execute(insert(TuningKnob).values(name="cooldown_s", value=4.0, last_direction=1, last_moved_at=T0))
        conn.execute(insert(TuningAction).values(
            ts=T0, knob="cooldown_s", before=2.0, after=4.0, symptom="oscillating_loads",
            evidence={"swaps_per_min": {"tune-test-emb": 15.0, "tune-test-gen": 15.0}, "swap_share": 0.2}))

    def swaps(start: float, every_s: float) -> None:
        with db.begin() as conn:
            conn.execute(insert(ModelEvent), [
                {"ts": T0 + timedelta(seconds=start + every_s * i), "device": "cuda:0", "model": model,
                 "event": "load", "ms": 400.0, "reason": "needed by pending work"}
                for i in range(int(60 / every_s)) for model in ("tune-test-emb", "tune-test-gen")])

    swaps(1.0, 4.0)   # 15 loads of each a minute, 400 ms each: as before the move
    symptoms, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=61), dry_run=True)
    assert "oscillating_loads" in {s.name for s in symptoms}
    assert "cooldown_s" not in {m.knob for m in moves}

    with db.begin() as conn:
        conn.execute(ModelEvent.__table__.delete().where(ModelEvent.ts >= T0))
    swaps(1.0, 7.5)   # 8 a minute each: the raise spaced them out, and they still cost 10 % of the time
    symptoms, moves = tick(db, settings, SPECS, now=T0 + timedelta(seconds=61), dry_run=True)
    assert [(m.knob, m.before, m.after) for m in moves if m.knob == "cooldown_s"] == [("cooldown_s", 4.0, 6.0)]
