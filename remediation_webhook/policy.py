"""Policy: which alert may run which action ladder. Default deny; pure functions, no I/O.

An alert's `remediation` label names the rung it asks for; the first rule that matches the alert's labels
and whose ladder contains that rung allows the ladder up to and including it (cordon before drain).
Target checks that need the node itself (control plane, opt-out label, node selector) run in the engine
once the inventory has resolved the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from .actions.base import KNOWN_ACTIONS
from .config import PolicyConfig, Rule, TargetsConfig
from .inventory.base import NodeIdentity
from .models import Alert, Target, target_of

# Actions whose metric series carry gpu and uuid (docs/webhook-metrics-contract.md); all others are node actions.
GPU_SCOPED = frozenset({"reset_gpu"})


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

    @property
    def ladder(self) -> tuple[str, ...]:
        return self.rule.ladder[: self.target_index + 1] if self.rule else ()


def metric_target(action: str, target: Target) -> tuple[str, str, str]:
    """(node, gpu, uuid) labels of an action's metric series: gpu and uuid only for GPU actions."""
    if action in GPU_SCOPED:
        return target.node, target.gpu, target.uuid
    return target.node, "", ""


def judge(alert: Alert, policy: PolicyConfig, now: datetime) -> Judgement:
    target = target_of(alert)
    if alert.status != "firing":
        return Judgement(alert, "ignore", "resolved", target if isinstance(target, Target) else None)
    if isinstance(target, str):
        return Judgement(alert, "reject", target)
    wanted = alert.labels.get("remediation", "")
    wants = wanted if wanted in KNOWN_ACTIONS else ""
    if not wanted or wanted == "none":
        return Judgement(alert, "ignore", "no remediation requested", target)
    if not wants:
        return Judgement(alert, "reject", "remediation label names no known action", target)
    age = (now - alert.starts_at).total_seconds()
    if -age > policy.future_skew:
        return Judgement(alert, "reject", "startsAt is in the future", target, wants=wants)
    if policy.max_alert_age and age > policy.max_alert_age:
        return Judgement(alert, "refuse", "alert older than policy.max_alert_age", target, wants=wants)
    matched = False
    for rule in policy.rules:
        if not rule.matches(alert.labels):
            continue
        matched = True
        rung = rule.rung_for(wants)  # the rule's remediation_map may run another rung ("replace, don't repair")
        if rung in rule.ladder:
            return Judgement(alert, "plan", f"rule {rule.name}", target, rule, rule.ladder.index(rung),
                             dry_run=policy.dry_run or rule.dry_run, wants=wants)
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
