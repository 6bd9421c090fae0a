"""Every panel query, with the dashboard variables substituted, parses as PromQL (`promtool check rules`, each query
written as a recording rule), and tools/dashboard_queries.py gives the end-to-end suite every query ready to run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tools import dashboard_queries as dq

ROOT = Path(__file__).resolve().parent.parent.parent
PROMTOOL = shutil.which("promtool")




def _as_rules(queries: list[tuple[str, str, str]]) -> dict[str, Any]:
    return {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}:check", "expr": expr} for i, (_, _, expr) in enumerate(queries)]}]}


def _promtool_check(tmp_path: Path, queries: list[tuple[str, str, str]]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(_as_rules(queries), sort_keys=False, width=10_000), encoding="utf-8")
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, check=False, text=True,
                          timeout=60)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not found: install Debian's `prometheus` package")
@pytest.mark.parametrize("node", ["gpu-node-1", "gpu-17.example.net"])
def test_every_panel_query_parses(tmp_path: Path, node: str) -> None:
    queries = dq.panel_queries(node=node)
    result = _promtool_check(tmp_path, queries)
    if result.returncode != 0:
        # Name the panel: promtool reports the rule's index.
        bad = [f"{d} / {p}: {e}" for d, p, e in queries if _promtool_check(tmp_path, [(d, p, e)]).returncode]
        pytest.fail("queries promtool rejects:\n" + "\n".join(bad) + "\n" + result.stdout + result.stderr)
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not found: install Debian's `prometheus` package")
def test_promtool_check_catches_a_broken_query(tmp_path: Path) -> None:
    result = _promtool_check(tmp_path, [("d", "p", 'sum by (node) (rate(gpu_pcie_replays_total{node="n"}[1m])')])
    assert result.returncode != 0


def test_panel_queries_substitutes_every_variable() -> None:
    queries = dq.panel_queries(node="node-a", cluster="prod", gpu="3", rate_interval="2m", range_="6h")
    assert len(queries) == len(dq.queries()) > 50
    for dashboard, panel, expr in queries:
        assert "$" not in expr and "[[" not in expr, (dashboard, panel, expr)
    joined = "\n".join(e for _, _, e in queries)
    assert 'node="node-a"' in joined and 'node=~"node-a"' in joined
    assert 'cluster=~"prod"' in joined and 'gpu=~"3"' in joined
    assert "[2m]" in joined and "[6h]" in joined
    assert {d for d, _, _ in queries} == {"gpu-health-fleet", "gpu-health-node", "gpu-health-remediation"}


def test_panel_queries_defaults_to_all_clusters_and_gpus() -> None:
    joined = "\n".join(e for _, _, e in dq.panel_queries(node="n1"))
    assert 'cluster=~".*"' in joined and 'gpu=~".*"' in joined and "[1m]" in joined


def test_command_line_prints_one_json_object_per_query() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "dashboard_queries.py"), "--node", "n1"],
                            capture_output=True, check=False, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(dq.queries())
    assert all(line.startswith('{"dashboard": "gpu-health-') for line in lines)


def test_metric_names_ignores_functions_labels_and_keywords() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, action) (rate(gpu_remediation_step_duration_seconds_bucket'
            '{result="success", node=~"a|b"}[5m]))) / on(node) group_left() max by (node) (up offset 5m) '
            'or vector(0) unless count(ALERTS{alertname="x"}) > bool 1 and node_gpu:gpu_nvlink_down_links:count')
    assert dq.metric_names(expr) == {"gpu_remediation_step_duration_seconds_bucket", "up", "ALERTS",
                                     "node_gpu:gpu_nvlink_down_links:count"}
