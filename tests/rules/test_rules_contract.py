"""Every metric a rule reads exists: in the exporter's real output, as a recording rule, or in the webhook contract.

A rule over a misspelt or renamed metric is silently always empty: the alert never fires, and no promtool test can
tell, because the test's input series are spelt the same way as the rule. This test ties the names to what the
exporter really emits (tests/golden/*.prom) and to what the webhook promises (docs/webhook-metrics-contract.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from tools.dashboard_queries import metric_names

ROOT = Path(__file__).resolve().parent.parent.parent
RULES = ROOT / "rules"

# Series Prometheus itself writes: `up` per target, ALERTS per alert.
PROMETHEUS_SERIES = {"up", "ALERTS"}
# Rules that read no metric on purpose: the dead man's switch is vector(1); so is the count of the thermal history
# group's evaluations, which GPUClockSlowdown divides by.
READS_NOTHING = {"GPURemediationWatchdog", "cluster:gpu_clock_event_reason_active_minutes:count"}

def _rules() -> list[tuple[str, str]]:
    out = []
    for path in sorted(RULES.glob("*.yaml")):
        if path.name == "xid-policy.yaml":
            continue
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                out.append((rule.get("alert") or rule["record"], rule["expr"]))
    return out


def exporter_metrics() -> set[str]:
    names: set[str] = set()
    for golden in (ROOT / "tests" / "golden").glob("*.prom"):
        names |= set(re.findall(r"^# TYPE (\S+)", golden.read_text(encoding="utf-8"), re.M))
    return names


def webhook_metrics() -> set[str]:
    """The metrics listed in the contract's table (first column)."""
    text = (ROOT / "docs" / "webhook-metrics-contract.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `(gpu_remediation_[a-z_]+)` \|", text, re.M))


RULES_AND_EXPRS = _rules()
RECORDS = {  # the records of *.rules.yaml, and those an alerts group makes for its own alerts (the Xid ones)
    rule["record"]
    for path in [*RULES.glob("*.rules.yaml"), *RULES.glob("*.alerts.yaml")]
    for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    for rule in group["rules"]
    if "record" in rule
}


def test_tokenizer() -> None:
    expr = (
        'max by (node, gpu) (rate(gpu_pcie_replays_total{node=~"a|b", counter="x"}[5m] offset 1h)) * 60 > 8 '
        'unless on(node) label_replace(up{job="j"}, "policy", "none", "", "") or ALERTS{alertstate="firing"} '
        "and ignoring(uuid) group_left() node:foo:max"
    )
    assert metric_names(expr) == {"gpu_pcie_replays_total", "up", "ALERTS", "node:foo:max"}


def test_sources_are_not_empty() -> None:
    assert len(exporter_metrics()) > 40
    assert webhook_metrics() == {
        # History
        "gpu_remediation_actions_total", "gpu_remediation_successful_actions",
        "gpu_remediation_last_success_timestamp_seconds", "gpu_remediation_last_failure_timestamp_seconds",
        "gpu_remediation_provider_events_total",
        # The remediator's own state
        "gpu_remediation_remediations", "gpu_remediation_state_since_timestamp_seconds",
        "gpu_remediation_breaker_open", "gpu_remediation_breaker_open_since_timestamp_seconds",
        "gpu_remediation_paused_since_timestamp_seconds", "gpu_remediation_budget_remaining",
        "gpu_remediation_webhook_last_notification_timestamp_seconds", "gpu_remediation_webhook_alerts_total",
        "gpu_remediation_journal_errors_total", "gpu_remediation_engine_last_tick_timestamp_seconds",
        "gpu_remediation_journal_last_prune_timestamp_seconds", "gpu_remediation_operands_paused_since_timestamp_seconds",
    }
    assert RULES_AND_EXPRS and RECORDS


@pytest.mark.parametrize(("name", "expr"), RULES_AND_EXPRS, ids=[n for n, _ in RULES_AND_EXPRS])
def test_every_metric_a_rule_uses_exists(name: str, expr: str) -> None:
    known = exporter_metrics() | RECORDS | webhook_metrics() | PROMETHEUS_SERIES
    used = metric_names(expr)
    if name in READS_NOTHING:
        assert not used, f"{name} reads {sorted(used)}: drop it from READS_NOTHING"
        return
    assert used, f"{name}: no metric found in its expression"
    unknown = used - known
    assert not unknown, (
        f"{name} reads {sorted(unknown)}: not in the exporter's golden output, not a recording rule and not in "
        "docs/webhook-metrics-contract.md"
    )


# In the contract for dashboards only: rules must not count recent actions from a counter a new process restores.
DASHBOARDS_ONLY = {"gpu_remediation_actions_total"}


def test_every_webhook_metric_is_used() -> None:
    used = set().union(*(metric_names(expr) for _, expr in RULES_AND_EXPRS))
    assert webhook_metrics() - DASHBOARDS_ONLY <= used
    assert not DASHBOARDS_ONLY & used, "a rule counts actions from gpu_remediation_actions_total: use the gauges"
