"""dashboards/*.json: fixed uids, current panel types only, the datasource / cluster / node variables, a sane grid,
and queries over metrics that exist: the exporter's real output (tests/golden), the recording rules, the webhook's
registry, and Prometheus' own `up` and `ALERTS`. Also: each dashboard shows what the issue asks of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from remediation_webhook.metrics import Metrics
from tools import dashboard_queries as dq

ROOT = Path(__file__).resolve().parent.parent.parent
DASHBOARDS = ROOT / "dashboards"



UIDS = {"gpu-health-fleet", "gpu-health-node", "gpu-health-remediation"}
PANEL_TYPES = {"timeseries", "stat", "table", "state-timeline", "bargauge", "text", "row"}
PROMETHEUS_SERIES = {"up", "ALERTS"}  # written by Prometheus itself: per target, and per alerting rule


def exporter_metrics() -> set[str]:
    names: set[str] = set()
    for golden in [*(ROOT / "tests" / "golden").glob("*.prom"), ROOT / "tests" / "dcgm" / "golden-dcgm.prom"]:
        names |= set(re.findall(r"^# TYPE (\S+)", golden.read_text(encoding="utf-8"), re.MULTILINE))
    return names


def recording_rules() -> dict[str, str]:
    """record -> expr, for every recording rule in rules/."""
    out = {}
    for path in [*(ROOT / "rules").glob("*.rules.yaml"), *(ROOT / "rules").glob("*.alerts.yaml")]:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if "record" in rule:  # an alerts group may make records for its own alerts (the Xid ones)
                    out[rule["record"]] = rule["expr"]
    return out


def webhook_metrics() -> set[str]:
    """The series names the webhook's registry exposes (counters with _total, histograms' three series)."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


EXPORTER = exporter_metrics()
RECORDS = recording_rules()
WEBHOOK = webhook_metrics()
KNOWN = EXPORTER | set(RECORDS) | WEBHOOK | PROMETHEUS_SERIES
DASH = dq.load_dashboards()


def panels(uid: str) -> list[dict[str, Any]]:
    return list(dq.iter_panels(DASH[uid]))


def exprs(uid: str) -> list[str]:
    return [q.expr for q in dq.queries() if q.dashboard == uid]


def used_metrics(uid: str) -> set[str]:
    return set().union(*(dq.metric_names(e) for e in exprs(uid)))


def covered(uid: str) -> set[str]:
    """Metrics a dashboard shows, directly or through the recording rules it reads (transitively)."""
    seen: set[str] = set()
    todo = list(used_metrics(uid))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in RECORDS:
            todo += dq.metric_names(RECORDS[name])
    return seen


def family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name) if name.endswith(("_bucket", "_sum", "_count")) else name


def test_the_three_dashboards_with_fixed_unique_uids() -> None:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert {json.loads(p.read_text(encoding="utf-8"))["uid"] for p in files} == UIDS
    for path in files:
        d = json.loads(path.read_text(encoding="utf-8"))
        assert path.stem == d["uid"], "file named after its uid"
        assert d["id"] is None, "no instance-specific id"
        assert d["title"].startswith("gpu-health / ")
        assert "gpu-health" in d["tags"]
        assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 39  # Grafana 11+


