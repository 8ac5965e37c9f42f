"""The Prometheus rules and the Grafana dashboard shipped in ragq/monitoring: promtool checks the rules and runs
their unit tests (series in, alerts out, with the thresholds of the in-process rules); the dashboard's queries
name only metrics a worker exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parent.parent / "ragq" / "monitoring"
promtool = shutil.which("promtool")


@pytest.mark.skipif(promtool is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_checks_and_tests_the_rules() -> None:
    check = subprocess.run([promtool, "check", "rules", "prometheus-rules.yml"], cwd=MONITORING,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    test = subprocess.run([promtool, "test", "rules", "prometheus-rules.test.yml"], cwd=MONITORING,
                          capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr


def test_rules_use_the_in_process_thresholds() -> None:
    from workers.alerts import ERROR_RATE_THRESHOLD, VRAM_LEVELS

    rules = (MONITORING / "prometheus-rules.yml").read_text()
    for threshold, _severity in VRAM_LEVELS:
        assert f"> {threshold:.2f}" in rules
    assert f"> {ERROR_RATE_THRESHOLD}" in rules and "for: 5m" in rules


def test_rules_name_only_exported_metrics() -> None:
    import workers.metrics as m

    exported = set(re.findall(r'"(ragq_[a-z_]+)"', Path(m.__file__).read_text()))
    used = set(re.findall(r"\b(ragq_[a-z_]+?)(?:_sum|_count|_bucket)?\b", (MONITORING / "prometheus-rules.yml").read_text()))
    assert used and used <= exported, used - exported


def test_the_grafana_dashboard_queries_exported_metrics() -> None:
    import json

    import workers.metrics as m

    exported = set(re.findall(r'"(ragq_[a-z_]+)"', Path(m.__file__).read_text()))
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "ragq-overview" and len(dashboard["panels"]) >= 12
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\b(ragq_[a-z_]+?)(?:_sum|_count|_bucket)?\b", target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)
