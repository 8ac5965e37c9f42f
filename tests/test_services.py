"""`ragq services up | status | down` against real servers, in a home of its own."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import redis
import sqlalchemy

from tests.conftest import ragq_env, run_ragq

pytestmark = pytest.mark.integration


def test_up_is_idempotent_status_reports_and_down_stops_exactly_its_processes(tmp_path: Path, ragq_home: Path) -> None:
    env = ragq_env(tmp_path / "home")
    first = run_ragq(env, "services", "up", "--json")
    assert first.returncode == 0, first.stderr
    up = json.loads(first.stdout)
    for key in ("broker_url", "result_backend", "database_url", "redis_pid", "postgres_pid"):
        assert up[key], key
    assert up["broker_url"].startswith("redis://:") and "@127.0.0.1:" in up["broker_url"]  # loopback only
    assert redis.Redis.from_url(up["broker_url"]).ping()
    with sqlalchemy.create_engine(up["database_url"]).connect() as conn:
        assert "PostgreSQL 16" in conn.execute(sqlalchemy.text("select version()")).scalar_one()
        conn.execute(sqlalchemy.text("create extension if not exists vector"))
        conn.commit()
        assert conn.execute(sqlalchemy.text("select extversion from pg_extension where extname='vector'")).scalar_one()

    # nothing listens beyond this machine: Redis on loopback only, Postgres on a Unix socket (or loopback)
    for pid in (up["redis_pid"], up["postgres_pid"]):
        listening = [c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert all(ip in ("127.0.0.1", "::1") for ip in listening), (pid, listening)

    again = json.loads(run_ragq(env, "services", "up", "--json").stdout)
    assert (again["redis_pid"], again["postgres_pid"]) == (up["redis_pid"], up["postgres_pid"])

    status = json.loads(run_ragq(env, "services", "status", "--json").stdout)
    assert status["redis"] == "running" and status["postgres"] == "running"
    assert status["database_url"] == up["database_url"]

    session_redis = json.loads(run_ragq(ragq_env(ragq_home), "services", "status", "--json").stdout)["redis_pid"]
    down = run_ragq(env, "services", "down", "--json")
    assert down.returncode == 0, down.stderr
    stopped = json.loads(down.stdout)["stopped"]
    assert stopped == {"redis_pid": up["redis_pid"], "postgres_pid": up["postgres_pid"]}
    assert not psutil.pid_exists(up["redis_pid"]) and not psutil.pid_exists(up["postgres_pid"])
    assert psutil.pid_exists(session_redis)  # another home's servers are untouched

    after = json.loads(run_ragq(env, "services", "status", "--json").stdout)
    assert after["redis"] == "stopped" and after["postgres"] == "stopped"
    assert run_ragq(env, "services", "down").returncode == 0  # stopping twice is fine


def test_external_urls_are_used_and_nothing_is_started(tmp_path: Path, settings) -> None:  # type: ignore[no-untyped-def]
    from ragq.core.services import EmbeddedServices

    endpoints = EmbeddedServices(settings).up()
    env = ragq_env(tmp_path / "ext", RAGQ_BROKER_URL=endpoints.broker_url, RAGQ_DATABASE_URL=endpoints.database_url)
    status = json.loads(run_ragq(env, "services", "up", "--json").stdout)
    assert status["redis"] == "external" and status["postgres"] == "external"
    assert status["redis_pid"] is None and status["postgres_pid"] is None
    assert status["result_backend"] == endpoints.broker_url


def test_a_redis_password_that_would_add_config_lines_is_refused(tmp_path: Path) -> None:
    for bad in ("two words", "pw\nrename-command FLUSHALL x"):
        result = run_ragq(ragq_env(tmp_path, RAGQ_REDIS_PASSWORD=bad), "services", "up")
        assert result.returncode == 2, result.stderr
        assert "RAGQ_REDIS_PASSWORD" in result.stderr and "line breaks" in result.stderr
        assert bad not in result.stderr   # the error names the variable, not the secret
        assert not (tmp_path / "run" / "redis.conf").exists()   # nothing written, nothing started


def test_invalid_configuration_exits_non_zero_naming_the_variable(tmp_path: Path) -> None:
    result = run_ragq(ragq_env(tmp_path, RAGQ_VRAM_BUDGET="lots"), "services", "status")
    assert result.returncode == 2
    assert "RAGQ_VRAM_BUDGET" in result.stderr
    result = run_ragq(ragq_env(tmp_path, RAGQ_LEASE_INTERVAL_S="120", RAGQ_VISIBILITY_TIMEOUT_S="60"),
                      "services", "status")
    assert result.returncode == 2
    assert "RAGQ_LEASE_INTERVAL_S (120) must be shorter than RAGQ_VISIBILITY_TIMEOUT_S (60)" in result.stderr


def test_embedded_redis_needs_its_password_which_is_never_shown_or_on_a_command_line(tmp_path: Path) -> None:
    import os
    import stat
    from urllib.parse import urlsplit

    password = "s3cret-Pass/word"
    env = ragq_env(tmp_path / "home", RAGQ_REDIS_PASSWORD=password)
    up = json.loads(run_ragq(env, "services", "up", "--json").stdout)
    try:
        url = urlsplit(up["broker_url"])
        with pytest.raises(redis.AuthenticationError):   # no password: refused
            redis.Redis(host="127.0.0.1", port=url.port).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=url.port, password="guess").ping()
        assert redis.Redis.from_url(up["broker_url"]).ping()        # the URL ragq hands out carries it
        assert redis.Redis(host="127.0.0.1", port=url.port, password=password).ping()
        assert password not in " ".join(psutil.Process(up["redis_pid"]).cmdline())   # ps shows command lines
        run_dir = tmp_path / "home" / "run"
        for name in ("redis.json", "redis.conf"):   # where ragq keeps it: readable by the owner only
            assert stat.S_IMODE(os.stat(run_dir / name).st_mode) == 0o600, name
        shown = run_ragq(env, "services", "status")
        assert shown.returncode == 0 and ":***@127.0.0.1" in shown.stdout and password not in shown.stdout
        for log in run_dir.glob("*.log"):
            assert password not in log.read_text(errors="replace"), log
    finally:
        run_ragq(env, "services", "down")

    # without RAGQ_REDIS_PASSWORD a random one is made, and kept across a restart (clients reconnect with it)
    env = ragq_env(tmp_path / "home2")
    first = json.loads(run_ragq(env, "services", "up", "--json").stdout)["broker_url"]
    try:
        assert len(urlsplit(first).password or "") >= 24
        run_ragq(env, "services", "down")
        again = json.loads(run_ragq(env, "services", "up", "--json").stdout)["broker_url"]
        assert again == first
    finally:
        run_ragq(env, "services", "down")
