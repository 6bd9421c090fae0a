"""The deploy manifests follow rules/: the PrometheusRule is current, and Alertmanager routes what the rules say.

Alertmanager's configuration is checked with its own amtool (Debian's prometheus-alertmanager, 0.25), and the
example Prometheus configuration with promtool, which also loads every rule file through it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.example.yml"
RULE_MANIFEST = DEPLOY / "prometheus" / "prometheusrule.yaml"
AMTOOL = shutil.which("amtool")
PROMTOOL = shutil.which("promtool")
ACTIONS = ("cordon", "drain", "reset_gpu", "reboot", "replace")

needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool not found: install Debian's `prometheus-alertmanager` package (.ci/run does)"
)


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT)


# --- PrometheusRule ---------------------------------------------------------------------------------------


def test_prometheusrule_is_current() -> None:
    result = _run(sys.executable, ROOT / "tools" / "render_prometheusrule.py", "--check")
    assert result.returncode == 0, result.stderr


def test_prometheusrule_holds_every_group_of_rules() -> None:
    manifest = yaml.safe_load(RULE_MANIFEST.read_text(encoding="utf-8"))
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1" and manifest["kind"] == "PrometheusRule"
    expected = []
    for path in sorted((ROOT / "rules").glob("*.rules.yaml")) + sorted((ROOT / "rules").glob("*.alerts.yaml")):
        expected += yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    assert manifest["spec"]["groups"] == expected
    # The Xid records and the alerts that read them stay one group (one evaluation, in order).
    xid = next(g for g in expected if g["name"] == "gpu-health.xid")
    kinds = ["record" if "record" in r else "alert" for r in xid["rules"]]
    assert kinds == sorted(kinds, reverse=True) and "record" in kinds and "alert" in kinds


def test_runbook_base_url_makes_links_absolute(tmp_path: Path) -> None:
    out = tmp_path / "rule.yaml"
    result = _run(sys.executable, ROOT / "tools" / "render_prometheusrule.py", "--output", out,
                  "--runbook-base-url", "https://example.org/gpu-health/blob/main/")
    assert result.returncode == 0, result.stderr
    text = out.read_text(encoding="utf-8")
    assert "runbook_url: https://example.org/gpu-health/blob/main/docs/runbooks.md#gpuxidresetrequired" in text


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not found: install Debian's `prometheus` package")
def test_prometheus_example_config_and_its_rules_load() -> None:
    result = _run(PROMTOOL, "check", "config", PROM_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "xid.alerts.yaml" in result.stdout


# --- Alertmanager -----------------------------------------------------------------------------------------


def _am() -> dict[str, Any]:
    return yaml.safe_load(AM_CONFIG.read_text(encoding="utf-8"))


@needs_amtool
def test_alertmanager_config_is_valid() -> None:
    result = _run(AMTOOL, "check-config", AM_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def _route(*labels: str, verify: str) -> subprocess.CompletedProcess[str]:
    assert AMTOOL is not None
    return _run(AMTOOL, "config", "routes", "test", f"--config.file={AM_CONFIG}", f"--verify.receivers={verify}",
                *labels)


@needs_amtool
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("severity", ["critical", "warning"])
def test_remediation_alerts_reach_the_webhook_and_people(action: str, severity: str) -> None:
    # `continue: true` on the webhook route: the same alert also reaches the default (human) receiver.
    result = _route(f"remediation={action}", f"severity={severity}", "node=n1", "alertname=X",
                    verify="gpu-remediation,default")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_amtool
@pytest.mark.parametrize(
    "labels",
    [
        ("remediation=none", "severity=critical", "node=n1", "alertname=GPUNVMLDown"),
        ("severity=critical", "node=n1", "alertname=SomeoneElsesAlert"),  # no remediation label at all
        ("remediation=", "severity=critical", "node=n1"),
        ("remediation=reboot_now", "severity=critical", "node=n1"),  # not an action the webhook knows
    ],
)
def test_other_alerts_only_reach_people(labels: tuple[str, ...]) -> None:
    result = _route(*labels, verify="default")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_amtool
def test_the_storm_alert_reaches_the_webhook_breaker() -> None:
    result = _route("alertname=GPURemediationStorm", "remediation=none", "severity=critical",
                    verify="gpu-remediation,default")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_amtool
def test_the_watchdog_reaches_only_the_webhook() -> None:
    labels = ("alertname=GPURemediationWatchdog", "remediation=none", "severity=info", "component=remediation")
    result = _route(*labels, verify="gpu-remediation")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "gpu-remediation", "people are not paged with the dead man's switch"


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]]


def test_the_watchdog_route_is_first_and_resent_every_5m() -> None:
    """GPURemediationNoNotifications allows 15 minutes without a notification: three re-sends."""
    route = _am()["route"]["routes"][0]
    assert route["matchers"] == ['alertname="GPURemediationWatchdog"'] and route["receiver"] == "gpu-remediation"
    assert "continue" not in route and route["group_by"] == ["alertname"]
    assert _seconds(route["group_wait"]) == 0 and _seconds(route["repeat_interval"]) == 300
    assert _seconds(route["group_interval"]) <= 60


def test_remediation_route_groups_by_node_and_is_fast_for_critical() -> None:
    route = next(r for r in _am()["route"]["routes"]
                 if r.get("matchers") == ['remediation=~"cordon|drain|reset_gpu|reboot|replace"'])
    assert route["receiver"] == "gpu-remediation" and route["continue"] is True
    assert route["group_by"] == ["node"]
    critical = route["routes"][0]
    assert critical["matchers"] == ['severity="critical"']
    assert _seconds(critical["group_wait"]) <= 15 < _seconds(route["group_wait"])


def test_webhook_receiver() -> None:
    receiver = next(r for r in _am()["receivers"] if r["name"] == "gpu-remediation")
    (hook,) = receiver["webhook_configs"]
    assert hook["url"] == "http://gpu-health-webhook:9096/v1/alerts"
    assert hook["send_resolved"] is True and hook["max_alerts"] == 0
    auth = hook["http_config"]["authorization"]
    assert auth["type"] == "Bearer" and auth["credentials_file"] and "credentials" not in auth


def test_ci_installs_alertmanager_for_amtool() -> None:
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any("apt-get install" in line and "prometheus-alertmanager" in line for line in text.splitlines())
