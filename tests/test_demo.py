"""The README's first command: `ragq demo` on a fresh home, twice."""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest

from tests.conftest import ragq_env, run_ragq

pytestmark = pytest.mark.integration


def test_demo_runs_twice_and_stops_what_it_started(tmp_path: Path) -> None:
    env = ragq_env(tmp_path / "home", COLUMNS="160")
    first = run_ragq(env, "demo", timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "redis, postgres started" in out and "4 documents" in out
    assert out.count("Q: ") == 3 and out.count("sources") >= 3
    assert "0.15 seconds" in out  # the answer to the first question comes from the sample corpus
    for stage in ("embed", "search", "rerank", "generate"):
        assert stage in out
    assert "stopped what the demo started: redis, postgres" in out
    pids = [int(p) for p in re.search(r"\(pids ([\d, ]+)\)", out).group(1).split(", ")]  # type: ignore[union-attr]
    assert len(pids) == 2 and not any(psutil.pid_exists(pid) for pid in pids)

    second = run_ragq(env, "demo", timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert ", 0 new" in second.stdout  # re-ingesting the corpus adds nothing
