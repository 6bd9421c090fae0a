"""The production fast path (deploy/prometheus/prometheus.fast-path.yml, deploy/alertmanager/alertmanager.fast-path.yml)
is valid, differs from the example configurations only in its timings, and docs/latency.md states its figures for
exactly these settings. The latency itself is measured by `python benchmarks/e2e_latency.py --fast-path`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_FAST = ROOT / "deploy" / "prometheus" / "prometheus.fast-path.yml"
PROM_EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.example.yml"
AM_FAST = ROOT / "deploy" / "alertmanager" / "alertmanager.fast-path.yml"
AM_SHIPPED = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
LATENCY_DOC = ROOT / "docs" / "latency.md"
TIMINGS = {"group_wait", "group_interval", "scrape_interval", "scrape_timeout", "evaluation_interval"}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _without_timings(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_timings(v) for k, v in node.items() if k not in TIMINGS}
    if isinstance(node, list):
        return [_without_timings(v) for v in node]
    return node


def _critical_route(config: dict[str, Any]) -> dict[str, Any]:
    remediation = next(r for r in config["route"]["routes"]
                       if 'remediation=~"cordon|drain|reset_gpu|reboot|replace"' in r.get("matchers", []))
    return {**remediation, **next(r for r in remediation["routes"] if 'severity="critical"' in r["matchers"])}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs Debian's prometheus package (promtool)")
def test_prometheus_fast_path_config_and_its_rules_load() -> None:
    result = subprocess.run(["promtool", "check", "config", str(PROM_FAST)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "xid.alerts.yaml" in result.stdout


@pytest.mark.skipif(shutil.which("amtool") is None, reason="needs Debian's prometheus-alertmanager package (amtool)")
def test_alertmanager_fast_path_config_is_valid_and_routes_as_shipped() -> None:
    result = subprocess.run(["amtool", "check-config", str(AM_FAST)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for labels in (["alertname=GPUXidRebootRequired", "severity=critical", "remediation=reboot", "node=n1"],
                   ["alertname=GPURowRemapPending", "severity=warning", "remediation=reset_gpu", "node=n1"],
                   ["alertname=GPUExporterDown", "severity=warning", "remediation=none", "node=n1"],
                   ["alertname=GPURemediationStorm", "severity=critical", "remediation=none"]):
        routes = [subprocess.run(["amtool", "config", "routes", "test", f"--config.file={path}", *labels],
                                 capture_output=True, text=True, timeout=60, check=False).stdout.strip()
                  for path in (AM_SHIPPED, AM_FAST)]
        assert routes[0] == routes[1], (labels, routes)


def test_fast_path_differs_from_the_examples_only_in_timings() -> None:
    assert _without_timings(_load(AM_FAST)) == _without_timings(_load(AM_SHIPPED))
    fast, example = _load(PROM_FAST), _load(PROM_EXAMPLE)
    assert _without_timings(fast) == _without_timings(example)


def test_latency_doc_states_the_fast_path_settings_and_figures() -> None:
    doc = LATENCY_DOC.read_text(encoding="utf-8")
    prom = _load(PROM_FAST)
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "gpu-health-exporter")
    critical = _critical_route(_load(AM_FAST))
    for setting in (f"scrape_interval: {job['scrape_interval']}",
                    f"evaluation_interval: {prom['global']['evaluation_interval']}",
                    f"group_wait: {critical['group_wait']}", f"group_interval: {critical['group_interval']}"):
        assert setting in doc, f"docs/latency.md does not state {setting!r}"
    # The measured figures, as the benchmark prints them.
    assert re.search(r"fast_path_fault_to_cordon_s=\d+\.\d+", doc)
    assert re.search(r"fault_to_cordon_p50_s=\d+\.\d+", doc)


def test_the_measured_stack_runs_exactly_the_fast_path_settings() -> None:
    """What `benchmarks/e2e_latency.py --fast-path` runs: the files' intervals, group_wait and group_interval."""
    from gpu_health_stack.stack import Stack, Timings

    stack = Stack(timings=Timings.fast_path())
    try:
        prom = stack.prometheus_config()
        am = stack.alertmanager_config(webhook_url="http://127.0.0.1:9/v1/alerts")
    finally:
        stack.close()
    shipped = _load(PROM_FAST)
    assert prom["global"]["evaluation_interval"] == shipped["global"]["evaluation_interval"]
    ours = next(j for j in prom["scrape_configs"] if j["job_name"] == "gpu-health-exporter")
    theirs = next(j for j in shipped["scrape_configs"] if j["job_name"] == "gpu-health-exporter")
    assert (ours["scrape_interval"], ours["scrape_timeout"]) == (theirs["scrape_interval"], theirs["scrape_timeout"])
    assert am["route"] == _load(AM_FAST)["route"]
