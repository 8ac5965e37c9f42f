"""Fixtures: real embedded Redis and Postgres+pgvector (started as `ragq services up` does) and real
`ragq worker` processes. Nothing here is mocked; unit tests of pure code need none of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--drill-busy", type=int, default=0,
                     help="processes spinning on the CPU beside the kill and outage drills (a busy host)")


@pytest.fixture
def drill_busy(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--drill-busy"))


def ragq_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQ_")}
    env.update({"RAGQ_HOME": str(home), "PYTHONUNBUFFERED": "1", "RAGQ_METRICS_PORT": "0"}, **extra)
    return env


def run_ragq(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ragq.cli", *args], env=env, capture_output=True, text=True, timeout=timeout,
        cwd=ROOT, stdin=subprocess.DEVNULL,
    )


def run_chromium(tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Headless Debian chromium with a profile of its own under `tmp_path`, nothing fetched in the background."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    return subprocess.run(["chromium", *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def ragq_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One embedded Redis + Postgres for the session's integration tests."""
    from ragq.core.services import EmbeddedServices
    from ragq.core.settings import Settings

    home = tmp_path_factory.mktemp("home")
    services = EmbeddedServices(Settings(home=home))
    services.up()
    yield home
    services.down()


@pytest.fixture(scope="session")
def settings(ragq_home: Path):  # type: ignore[no-untyped-def]
    from ragq.core.settings import Settings

    return Settings(home=ragq_home)


@pytest.fixture(scope="session")
def client(settings):  # type: ignore[no-untyped-def]
    from ragq.client import Client

    return Client(settings)


class WorkerProcess:
    def __init__(self, env: dict[str, str], name: str, log_path: Path, *extra: str) -> None:
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ragq.cli", "worker", "--device", "cpu", "--name", name, *extra],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
        )

    def wait_ready(self, app, timeout_s: float = 180) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            # the worker's background consumer and its urgent consumer (a child process) both answer
            names = [f"{self.name}@{os.uname().nodename}", f"{self.name}-urgent@{os.uname().nodename}"]
            replies = app.control.ping(destination=names, timeout=0.5)
            if len(replies) == len(names):
                return
        raise RuntimeError(f"worker not ready:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def worker(ragq_home: Path, client, tmp_path_factory) -> Iterator[WorkerProcess]:  # type: ignore[no-untyped-def]
    """A real `ragq worker --device cpu` (default models: all-MiniLM-L6-v2, no reranker or generator)."""
    log_path = tmp_path_factory.mktemp("logs") / "worker.log"
    proc = WorkerProcess(ragq_env(ragq_home), "pytest", log_path)
    try:
        proc.wait_ready(client.app)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.tinymodels import build_qwen3

    root = tmp_path_factory.mktemp("models")
    return {
        "embed": build_qwen3(root / "tiny-qwen3-embed", causal=False, seed=1),
        "lm": build_qwen3(root / "tiny-qwen3-lm", causal=True, seed=2),
    }


@pytest.fixture(scope="session")
def db_engine(settings):  # type: ignore[no-untyped-def]
    """The session's Postgres, migrated, as a SQLAlchemy engine."""
    from ragq.core.db import ensure_schema, get_engine
    from ragq.core.services import ensure_services

    url = ensure_services(settings).database_url
    ensure_schema(url)
    return get_engine(url)


def delete_rows_from(engine, start) -> None:  # type: ignore[no-untyped-def]
    """Remove the rows a test injected, dated at or after `start` (tests date theirs far from the real ones)."""
    from sqlalchemy import text

    with engine.begin() as conn:
        for table, column in (("stage_timings", "finished_at"), ("model_events", "ts"), ("device_samples", "ts"),
                              ("alerts", "started_at"), ("worker_starts", "started_at")):
            conn.execute(text(f"DELETE FROM {table} WHERE {column} >= :t"), {"t": start})
