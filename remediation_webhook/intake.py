"""From a judged alert to what the journal records (AlertIn), and back from a journaled occurrence to an alert
the policy can judge again (the engine re-plans occurrences whose owner ended without acting on them)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType

from .journal import AlertIn
from .models import ZERO_TIME, Alert, Target, printable
from .policy import Judgement, metric_target

# The annotations the webhook reads, kept with the occurrence so it can be judged again later.
READ_ANNOTATIONS = ("fault_timestamp", "history_action", "history_window", "history_min")


def _labels_json(judgement: Judgement) -> str:
    labels = dict(judgement.alert.labels)
    if judgement.decision in ("reject", "ignore") or judgement.target is None:
        # Hostile or unusable input, or an alert that asks for nothing: bounded and printable in the journal.
        labels = {printable(k, 64): printable(v, 256) for k, v in list(labels.items())[:64]}
    return json.dumps(labels, sort_keys=True)


def _annotations_json(annotations: Mapping[str, str]) -> str:
    return json.dumps({k: printable(annotations[k], 64) for k in READ_ANNOTATIONS if k in annotations},
                      sort_keys=True)


def alert_in(j: Judgement) -> AlertIn:
    a, t = j.alert, j.target
    node = t.node if isinstance(t, Target) else None
    blocked = None  # counted as a blocked action if the alert is refused, by the policy or by the journal
    if j.decision in ("refuse", "plan") and isinstance(t, Target) and j.wants:
        blocked = (*metric_target(j.wants, t), j.wants, "blocked")
    skip = None  # counted if the journal refuses the plan (an alert of a skipped storm): its first rung, blocked
    if j.decision == "plan" and isinstance(t, Target) and j.ladder:
        skip = (*metric_target(j.ladder[0], t), j.ladder[0], "blocked")
    return AlertIn(
        fingerprint=a.fingerprint, starts_key=a.starts_key, starts_ts=a.starts_at.timestamp(), status=a.status,
        alertname=printable(a.alertname, 1000 if j.decision != "reject" else 200),
        labels_json=_labels_json(j), node=node, gpu=t.gpu if t else "", uuid=t.uuid if t else "",
        decision=j.decision, reason=j.reason, wants=j.wants, rule=j.rule.name if j.rule else "", ladder=j.ladder,
        target_index=j.target_index, dry_run=j.dry_run,
        requires_approval=tuple(sorted(j.rule.requires_approval)) if j.rule else (), fault_ts=j.fault_ts,
        blocked_event=blocked, skip_event=skip, labels_hash=a.labels_hash,
        annotations_json=_annotations_json(a.annotations), evidence=j.evidence)


def occurrence_alert(row: Mapping[str, object]) -> Alert:
    """The firing alert a journaled occurrence was (labels and the annotations the webhook reads)."""
    starts = float(row["starts_ts"] or 0)  # type: ignore[arg-type]
    return Alert(status="firing", labels=MappingProxyType(json.loads(str(row["labels_json"]))),
                 annotations=MappingProxyType(json.loads(str(row["annotations_json"] or "{}"))),
                 starts_at=datetime.fromtimestamp(starts, UTC) if starts else ZERO_TIME, ends_at=ZERO_TIME,
                 generator_url="", fingerprint=str(row["fingerprint"]))
