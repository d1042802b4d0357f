"""The Prometheus alert rules: valid, unit-tested with promtool, and written against metrics that exist.

promtool ships with Prometheus: `apt-get install -y --no-install-recommends prometheus`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from g2rpo.controller.core import GuidanceController
from g2rpo.controller.metrics import REPORT_METRICS, ControllerMetrics
from g2rpo.guidance.schedule import ScheduleParams

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "manifests" / "prometheus" / "g2rpo-alerts.rules.yaml"
RULE_TESTS = ROOT / "manifests" / "prometheus" / "g2rpo-alerts.test.yaml"
METRICS_DOC = ROOT / "docs" / "metrics.md"

# `make tools` puts promtool into .tools/bin (tools/install_prometheus.py); one on PATH does too.
PROMTOOL = shutil.which("promtool", path=f"{ROOT / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not found: `make tools` installs it")


def exposition() -> str:
    """A controller's /metrics text with every series present (all metrics reported, one request)."""
    metrics = ControllerMetrics("lint")
    controller = GuidanceController(ScheduleParams("adaptive", initial_length=100, min_length=1, max_length=200))
    controller.report(0, 0.5, dict.fromkeys(REPORT_METRICS, 0.5))
    metrics.observe_state(controller)
    metrics.observe_step(controller.history[-1], new=True)
    metrics.count_report("accepted")
    metrics.count_event("rewind")
    metrics.observe_request("/v1/steps", "POST", 200, 0.001)
    return metrics.render()[0].decode()


def promtool(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_rules_are_valid():
    promtool("check", "rules", RULES.name)


@needs_promtool
def test_rules_unit_tests_pass():
    promtool("test", "rules", RULE_TESTS.name)


@needs_promtool
def test_metrics_pass_promtool_lint():
    promtool("check", "metrics", stdin=exposition())


def test_rules_use_only_exported_metrics_and_every_alert_is_tested():
    exported = set(re.findall(r"^(g2rpo_\w+)", exposition(), flags=re.MULTILINE))
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    used = {name for rule in rules for name in re.findall(r"\bg2rpo_\w+", rule["expr"])} - {"g2rpo_job"}  # a label
    assert used and used <= exported, used - exported
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested == {rule["alert"] for rule in rules}


def test_every_metric_family_is_documented():
    families = set(re.findall(r"^# TYPE (g2rpo_\w+)", exposition(), flags=re.MULTILINE))
    documented = set(re.findall(r"`(g2rpo_\w+)`", METRICS_DOC.read_text()))
    assert {f for f in families if not f.endswith("_created")} <= documented
    assert all(f"`{name}`" in METRICS_DOC.read_text() for name in REPORT_METRICS)
