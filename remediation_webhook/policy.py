"""Policy: which alert may run which action ladder. Default deny; pure functions, no I/O.

An alert's `remediation` label names the rung it asks for; the first rule that matches the alert's labels
and whose ladder contains that rung allows the ladder up to and including it (cordon before drain).
Target checks that need the node itself (control plane, opt-out label, node selector) run in the engine
once the inventory has resolved the node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from gpu_health_common.durations import parse_duration

from .actions.base import KNOWN_ACTIONS
from .config import PolicyConfig, Rule, TargetsConfig
from .inventory.base import NodeIdentity
from .models import Alert, Target, target_of

# Actions whose metric series carry gpu and uuid (docs/webhook-metrics-contract.md); all others are node actions.
GPU_SCOPED = frozenset({"reset_gpu"})
# How far each action goes: a successful action fixes a fault that asked for its rung or a lower one.
RANK = {"cordon": 0, "taint": 0, "drain": 1, "reset_gpu": 2, "reboot": 3, "replace": 4}
# Escalation evidence may look back at most this far (the journal keeps the history; the rules look back 7 days).
MAX_HISTORY_WINDOW = 90 * 86400.0


@dataclass(frozen=True)
class Evidence:
    """The history an alert says justifies its rung (annotations history_action, history_window, history_min):
    at least `min_count` successful `action` of the alert's node (and GPU) within `window` seconds. The webhook
    recounts it in its journal before acting (docs/webhook-metrics-contract.md)."""

    action: str
    window: float
    min_count: int


@dataclass(frozen=True)
class Judgement:
    """What the policy says about one alert, before the journal looks at duplicates and per-node state."""

    alert: Alert
    decision: str  # plan | ignore | refuse | reject
    reason: str
    target: Target | None = None
    rule: Rule | None = None
    target_index: int = -1
    dry_run: bool = True
    wants: str = ""  # the requested action, when it is a known action name (safe as a metric label)
    fault_ts: float | None = None  # the fault_timestamp annotation: an event alert; None: a condition alert
    evidence: Evidence | None = None

    @property
    def ladder(self) -> tuple[str, ...]:
        return self.rule.ladder[: self.target_index + 1] if self.rule else ()


def metric_target(action: str, target: Target) -> tuple[str, str, str]:
    """(node, gpu, uuid) labels of an action's metric series: gpu and uuid only for GPU actions."""
    if action in GPU_SCOPED:
        return target.node, target.gpu, target.uuid
    return target.node, "", ""


def fault_time(annotations: Mapping[str, str], now: datetime, future_skew: float) -> tuple[float | None, str]:
    """(the fault's Unix time or None, why the annotation is unacceptable or ""). `0` means the exporter lost the
    time: the alert is then treated as a condition, like one without the annotation."""
    raw = annotations.get("fault_timestamp")
    if raw is None or raw.strip() == "":
        return None, ""
    try:
        value = float(raw)
    except ValueError:
        return None, "fault_timestamp annotation is not a number"
    if not math.isfinite(value) or value < 0:
        return None, "fault_timestamp annotation is not a finite time"
    if value > now.timestamp() + future_skew:
        return None, "fault_timestamp annotation is in the future (beyond policy.future_skew)"
    return (value or None), ""


def evidence_of(annotations: Mapping[str, str]) -> tuple[Evidence | None, str]:
    """The history an alert claims (all three history_* annotations), or why they are unacceptable."""
    keys = ("history_action", "history_window", "history_min")
    present = [k for k in keys if annotations.get(k, "").strip()]
    if not present:
        return None, ""
    if len(present) != len(keys):
        return None, "history annotations incomplete: history_action, history_window and history_min go together"
    action = annotations["history_action"].strip()
    if action not in KNOWN_ACTIONS:
        return None, "history_action annotation names no known action"
    try:
        window = parse_duration(annotations["history_window"].strip(), "history_window", error=ValueError)
    except ValueError:
        return None, "history_window annotation is not a duration"
    if not 0 < window <= MAX_HISTORY_WINDOW:
        return None, "history_window annotation must be more than 0 and at most 90d"
    raw_min = annotations["history_min"].strip()
    if not raw_min.isdigit() or not 1 <= int(raw_min) <= 1000:
        return None, "history_min annotation must be a whole number from 1 to 1000"
    return Evidence(action, window, int(raw_min)), ""


def judge(alert: Alert, policy: PolicyConfig, now: datetime) -> Judgement:
    target = target_of(alert)
    ok_target = target if isinstance(target, Target) else None
    if alert.status != "firing":
        return Judgement(alert, "ignore", "resolved", ok_target)
    wanted = alert.labels.get("remediation", "")
    # Alerts that ask for nothing (a human's alert, the storm alert, the watchdog) are ignored before their labels
    # are judged: there is nothing to act on, so nothing to reject.
    if not wanted or wanted == "none":
        return Judgement(alert, "ignore", "no remediation requested", ok_target)
    if isinstance(target, str):
        return Judgement(alert, "reject", target)
    wants = wanted if wanted in KNOWN_ACTIONS else ""
    if not wants:
        return Judgement(alert, "reject", "remediation label names no known action", target)
    age = (now - alert.starts_at).total_seconds()
    if -age > policy.future_skew:
        return Judgement(alert, "reject", "startsAt is in the future", target, wants=wants)
    if policy.max_alert_age and age > policy.max_alert_age:
        return Judgement(alert, "refuse", "alert older than policy.max_alert_age", target, wants=wants)
    fault, why = fault_time(alert.annotations, now, policy.future_skew)
    if why:
        return Judgement(alert, "refuse", why, target, wants=wants)
    evidence, why = evidence_of(alert.annotations)
    if why:
        return Judgement(alert, "refuse", why, target, wants=wants)
    matched = False
    for rule in policy.rules:
        if not rule.matches(alert.labels):
            continue
        matched = True
        rung = rule.rung_for(wants)  # the rule's remediation_map may run another rung ("replace, don't repair")
        if rung in rule.ladder:
            return Judgement(alert, "plan", f"rule {rule.name}", target, rule, rule.ladder.index(rung),
                             dry_run=policy.dry_run or rule.dry_run, wants=wants, fault_ts=fault,
                             evidence=evidence)
    reason = "no rule allows this remediation for this alert" if matched else "no rule matches (default deny)"
    return Judgement(alert, "refuse", reason, target, wants=wants)


def target_refusal(node: NodeIdentity, targets: TargetsConfig) -> str | None:
    """Why this node may not be touched at all, or None."""
    labels: Mapping[str, str] = node.labels
    for label in targets.control_plane_labels:
        if label in labels:
            return f"control-plane node ({label}); never touched"
    if labels.get(targets.opt_out_label, "").lower() in ("true", "yes", "1"):
        return f"node opted out ({targets.opt_out_label})"
    for k, v in targets.node_selector.items():
        if labels.get(k) != v:
            return f"node does not match policy.targets.node_selector ({k})"
    return None