def test_files_are_normalised_json() -> None:
    """Stable diffs: sorted keys (as Grafana exports them), two-space indent, a final newline, no export leftovers."""
    for path in DASHBOARDS.glob("*.json"):
        text = path.read_text(encoding="utf-8")
        d = json.loads(text)
        assert text == json.dumps(d, indent=2, ensure_ascii=False, sort_keys=True) + "\n", f"{path.name}: normalise it"
        assert "__inputs" not in d and "__requires" not in d
        assert "${DS_" not in text, "an exported datasource input: use the ${datasource} variable"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_current_panel_types_only(uid: str) -> None:
    for p in panels(uid):
        assert p["type"] in PANEL_TYPES, f"{p.get('title')}: {p['type']} (graph, singlestat, ... are deprecated)"
        assert "pluginVersion" not in p or p["type"] != "graph"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_query_uses_the_datasource_variable(uid: str) -> None:
    text = json.dumps(DASH[uid])
    uids = set(re.findall(r'"uid": "([^"]*)"', text)) - {uid}
    assert uids <= {"${datasource}", "-- Grafana --"}, uids
    for p in panels(uid):
        if p["type"] in {"row", "text"}:
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_variables(uid: str) -> None:
    variables = {v["name"]: v for v in DASH[uid]["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    cluster = variables["cluster"]
    assert cluster["includeAll"] is True and cluster["allValue"] == ".*"
    assert cluster["query"]["query"] == "label_values(gpu_devices_visible, cluster)"
    node = variables["node"]
    assert node["query"]["query"] == 'label_values(gpu_devices_visible{cluster=~"$cluster"}, node)'
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    if uid == "gpu-health-node":
        assert node["multi"] is False and node["includeAll"] is False  # one node
        assert variables["gpu"]["query"]["query"] == 'label_values(gpu_info{cluster=~"$cluster", node="$node"}, gpu)'
        assert variables["gpu"]["allValue"] == ".*"  # also XIDs of PCI ids no GPU had (gpu="unknown")
    else:
        assert node["includeAll"] is True and node["allValue"] == ".*"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_variable_a_query_uses_is_defined(uid: str) -> None:
    defined = {v["name"] for v in DASH[uid]["templating"]["list"]} | set(dq.BUILTINS)
    for expr in exprs(uid):
        assert dq.variables_used(expr) <= defined, expr
    for name, v in ((v["name"], v) for v in DASH[uid]["templating"]["list"] if v["type"] == "query"):
        order = [x["name"] for x in DASH[uid]["templating"]["list"]]
        for used in dq.variables_used(v["query"]["query"]):
            assert order.index(used) < order.index(name), f"${name} uses ${used}, defined after it"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_grid_layout(uid: str) -> None:
    top = DASH[uid]["panels"]
    ids = [p["id"] for p in dq.iter_panels(DASH[uid])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: dict[tuple[int, int], str] = {}
    for p in top:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p.get("title")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p.get('title')!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p.get("title", "")
    titles = [p["title"] for p in dq.iter_panels(DASH[uid]) if p["type"] not in {"row", "text"}]
    assert len(titles) == len(set(titles)), "panel titles are unique within a dashboard (the e2e reports by title)"


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_panels_describe_themselves(uid: str) -> None:
    for p in dq.iter_panels(DASH[uid]):
        if p["type"] not in {"row", "text"}:
            assert len(p.get("description", "")) > 20, p["title"]


def test_every_metric_a_query_reads_exists() -> None:
    unknown = {}
    for q in dq.queries():
        missing = dq.metric_names(q.expr) - KNOWN
        if missing:
            unknown[f"{q.dashboard} / {q.panel}"] = sorted(missing)
    for uid, name, query in dq.variable_queries():
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert inner, query
        missing = dq.metric_names(inner[1]) - KNOWN
        if missing:
            unknown[f"{uid} / ${name}"] = sorted(missing)
    assert not unknown, f"metrics that neither the exporter, the rules nor the webhook produce: {unknown}"


def test_the_known_metrics_are_read_from_the_real_sources() -> None:
    """Guard the guard: the sets above are not empty or stale."""
    assert {"gpu_xid_errors_total", "gpu_dcgm_health_status", "gpu_nvlink_links_up",
            "gpu_nvlink_link_up"} <= EXPORTER
    assert "node_gpu_xid:gpu_xid_last_timestamp_seconds:uncleared" in RECORDS
    assert {"gpu_remediation_actions_total", "gpu_remediation_breaker_open",
            "gpu_remediation_step_duration_seconds_bucket"} <= WEBHOOK


def test_rate_and_increase_only_on_counters() -> None:
    counter = re.compile(r"_(total|bucket|sum|count)$")
    for q in dq.queries():
        for fn, metric in re.findall(r"\b(rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)", q.expr):
            assert counter.search(metric), f"{q.dashboard} / {q.panel}: {fn}() of gauge {metric}"


def test_the_node_dashboard_shows_every_exporter_signal() -> None:
    missing = EXPORTER - covered("gpu-health-node")
    assert not missing, f"exporter metrics the node dashboard does not show: {sorted(missing)}"


def test_the_remediation_dashboard_shows_every_webhook_metric() -> None:
    shown = {family(n) for n in covered("gpu-health-remediation") | covered("gpu-health-fleet")}
    missing = {family(n) for n in WEBHOOK} - shown
    assert not missing, f"webhook metrics no dashboard shows: {sorted(missing)}"


def test_each_dashboard_shows_what_the_issue_asks_of_it() -> None:
    fleet = exprs("gpu-health-fleet")
    joined = "\n".join(fleet)
    assert 'ALERTS{alertstate="firing", severity="critical"' in joined  # GPUs by health
    assert re.search(r"sum by \(action\) \(increase\(gpu_xid_errors_total", joined)  # XIDs by catalog action
    assert {"gpu_remediation_breaker_open", "gpu_remediation_remediations", "gpu_remediation_budget_remaining",
            "gpu_remediation_step_duration_seconds_bucket", "gpu_remediation_actions_total"} <= used_metrics(
        "gpu-health-fleet")
    node = used_metrics("gpu-health-node")
    assert {"gpu_xid_errors_total", "gpu_ecc_errors_total", "gpu_remapped_rows", "gpu_row_remap_pending",
            "gpu_nvlink_links_up", "gpu_nvlink_errors_total", "gpu_nvlink_link_up", "gpu_nvlink_link_errors_total", "gpu_pcie_replays_total", "gpu_pcie_link_width_lanes",
            "gpu_clock_event_reason_active"} <= node
    assert any(p["title"] == "XID timeline" and p["type"] == "timeseries" for p in panels("gpu-health-node"))
    remediation = "\n".join(exprs("gpu-health-remediation"))
    assert "sum by (action, result) (increase(gpu_remediation_actions_total" in remediation  # actions by result
    assert 'state="AWAITING_APPROVAL"' in remediation  # approvals waiting
    assert "gpu_remediation_budget_remaining" in remediation and "gpu_remediation_breaker_open" in remediation


def test_links_between_dashboards_point_at_existing_uids() -> None:
    for uid in UIDS:
        for target in re.findall(r'/d/([\w-]+)/', json.dumps(DASH[uid])):
            assert target in UIDS, f"{uid} links to unknown dashboard {target}"
