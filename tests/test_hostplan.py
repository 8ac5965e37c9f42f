"""The host RAM plan checked at `ragq worker` start, and `--device all`'s supervisor restarting a worker that dies."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragq.core.errors import ConfigError
from ragq.core.hostplan import check_host_ram, planned
from ragq.core.settings import Settings
from tests.conftest import ragq_env, run_ragq

GiB = 2**30


def test_the_plan_counts_the_services_on_this_host_and_each_workers_pinned_tier(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, host_services="redis, postgres,monitoring", ram_redis="6GiB")
    rows = dict(planned(settings, 2, 10 * GiB))
    assert rows["redis"] == 6 * GiB and rows["postgres"] == 8 * GiB and rows["monitoring"] == 4 * GiB
    assert rows["worker 1: pinned-model tier (RAGQ_HOST_BUDGET)"] == 10 * GiB
    assert sum(rows.values()) == (6 + 8 + 4 + 2 * (2 + 10)) * GiB
    assert check_host_ram(settings, 2, 10 * GiB, total_bytes=64 * GiB) == (64 - 42) * GiB
    with pytest.raises(ConfigError) as caught:
        check_host_ram(settings, 2, 10 * GiB, total_bytes=32 * GiB)
    message = str(caught.value)
    assert "needs 42.00GiB and the host has 32.00GiB (10.00GiB short)" in message
    assert "postgres" in message and "worker 1: pinned-model tier" in message and "RAGQ_HOST_BUDGET" in message
    with pytest.raises(ConfigError, match="unknown service elasticsearch"):
        planned(Settings(home=tmp_path, host_services="redis,elasticsearch"), 1, 0)


def test_a_worker_whose_host_cannot_hold_its_plan_refuses_to_start(tmp_path: Path) -> None:
    env = ragq_env(tmp_path / "home", RAGQ_HOST_SERVICES="redis,postgres", RAGQ_RAM_REDIS="64TiB")
    result = run_ragq(env, "worker", "--device", "cpu", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "host RAM does not cover this host's plan" in result.stderr and "redis" in result.stderr
    assert not (tmp_path / "home" / "run").exists()   # nothing started: no embedded Redis or Postgres


def _child(script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", script])


def test_the_supervisor_restarts_a_worker_that_dies(tmp_path: Path) -> None:
    from workers.start import supervise

    marker = tmp_path / "died-once"
    starts: list[int] = []

    def start(index: int) -> subprocess.Popen[bytes]:
        starts.append(index)
        if index == 0:   # dies the first time (a crash), runs and ends cleanly the second
            return _child(f"import pathlib, sys, time; p = pathlib.Path({str(marker)!r})\n"
                          "if not p.exists(): p.write_text('x'); sys.exit(1)\ntime.sleep(0.5)")
        return _child("import time; time.sleep(1.5)")

    t0 = time.monotonic()
    assert supervise(start, 2, poll_s=0.1, handle_signals=False) == 0
    assert sorted(starts) == [0, 0, 1] and time.monotonic() - t0 < 20


def test_a_configuration_error_stops_every_worker_instead_of_restarting() -> None:
    from workers.start import supervise

    starts: list[int] = []

    def start(index: int) -> subprocess.Popen[bytes]:
        starts.append(index)
        return _child("import sys; sys.exit(2)" if index == 0 else "import time; time.sleep(60)")

    t0 = time.monotonic()
    assert supervise(start, 2, poll_s=0.1, handle_signals=False) == 2
    assert starts == [0, 1] and time.monotonic() - t0 < 20   # the sleeping one was stopped, none restarted


def test_a_worker_backing_off_does_not_hold_up_the_others() -> None:
    """While one worker waits out its restart backoff, the supervisor still sees the others: a configuration error
    elsewhere stops everything at once, not after the backoff."""
    from workers.start import supervise

    starts: list[int] = []

    def start(index: int) -> subprocess.Popen[bytes]:
        starts.append(index)   # worker 0 crashes at once every time (backoff 1, 2, 4 s ...)
        return _child("import sys; sys.exit(1)" if index == 0 else "import sys, time; time.sleep(4); sys.exit(2)")

    t0 = time.monotonic()
    assert supervise(start, 2, poll_s=0.1, handle_signals=False) == 2
    assert time.monotonic() - t0 < 6.5   # worker 1's exit at 4 s is seen during worker 0's backoff (to 7 s or later)
    assert starts.count(0) >= 2 and starts.count(1) == 1
