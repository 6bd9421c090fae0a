"""Rules about the rules: every alert is tested, documented and labelled, and the XID policy covers the catalog.

These hold for alerts added later too: a new alert without a promtool test that shows it firing and silent, a
runbook section, a valid `remediation` label or (for remediation alerts) `keep_firing_for` fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.xid.catalog import XID_CATALOG

ROOT = Path(__file__).resolve().parent.parent.parent
RULES = ROOT / "rules"
RUNBOOKS = ROOT / "docs" / "runbooks.md"

REMEDIATIONS = {"none", "cordon", "drain", "reset_gpu", "reboot", "replace"}
SEVERITIES = {"critical", "warning", "info"}
COMPONENTS = {"xid", "memory", "nvlink", "pcie", "thermal", "availability", "exporter", "remediation"}
# Alerts whose input can never carry scrape-side labels: GPURemediationStorm reads ALERTS, which Prometheus writes;
# GPURemediationWatchdog reads nothing.
NO_SCRAPE_LABELS = {"GPURemediationStorm", "GPURemediationWatchdog"}
# The dead man's switch fires from the first evaluation on: it has no silent edge to test.
ALWAYS_FIRING = {"GPURemediationWatchdog"}
# Alerts about the fleet or the remediator, not one node.
FLEET_LEVEL = {
    "GPURemediationStorm", "GPURemediationNoCapacity",
    # rules/remediator.alerts.yaml
    "GPURemediationWebhookDown", "GPURemediationWebhookAbsent", "GPURemediationWatchdog",
    "GPURemediationNoNotifications", "GPURemediationBreakerOpen", "GPURemediationPausedTooLong",
    "GPURemediationBudgetExhausted", "GPURemediationStuck", "GPURemediationNeedsHuman", "GPURemediationJournalErrors",
    "GPURemediationEngineStalled", "GPURemediationAlertConflict", "GPURemediationJournalNotPruned",
}
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules(pattern: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(RULES.glob(pattern)):
        for group in _load(path)["groups"]:
            for rule in group["rules"]:
                yield path, rule


ALERTS = {rule["alert"]: rule for _, rule in _rules("*.alerts.yaml") if "alert" in rule}
RECORDS = {rule["record"] for pattern in ("*.rules.yaml", "*.alerts.yaml") for _, rule in _rules(pattern)
           if "record" in rule}
TEST_FILES = sorted((RULES / "tests").glob("*.test.yaml"))
POLICY = _load(RULES / "xid-policy.yaml")


def _seconds(duration: str) -> int:
    m = _DURATION.match(duration)
    assert m and duration, f"not a simple duration: {duration!r}"
    h, mi, s = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces to dashes."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def _test_cases() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in TEST_FILES:
        for case in _load(path)["tests"]:
            yield path, case


def _groups(pattern: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(RULES.glob(pattern)):
        for group in _load(path)["groups"]:
            yield path, group


def _names(expr: str) -> set[str]:
    return set(re.findall(r"\b([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b", expr))


def test_files_are_split_by_kind() -> None:
    """Recording rules live in *.rules.yaml, alerts in *.alerts.yaml, and every rule file is one of the two; an
    alerts group may begin with records that a later rule of the same group reads (the Xid alerts: read the same
    evaluation, not one an interval old)."""
    assert ALERTS and RECORDS
    for path, rule in _rules("*.rules.yaml"):
        assert "record" in rule, f"{path.name}: alert {rule.get('alert')} belongs in an .alerts.yaml file"
    for path, group in _groups("*.alerts.yaml"):
        rules = group["rules"]
        for i, rule in enumerate(rules):
            if "record" in rule:
                assert all("record" in r for r in rules[:i]), f"{path.name}: {rule['record']} after an alert"
                assert any(rule["record"] in _names(r["expr"]) for r in rules[i + 1:]), (
                    f"{path.name}: recording rule {rule['record']} is read by no later rule of its group: it "
                    "belongs in a .rules.yaml file")
    others = {p.name for p in RULES.glob("*.y*ml")} - {p.name for p in RULES.glob("*.rules.yaml")}
    others -= {p.name for p in RULES.glob("*.alerts.yaml")}
    assert others == {"xid-policy.yaml"}


# Records of another group that an alert firing at once may read: only to clear a fault already fixed, where a
# record an evaluation old delays nothing that matters.
CLEARING_ONLY = {("GPUNVSwitchFatalError", "node:gpu_remediation_last_success_timestamp_seconds:max")}


def test_alerts_that_fire_at_once_read_no_record_of_another_group() -> None:
    """Groups run at offsets of their own within the interval: an alert that reads a record of another group sees
    it up to one evaluation later, so a fault can take an extra interval to fire (the Xid alerts did, when their
    records had a group of their own: Xid 48 to cordon 17 to 34 s at 15 s settings, Xid 79 8 to 26 s)."""
    where = {rule["record"]: group["name"] for pattern in ("*.rules.yaml", "*.alerts.yaml")
             for _, group in _groups(pattern) for rule in group["rules"] if "record" in rule}
    assert where
    for _, group in _groups("*.alerts.yaml"):
        for rule in group["rules"]:
            if "alert" not in rule or _seconds(str(rule.get("for", "0m"))):
                continue
            other = {n for n in _names(rule["expr"]) if where.get(n, group["name"]) != group["name"]}
            assert other <= {n for a, n in CLEARING_ONLY if a == rule["alert"]}, (rule["alert"], other)


def test_recording_rule_names_follow_level_metric_operation() -> None:
    for name in RECORDS:
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_labels_and_annotations(name: str) -> None:
    rule = ALERTS[name]
    labels, annotations = rule.get("labels", {}), rule.get("annotations", {})
    assert labels.get("severity") in SEVERITIES
    assert labels.get("remediation") in REMEDIATIONS
    assert labels.get("component") in COMPONENTS
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key), f"{name}: no {key} annotation"
    assert "for" in rule, f"{name}: choose a `for:` (0m for faults that fire at once) and explain it"
    if labels["remediation"] != "none":
        keep = rule.get("keep_firing_for")
        assert keep and _seconds(keep) >= 300, (
            f"{name}: a remediation alert needs keep_firing_for >= 5m so a scrape gap or exporter restart "
            "neither resolves nor re-fires it"
        )


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_has_a_runbook_section(name: str) -> None:
    url = ALERTS[name]["annotations"]["runbook_url"]
    assert url == f"docs/runbooks.md#{name.lower()}"
    assert name.lower() in _anchors(RUNBOOKS.read_text(encoding="utf-8")), f"docs/runbooks.md has no '## {name}'"


def test_every_runbook_section_is_an_alert_or_the_policy() -> None:
    sections = re.findall(r"^## (.+)$", RUNBOOKS.read_text(encoding="utf-8"), re.M)
    assert set(sections) - {"XID policy"} == set(ALERTS), "runbook sections without an alert, or the reverse"


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_alert_has_unit_tests_firing_and_silent(name: str) -> None:
    """A promtool case expects it firing (with its labels) and one expects it silent (before `for`, or no fault)."""
    firing = silent = scrape_labels = False
    rule_labels = ALERTS[name]["labels"]
    for _, case in _test_cases():
        inputs = " ".join(s["series"] for s in case.get("input_series", []))
        for check in case.get("alert_rule_test", []):
            if check["alertname"] != name:
                continue
            expected = check.get("exp_alerts") or []
            if not expected:
                silent = True
                continue
            firing = True
            scrape_labels |= bool(re.search(r"\b(pod|instance)=", inputs))
            for alert in expected:
                for key, value in rule_labels.items():
                    assert alert["exp_labels"].get(key) == value, f"{name}: exp_labels must state {key}={value}"
                assert "summary" in alert.get("exp_annotations", {}), f"{name}: exp_annotations must state summary"
                if name not in FLEET_LEVEL:
                    assert alert["exp_labels"].get("node"), f"{name}: every alert names its node"
                assert not {"pod", "instance", "job"} & set(alert["exp_labels"]), f"{name}: scrape labels leak"
    assert firing, f"{name}: no promtool test expects it firing"
    assert silent or name in ALWAYS_FIRING, f"{name}: no promtool test expects it silent (e.g. before its `for`)"
    if name not in NO_SCRAPE_LABELS:
        assert scrape_labels, f"{name}: fire it from input series with pod/instance labels, to show they are dropped"


def test_unit_test_files_are_well_formed() -> None:
    for path, case in _test_cases():
        assert case.get("name"), f"{path.name}: every test case needs a name"
    for path in TEST_FILES:
        doc = _load(path)
        groups = [
            g["name"] for rf in doc["rule_files"] for g in _load((path.parent / rf).resolve())["groups"]
        ]
        if len(groups) > 1:
            # Without a complete order promtool evaluates groups in random order, and alerts built on recording
            # rules would lag by one evaluation in some runs and not others.
            assert sorted(doc.get("group_eval_order", [])) == sorted(groups), f"{path.name}: group_eval_order"


# --- the XID policy ------------------------------------------------------------------------------------


def test_every_catalog_bucket_has_a_policy_row() -> None:
    buckets = {info.action for info in XID_CATALOG.values()}
    missing = buckets - set(POLICY["buckets"])
    assert not missing, f"catalog buckets without a row in rules/xid-policy.yaml: {sorted(missing)}"


def test_every_policy_row_is_used_and_reasoned() -> None:
    used = {info.action for info in XID_CATALOG.values()}
    used |= {row["bucket"] for row in POLICY["codes"].values() if "bucket" in row}
    assert set(POLICY["buckets"]) <= used, "rows for buckets no code has"
    for where, row in [*POLICY["buckets"].items(), *POLICY["codes"].items(), *POLICY["recovery_actions"].items()]:
        assert len(str(row.get("reason", ""))) > 20, f"{where}: give the row a reason"
    for code in POLICY["codes"]:
        assert code in XID_CATALOG


def _generator() -> Any:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_xid_rules
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return gen_xid_rules


def test_every_code_gets_exactly_one_class_in_the_generated_rules() -> None:
    gen = _generator()
    text = (RULES / "xid.alerts.yaml").read_text(encoding="utf-8")
    classified: dict[int, str] = {}
    for regex, cls in re.findall(r'gpu_xid_last_timestamp_seconds\{xid=~"([0-9|]+)"\}\), "policy", "(\w+)"', text):
        for code in map(int, regex.split("|")):
            assert code not in classified, f"Xid {code} is in two classes"
            classified[code] = cls
    assert sorted(classified) == list(range(1, 173))
    assert classified == {code: gen.classify(POLICY, code) for code in range(1, 173)}
    # Codes outside the catalog: the policy's `unknown` class.
    assert re.search(r'xid!~"1\|2\|3\|[0-9|]+\|172"\}\), "policy", "' + POLICY["unknown"]["class"], text)


@pytest.mark.parametrize(
    ("code", "cls"),
    [(45, "none"), (13, "none"), (31, "none"), (43, "none"), (94, "none"), (48, "reset_gpu"), (119, "reset_gpu"),
     (120, "reset_gpu"), (79, "reboot"), (151, "reboot"), (74, "human"), (144, "human"), (150, "human"),
     (154, "recovery"), (61, "human"), (14, "human"), (108, "human"), (142, "human"), (162, "human"),
     (172, "human")],
)
def test_reviewed_decisions(code: int, cls: str) -> None:
    assert _generator().classify(POLICY, code) == cls


def test_unknown_and_unused_codes_are_never_destructive() -> None:
    gen = _generator()
    destructive = {"reset_gpu", "reboot"}
    assert POLICY["unknown"]["class"] not in destructive
    for code, info in XID_CATALOG.items():
        if info.unused or info.action == "NONE_GIVEN":
            assert gen.classify(POLICY, code) not in destructive, code


def test_policy_classes_match_their_alerts() -> None:
    """Each class's alert exists, selects the class, and carries the class's remediation and severity."""
    used = {_generator().classify(POLICY, c) for c in XID_CATALOG} | {"human"}
    used_recovery = {row["class"] for row in POLICY["recovery_actions"].values()} | {"human"}
    for cls, spec in POLICY["classes"].items():
        for key, used_by in (("xid_alert", used), ("recovery_alert", used_recovery)):
            name = spec.get(key)
            if cls in used_by and cls not in ("none", "recovery"):
                assert name, f"class {cls} is used but has no {key}"
            if not name:
                continue
            rule = ALERTS[name]
            assert f'policy="{cls}"' in rule["expr"], f"{name} does not select policy {cls}"
            assert rule["labels"]["remediation"] == spec["remediation"]
            assert rule["labels"]["severity"] == spec["severity"]


def test_runbook_explains_every_bucket() -> None:
    text = RUNBOOKS.read_text(encoding="utf-8")
    section = text.split("## XID policy", 1)[1].split("\n## ", 1)[0]
    for bucket in POLICY["buckets"]:
        assert f"| {bucket} |" in section, f"docs/runbooks.md#xid-policy has no row for {bucket}"


def test_generated_xid_rules_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_xid_rules.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
