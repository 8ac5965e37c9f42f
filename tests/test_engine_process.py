"""The engine in its own process: answers and errors travel back intact, a dead engine process fails what it held
and is replaced, and an engine process never outlives its worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import wait
from pathlib import Path

import pytest

from ragq.core.errors import BackendUnavailable, BadInput, ConfigError, RequestExpired
from scheduler.batching import URGENT
from tests.fakes import fake_engine, spec
from workers.engine_process import EngineClient

ROOT = Path(__file__).resolve().parent.parent
SPECS = {"embed": spec("embed", 100), "generate": spec("generate", 200)}


def client(**kwargs: object) -> EngineClient:
    return EngineClient("fake", SPECS, fake_engine, tuple(kwargs.values()),
                        token_counter=lambda s, items: [len(str(i)) for i in items])


def test_outputs_come_back_in_order_with_timings_and_stats() -> None:
    engine = client(run_s_fixed=0.01)
    try:
        futures = [engine.submit("embed", [f"d{i}-{j}" for j in range(5)]) for i in range(6)]
        wait(futures, timeout=30)
        for i, future in enumerate(futures):
            result = future.result()
            assert result.outputs == [f"embed:d{i}-{j}" for j in range(5)]
            assert result.model == "embed" and result.tokens == sum(len(f"d{i}-{j}") for j in range(5))
        assert engine.run("generate", ["q"], priority=URGENT).outputs == ["generate:q"]
        stats = engine.stats
        assert stats.roles["embed"].items == 30 and stats.roles["generate"].batches == 1
        assert stats.loads == 2
        assert set(engine.tiers()) == {"embed", "generate"} and engine.pending_count() == 0
    finally:
        engine.stop()
    assert engine._process is not None and not engine._process.is_alive()


def test_errors_keep_their_type_and_message() -> None:
    engine = client()
    try:
        with pytest.raises(RequestExpired, match="expired"):
            engine.run("embed", ["late"], deadline=time.monotonic() - 1.0)  # one clock for every process
        with pytest.raises(BackendUnavailable, match="rerank"):
            engine.run("rerank", ["a"])
        assert engine.run("embed", ["still serving"]).outputs == ["embed:still serving"]
    finally:
        engine.stop()


def test_a_start_failure_says_why() -> None:
    with pytest.raises(ConfigError, match="RAGQ_MODELS names nothing"):
        EngineClient("fake", SPECS, fake_engine, (0.0, "RAGQ_MODELS names nothing"))


def test_a_killed_engine_process_fails_its_requests_and_is_replaced() -> None:
    engine = client(run_s_fixed=3.0)
    try:
        first = engine.pid
        in_flight = engine.submit("embed", ["slow"])
        time.sleep(1.0)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(BackendUnavailable, match="exited"):
            in_flight.result(timeout=20)
        # the next request starts a new engine process and is answered
        assert engine.run("generate", ["after"]).outputs == ["generate:after"]
        assert engine.pid != first and engine.restarts == 1
    finally:
        engine.stop()


def test_the_engine_process_exits_with_its_worker() -> None:
    script = textwrap.dedent("""
        import os, sys, time
        from tests.fakes import fake_engine, spec
        from workers.engine_process import EngineClient
        engine = EngineClient("fake", {"embed": spec("embed", 100)}, fake_engine, ())
        print(engine.pid, flush=True)
        os._exit(0)  # no goodbye: as if the worker were killed
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"engine process {pid} outlived its worker")


def test_an_attached_client_shares_the_engine_and_follows_its_restart() -> None:
    owner = client(run_s_fixed=0.05)
    try:
        attached = EngineClient.attach("fake", SPECS, owner.address, owner.authkey,
                                       token_counter=lambda s, items: [1] * len(items), start_timeout_s=30)
        both = [owner.submit("embed", ["o1", "o2"]), attached.submit("embed", ["a1"], priority=URGENT)]
        assert [f.result(10).outputs for f in both] == [["embed:o1", "embed:o2"], ["embed:a1"]]
        assert owner.stats.roles["embed"].items == 3  # one engine served both
        os.kill(owner.pid, signal.SIGKILL)
        time.sleep(0.5)
        assert owner.run("generate", ["restarted"]).outputs == ["generate:restarted"]  # the owner starts a new one
        assert attached.run("embed", ["again"]).outputs == ["embed:again"]  # and the attached client finds it
        attached.stop()
    finally:
        owner.stop()


def test_a_client_with_the_wrong_key_is_refused() -> None:
    owner = client()
    try:
        with pytest.raises(Exception):  # noqa: B017 - multiprocessing's AuthenticationError or a closed pipe
            EngineClient.attach("fake", SPECS, owner.address, b"not the key", start_timeout_s=2)
        assert owner.run("embed", ["still fine"]).outputs == ["embed:still fine"]
    finally:
        owner.stop()


def test_every_ragq_error_pickles_as_itself() -> None:
    import inspect
    import pickle

    from ragq.core import errors

    classes = [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, errors.RagqError)]
    assert len(classes) >= 10
    for cls in classes:
        exc = cls("notes.md", "is empty") if cls is errors.BadInput else cls("it broke")
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls and str(back) == str(exc)
    bad = pickle.loads(pickle.dumps(errors.BadInput("notes.md", "is empty")))
    assert (bad.source, bad.problem) == ("notes.md", "is empty")


def test_a_bad_input_raised_in_the_engine_process_arrives_with_its_source_and_problem() -> None:
    engine = EngineClient("fake", SPECS, fake_engine, (0.0, None, "poison"),
                          token_counter=lambda s, items: [len(str(i)) for i in items])
    try:
        with pytest.raises(BadInput) as caught:
            engine.run("embed", ["fine", "poison"])
        assert (caught.value.source, caught.value.problem) == ("poison", "cannot be embedded")
        assert engine.run("embed", ["fine"]).outputs == ["embed:fine"]
    finally:
        engine.stop()
