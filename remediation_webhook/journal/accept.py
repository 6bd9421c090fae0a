"""Accepting a notification: one transaction that records every alert occurrence and decides what it asks for.

An occurrence is fingerprint + startsAt + the hash of the alert's labels; its last status is a column. So:
- the same occurrence delivered again is a duplicate (counted, never re-executed), unless it is firing with a
  fault_timestamp newer than its remediation's success (a recurrence);
- a resolved delivery holds its pending plan (HELD); the same occurrence firing again resumes it, and an
  occurrence decided once as firing is never planned twice;
- another alert reusing a live alert's fingerprint with other labels is a conflict: journaled, counted, and not
  planned until the Alertmanager check before acting has told which of the two is real (engine re-plans it);
- an event fault (fault_timestamp) at or before the journal's last successful fix of the same GPU or node is
  already remediated, whatever Prometheus shows; an escalation whose claimed history the journal does not hold is
  refused (`unconfirmed`).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..config import SafetyConfig
from ..policy import RANK, Evidence
from .history import Fix, last_fix, unconfirmed
from .rows import MetricEvent, Remediation, audit, get_meta, record_result, set_meta
from .schema import ACTIVE, ACTIVE_SQL, ATTEMPTED_SQL

# Remediations a resolved alert holds (HELD) at once; a running one is held by the engine before its next rung.
HOLDABLE = ("PLANNED", "BLOCKED", "AWAITING_APPROVAL")


@dataclass(frozen=True)
class AlertIn:
    """One alert, already judged by the policy (pure), as the accept transaction needs it."""

    fingerprint: str
    starts_key: str
    starts_ts: float
    status: str
    alertname: str
    labels_json: str
    node: str | None
    gpu: str
    uuid: str
    decision: str
    reason: str
    wants: str = ""
    rule: str = ""
    ladder: tuple[str, ...] = ()
    target_index: int = -1
    dry_run: bool = True
    requires_approval: tuple[str, ...] = ()
    fault_ts: float | None = None
    blocked_event: MetricEvent | None = None  # metric labels if a refusal counts as a blocked action
    skip_event: MetricEvent | None = None  # first rung's labels, counted if a plan is refused (a skipped storm)
    labels_hash: str = ""
    annotations_json: str = "{}"  # the annotations the webhook reads (fault_timestamp, history_*), for re-plans
    evidence: Evidence | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.fingerprint, self.starts_key, self.labels_hash


@dataclass(frozen=True)
class AcceptIn:
    alerts: tuple[AlertIn, ...]
    group_key: str
    truncated: int
    now: float
    pool: int | None
    policy_hash: str
    safety: SafetyConfig
    actor: str = "alertmanager"
    hold: float = 3600.0  # policy.resolved_hold


@dataclass
class AcceptOut:
    accepted: int = 0
    duplicates: int = 0
    ignored: int = 0
    refused: int = 0
    rejected: int = 0
    merged: int = 0
    resumed: int = 0
    already_remediated: int = 0
    unconfirmed: int = 0
    conflicts: int = 0
    remediation_ids: list[str] = field(default_factory=list)
    metric_events: list[MetricEvent] = field(default_factory=list)
    breaker_tripped: str = ""
    undo_scheduled: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "ignored": self.ignored,
                "refused": self.refused, "rejected": self.rejected, "merged": self.merged, "resumed": self.resumed,
                "already_remediated": self.already_remediated, "unconfirmed": self.unconfirmed,
                "conflicts": self.conflicts, "remediation_ids": self.remediation_ids,
                **({"breaker_tripped": self.breaker_tripped} if self.breaker_tripped else {})}

    def decisions(self) -> dict[str, int]:
        """Counts by the decision names of gpu_remediation_webhook_alerts_total."""
        return {"planned": self.accepted, "duplicate": self.duplicates, "ignored": self.ignored,
                "refused": self.refused, "rejected": self.rejected, "merged": self.merged, "resumed": self.resumed,
                "already_remediated": self.already_remediated, "unconfirmed": self.unconfirmed,
                "conflict": self.conflicts}


def accept(conn: sqlite3.Connection, batch: AcceptIn) -> AcceptOut:
    """Journal one notification: occurrences, decisions, planned remediations, audit; trips the breaker."""
    out = AcceptOut()
    now, safety = batch.now, batch.safety
    breaker_open = get_meta(conn, "breaker") is not None
    skip = skip_cutoff(get_meta(conn, "breaker_reset"))
    window_start = now - safety.breaker.window
    new_node = False  # a node not alerting within the breaker window before: the storm count may grow
    for a in batch.alerts:
        row = conn.execute("SELECT * FROM occurrence WHERE fingerprint=? AND starts_at=? AND labels_hash=?",
                           a.key).fetchone()
        fix = _fix(conn, a, safety)
        conflict = False
        if row is not None:
            if not _known(conn, a, row, batch, fix, out):
                continue
        else:
            # An alert of a skipped storm, or a fault already remediated, does not count towards the next storm.
            wants = "" if storm_skip_reason(skip, a.starts_ts, a.fault_ts) or fix else a.wants
            if a.status == "firing" and a.node is not None and wants and not new_node:
                new_node = conn.execute("SELECT 1 FROM occurrence WHERE node=? AND first_seen>=? AND status='firing' "
                                        "AND wants!='' LIMIT 1", (a.node, window_start)).fetchone() is None
            conflict = a.status == "firing" and a.decision == "plan" and _live_twin(conn, a) is not None
            conn.execute("INSERT INTO occurrence(fingerprint, starts_at, labels_hash, status, first_seen, last_seen, "
                         "alertname, node, wants, labels_json, annotations_json, group_key, decision, reason, "
                         "fault_ts, starts_ts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (*a.key, a.status, now, now, a.alertname[:1000], a.node, wants, a.labels_json,
                          a.annotations_json, batch.group_key[:2000], a.decision, a.reason, a.fault_ts, a.starts_ts))
        if a.status == "firing":
            if a.alertname in safety.breaker.trip_on_alerts and not breaker_open:
                breaker_open = _trip(conn, now, f"alert {a.alertname} is firing", batch.actor, out)
        if conflict:
            decision, reason, rid = _conflict(conn, a, batch, out)
        else:
            decision, reason, rid = _decide(conn, a, batch, breaker_open, skip, fix, out)
        conn.execute("UPDATE occurrence SET decision=?, reason=?, remediation_id=?, "
                     "firing_decided=MAX(firing_decided, ?) WHERE fingerprint=? AND starts_at=? AND labels_hash=?",
                     (decision, reason, rid, int(a.status == "firing"), *a.key))
    if batch.truncated and safety.breaker.trip_on_truncated and not breaker_open:
        breaker_open = _trip(conn, now, f"a notification arrived with {batch.truncated} truncated alerts",
                             batch.actor, out)
    if new_node and not breaker_open:
        window = safety.breaker.window
        n = conn.execute("SELECT COUNT(DISTINCT node) FROM occurrence WHERE status='firing' AND node IS NOT NULL "
                         "AND wants!='' AND first_seen>=?", (window_start,)).fetchone()[0]
        threshold = safety.breaker.threshold(batch.pool)
        if n > threshold:
            _trip(conn, now, f"{n} nodes alerting within {window:.0f}s (threshold {threshold})", batch.actor, out)
    return out


def replan(conn: sqlite3.Connection, a: AlertIn, batch: AcceptIn) -> tuple[str, str, str | None, list[MetricEvent]]:
    """Decide again for an occurrence the engine hands back (a conflict twin whose rival Alertmanager did not
    confirm, an alert merged into a remediation that was cancelled): as if it arrived now, firing."""
    out = AcceptOut()
    breaker_open = get_meta(conn, "breaker") is not None
    decision, reason, rid = _decide(conn, a, batch, breaker_open, skip_cutoff(get_meta(conn, "breaker_reset")),
                                    _fix(conn, a, batch.safety), out)
    conn.execute("UPDATE occurrence SET decision=?, reason=?, remediation_id=?, firing_decided=1 "
                 "WHERE fingerprint=? AND starts_at=? AND labels_hash=?", (decision, reason, rid, *a.key))
    audit(conn, batch.now, batch.actor, "replanned", rid, a.node, fingerprint=a.fingerprint, startsAt=a.starts_key,
          decision=decision, reason=reason)
    return decision, reason, rid, out.metric_events


def _fix(conn: sqlite3.Connection, a: AlertIn, safety: SafetyConfig) -> Fix | None:
    """The journal's successful fix that makes this event fault old news, if there is one."""
    if not safety.already_remediated_check:
        return None
    if a.status != "firing" or a.decision != "plan" or a.fault_ts is None or a.node is None or not a.ladder:
        return None
    fix = last_fix(conn, a.node, a.uuid, a.ladder[a.target_index], a.dry_run)
    return fix if fix is not None and fix.covers(a.fault_ts) else None


def _known(conn: sqlite3.Connection, a: AlertIn, row: sqlite3.Row, batch: AcceptIn, fix: Fix | None,
           out: AcceptOut) -> bool:
    """A delivery of an occurrence already journaled; True when it needs a decision (again)."""
    now = batch.now
    conn.execute("UPDATE occurrence SET deliveries=deliveries+1, last_seen=?, status=? "
                 "WHERE fingerprint=? AND starts_at=? AND labels_hash=?", (now, a.status, *a.key))
    if row["status"] == a.status:
        if a.status == "firing" and _recurrence(conn, a, row):
            return _recurred(conn, a, row, batch)
        # A remediation the engine held because Alertmanager no longer knew the alert resumes on a re-send.
        if a.status == "firing" and _resume(conn, row, batch, out):
            return False
        out.duplicates += 1
        return False
    if a.status == "resolved":
        _hold(conn, row, batch)
        out.ignored += 1
        if batch.safety.undo_enabled:
            rid = _schedule_undo(conn, a, now, batch.safety.healthy_delay, batch.actor)
            if rid:
                out.undo_scheduled.append(rid)
        return False
    # resolved -> firing: Alertmanager resolved an alert it had not heard about for a while and fires it again.
    if _resume(conn, row, batch, out):
        return False
    if _recurrence(conn, a, row):  # ... with a fault newer than our fix
        return _recurred(conn, a, row, batch)
    if row["firing_decided"]:
        out.duplicates += 1  # decided once as firing: never planned twice
        return False
    return True


def _recurred(conn: sqlite3.Connection, a: AlertIn, row: sqlite3.Row, batch: AcceptIn) -> bool:
    conn.execute("UPDATE occurrence SET fault_ts=? WHERE fingerprint=? AND starts_at=? AND labels_hash=?",
                 (a.fault_ts, *a.key))
    audit(conn, batch.now, batch.actor, "recurrence", row["remediation_id"], a.node, fingerprint=a.fingerprint,
          fault_ts=a.fault_ts)
    return True


def _recurrence(conn: sqlite3.Connection, a: AlertIn, row: sqlite3.Row) -> bool:
    """A re-sent firing occurrence whose fault_timestamp is newer than the last fault decided for it is a new fault,
    decided again (the journal's last fix tells whether it is already remediated), unless the remediation it
    belongs to is still unfinished (that one handles it; the fault is looked at again on a later re-send)."""
    if a.status != "firing" or a.decision != "plan" or a.fault_ts is None or not row["firing_decided"]:
        return False
    if row["fault_ts"] is not None and a.fault_ts <= row["fault_ts"]:
        return False
    if row["remediation_id"] is None:
        return True
    rem = conn.execute("SELECT state FROM remediation WHERE id=?", (row["remediation_id"],)).fetchone()
    return rem is None or rem["state"] not in ACTIVE


def _is_source(rem: sqlite3.Row, row: sqlite3.Row) -> bool:
    return (rem["source_fp"], rem["source_starts_at"], rem["source_labels_hash"]) == \
        (row["fingerprint"], row["starts_at"], row["labels_hash"])


def _hold(conn: sqlite3.Connection, row: sqlite3.Row, batch: AcceptIn) -> None:
    """The occurrence resolved: its plan, if it has not started a step, waits (HELD) for it to fire again."""
    if row["remediation_id"] is None:
        return
    rem = conn.execute("SELECT * FROM remediation WHERE id=?", (row["remediation_id"],)).fetchone()
    if rem is None or rem["state"] not in HOLDABLE or not _is_source(rem, row):
        return
    hold_remediation(conn, rem["id"], batch.now, batch.hold, batch.actor, "its alert resolved")


def hold_remediation(conn: sqlite3.Connection, rid: str, now: float, hold: float, actor: str, why: str, *,
                     unless_firing: bool = False) -> bool:
    """Park an unfinished remediation that is not in the middle of a step in HELD, until its alert fires again or
    `hold` seconds after it was held. `unless_firing`: not if the journal saw its alert fire again meanwhile (the
    engine read "resolved" a moment ago). False if it was not held."""
    rem = conn.execute("SELECT * FROM remediation WHERE id=?", (rid,)).fetchone()
    if rem is None or rem["state"] not in (*HOLDABLE, "RUNNING", "HELD"):
        return False
    if unless_firing:
        source = conn.execute("SELECT status FROM occurrence WHERE fingerprint=? AND starts_at=? AND labels_hash=?",
                              (rem["source_fp"], rem["source_starts_at"], rem["source_labels_hash"])).fetchone()
        if source is not None and source["status"] == "firing":
            return False
    held_at = rem["held_at"] or now
    conn.execute("UPDATE remediation SET state='HELD', reason=?, updated_at=?, state_since=?, held_at=?, "
                 "not_before=? WHERE id=?",
                 (f"held: {why}; resumes if the same alert fires again, cancelled at "
                  f"{datetime.fromtimestamp(held_at + hold, UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}",
                  now, now, held_at, held_at + hold, rid))
    audit(conn, now, actor, "held", rid, rem["node"], reason=why, previous=rem["state"], until=held_at + hold)
    return True


def _resume(conn: sqlite3.Connection, row: sqlite3.Row, batch: AcceptIn, out: AcceptOut) -> bool:
    if row["remediation_id"] is None:
        return False
    rem = conn.execute("SELECT * FROM remediation WHERE id=?", (row["remediation_id"],)).fetchone()
    if rem is None or rem["state"] != "HELD" or not _is_source(rem, row):
        return False
    state, reason = ("BLOCKED", "breaker open") if get_meta(conn, "breaker") is not None else ("PLANNED", "")
    # A later hold counts its time afresh.
    conn.execute("UPDATE remediation SET state=?, reason=?, updated_at=?, state_since=?, not_before=0, held_at=0 "
                 "WHERE id=?", (state, reason, batch.now, batch.now, rem["id"]))
    audit(conn, batch.now, batch.actor, "resumed", rem["id"], rem["node"], fingerprint=row["fingerprint"])
    out.resumed += 1
    out.remediation_ids.append(rem["id"])
    return True


def _refired(conn: sqlite3.Connection, a: AlertIn, rem: Remediation, batch: AcceptIn, breaker_open: bool,
             out: AcceptOut) -> tuple[str, str, str]:
    """The alert a HELD remediation waits for fired again with a new startsAt (Prometheus restarted, or
    Alertmanager resolved it during an outage and Prometheus sent it again): what it waited for has come. It resumes
    with this occurrence as its source, which the engine verifies with Alertmanager before each step. Merged
    instead, it waited out resolved_hold and the fault went unremediated (found by the fleet soak)."""
    state, reason = ("BLOCKED", "breaker open") if breaker_open else ("PLANNED", "")
    conn.execute("UPDATE remediation SET state=?, reason=?, source_starts_at=?, starts_ts=?, updated_at=?, "
                 "state_since=?, not_before=0, held_at=0 WHERE id=?",
                 (state, reason, a.starts_key, a.starts_ts, batch.now, batch.now, rem.id))
    audit(conn, batch.now, batch.actor, "resumed", rem.id, a.node, fingerprint=a.fingerprint, startsAt=a.starts_key)
    out.resumed += 1
    out.remediation_ids.append(rem.id)
    return "resumed", "the alert its held remediation waited for fired again", rem.id


def _live_twin(conn: sqlite3.Connection, a: AlertIn) -> sqlite3.Row | None:
    """A firing occurrence with this fingerprint but other labels that is the alert of an unfinished remediation
    (not merely merged into one: a merged alert is never verified, so it cannot be told real or forged)."""
    return conn.execute(f"SELECT o.*, r.id AS owner FROM occurrence o JOIN remediation r ON "
                        f"r.source_fp=o.fingerprint AND r.source_starts_at=o.starts_at AND "
                        f"r.source_labels_hash=o.labels_hash WHERE o.fingerprint=? AND o.labels_hash!=? AND "
                        f"o.status='firing' AND r.state IN ({ACTIVE_SQL}) LIMIT 1",
                        (a.fingerprint, a.labels_hash)).fetchone()


def _conflict(conn: sqlite3.Connection, a: AlertIn, batch: AcceptIn, out: AcceptOut) -> tuple[str, str, None]:
    twin = _live_twin(conn, a)
    assert twin is not None
    out.conflicts += 1
    reason = (f"conflict: remediation {twin['owner']} acts on an alert with this fingerprint and other "
              f"labels; this one waits until Alertmanager tells which is real")
    audit(conn, batch.now, batch.actor, "conflict", twin["owner"], a.node, fingerprint=a.fingerprint,
          startsAt=a.starts_key, labels_hash=a.labels_hash, twin_labels_hash=twin["labels_hash"])
    return "conflict", reason, None


def _trip(conn: sqlite3.Connection, now: float, reason: str, actor: str, out: AcceptOut) -> bool:
    set_meta(conn, "breaker", {"reason": reason, "since": now})
    conn.execute("UPDATE remediation SET state='BLOCKED', reason='breaker open', updated_at=?, state_since=? "
                 "WHERE state='PLANNED'", (now, now))
    audit(conn, now, actor, "breaker_tripped", reason=reason)
    out.breaker_tripped = reason
    return True


def skip_cutoff(reset: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The last breaker reset if it carries a skip-backlog cut-off (`skip_before`: its own, or an earlier one a
    resume reset kept), else None."""
    if reset is None or reset.get("skip_before") is None:
        return None
    return reset


def storm_skip_reason(skip: Mapping[str, Any] | None, starts_ts: float, fault_ts: float | None = None) -> str:
    """Why an alert that began at `starts_ts` belongs to the storm skipped by `skip` ('' if it does not).

    An alert belongs to the skipped storm when its fault came at or before the skip-backlog reset: a group
    Alertmanager delivers later, or an alert still pending in Prometheus at the reset. An event alert's fault time is
    its fault_timestamp annotation, not its startsAt: when Prometheus restarts or Alertmanager resolves it during an
    outage, the same fault fires again with a new startsAt, and it is still the storm's (the fleet soak found a
    Prometheus restart turning a skipped storm into remediations). It is acted on when its fault_timestamp says a
    new fault came after the reset; a later skip-backlog reset moves the cut-off, a resume reset keeps it.
    An alert without a fault_timestamp (a condition) is judged by its startsAt: it is acted on once it resolves and
    fires again.
    """
    began = fault_ts if fault_ts is not None else starts_ts
    if skip is None or began > float(skip["skip_before"]):
        return ""
    at = datetime.fromtimestamp(float(skip["skip_before"]), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    what = "its fault came" if fault_ts is not None and fault_ts < starts_ts else "began"
    return f"{what} before the breaker reset with skip-backlog at {at} by {skip.get('skip_by', skip.get('by', '?'))}"


def _refused(conn: sqlite3.Connection, a: AlertIn, now: float, actor: str, reason: str,
             event: MetricEvent | None, out: AcceptOut, **detail: Any) -> None:
    audit(conn, now, actor, "refused", None, a.node, fingerprint=a.fingerprint, reason=reason, **detail)
    if event:
        record_result(conn, now, event, None, out.metric_events)


def _decide(conn: sqlite3.Connection, a: AlertIn, batch: AcceptIn, breaker_open: bool,
            skip: Mapping[str, Any] | None, fix: Fix | None, out: AcceptOut) -> tuple[str, str, str | None]:
    now, safety = batch.now, batch.safety
    if a.status == "resolved":
        out.ignored += 1
        return "ignored", "resolved", None
    if a.decision == "reject":
        out.rejected += 1
        audit(conn, now, batch.actor, "rejected", None, a.node, fingerprint=a.fingerprint, reason=a.reason)
        return "rejected", a.reason, None
    if a.decision == "ignore":
        out.ignored += 1
        return "ignored", a.reason, None
    if a.decision == "refuse":
        out.refused += 1
        _refused(conn, a, now, batch.actor, a.reason, a.blocked_event, out)
        return "refused", a.reason, None
    skipped = storm_skip_reason(skip, a.starts_ts, a.fault_ts)
    if skipped:  # part of a storm the operator chose not to act on: refused like the backlog it missed
        out.refused += 1
        _refused(conn, a, now, batch.actor, skipped, a.skip_event, out, startsAt=a.starts_key)
        return "refused", skipped, None
    if fix is not None and a.fault_ts is not None:
        # The rules may say otherwise (a scrape gap, a new webhook `instance`): the journal decides.
        out.already_remediated += 1
        audit(conn, now, batch.actor, "already_remediated", fix.remediation_id, a.node, fingerprint=a.fingerprint,
              startsAt=a.starts_key, **fix.record(a.fault_ts))
        return "already_remediated", fix.reason(a.fault_ts), fix.remediation_id
    assert a.node is not None
    if a.evidence is not None:
        why = unconfirmed(conn, a.node, a.uuid, a.evidence, now, a.dry_run)
        if why:
            out.unconfirmed += 1
            _refused(conn, a, now, batch.actor, why, a.blocked_event, out, evidence=dataclasses.asdict(a.evidence))
            return "unconfirmed", why, None
    active = conn.execute(f"SELECT * FROM remediation WHERE node=? AND state IN ({ACTIVE_SQL})", (a.node,)).fetchone()
    if active is not None:
        rem = Remediation.from_row(active)
        if rem.state == "HELD" and (rem.source_fp, rem.source_labels_hash) == (a.fingerprint, a.labels_hash):
            return _refired(conn, a, rem, batch, breaker_open, out)
        out.merged += 1
        if rem.rule == a.rule and a.target_index > rem.target and rem.ladder == a.ladder[: len(rem.ladder)] \
                and len(a.ladder) > len(rem.ladder) and rem.state != "HEALTHY_DELAY":
            # The rungs above its own alert's come from this one: verified with Alertmanager before they run.
            conn.execute("UPDATE remediation SET target=?, ladder_json=?, updated_at=?, escalation_fp=?, "
                         "escalation_starts_at=?, escalation_labels_hash=? WHERE id=?",
                         (a.target_index, json.dumps(a.ladder), now, *a.key, rem.id))
            audit(conn, now, batch.actor, "escalated", rem.id, a.node, to=a.ladder[a.target_index],
                  fingerprint=a.fingerprint)
            return "escalated", f"raised the active remediation to {a.ladder[a.target_index]}", rem.id
        audit(conn, now, batch.actor, "merged", rem.id, a.node, fingerprint=a.fingerprint)
        return "merged", "the node already has an active remediation", rem.id
    refusal = _per_node_refusal(conn, a, now, safety)
    rid = uuid.uuid4().hex
    state, reason = "PLANNED", a.reason
    if refusal:
        state, reason = "REFUSED", refusal
    elif breaker_open:
        state, reason = "BLOCKED", "breaker open"
    conn.execute(
        "INSERT INTO remediation(id, node, gpu, uuid, alertname, rule, ladder_json, target, state, reason, dry_run, "
        "requires_approval_json, source_fp, source_starts_at, source_labels_hash, starts_ts, policy_hash, created_at, "
        "updated_at, finished_at, state_since, source_target, evidence_json) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (rid, a.node, a.gpu, a.uuid, a.alertname[:1000], a.rule, json.dumps(a.ladder), a.target_index, state, reason,
         int(a.dry_run), json.dumps(sorted(a.requires_approval)), a.fingerprint, a.starts_key, a.labels_hash,
         a.starts_ts, batch.policy_hash, now, now, now if state == "REFUSED" else None, now, a.target_index,
         json.dumps(dataclasses.asdict(a.evidence)) if a.evidence else None))
    audit(conn, now, batch.actor, "planned" if state != "REFUSED" else "refused", rid, a.node,
          fingerprint=a.fingerprint, startsAt=a.starts_key, rule=a.rule, ladder=list(a.ladder), dry_run=a.dry_run,
          reason=reason)
    if state == "REFUSED":
        out.refused += 1
        if a.blocked_event:
            record_result(conn, now, a.blocked_event, rid, out.metric_events)
        return "refused", refusal or "", rid
    out.accepted += 1
    out.remediation_ids.append(rid)
    return "planned", reason, rid


def _per_node_refusal(conn: sqlite3.Connection, a: AlertIn, now: float, safety: SafetyConfig) -> str | None:
    # Dry-run history counts for dry-run (so it shows what live would do) and not for live, and vice versa.
    last = conn.execute("SELECT * FROM remediation WHERE node=? AND dry_run=? AND state IN "
                        "('SUCCEEDED','FAILED','CLOSED','DRY_RUN_RECORDED','OVERRIDDEN') "
                        "ORDER BY finished_at DESC LIMIT 1", (a.node, int(a.dry_run))).fetchone()
    if last is not None and safety.cooldown and now - (last["finished_at"] or 0) < safety.cooldown:
        prev = Remediation.from_row(last)
        # A higher rung of the same rule may escalate; so may an alert whose history the journal just confirmed
        # (replace after repeated resets fires right after the last reset, under another rule).
        higher = a.target_index > prev.target if prev.rule == a.rule else (
            a.evidence is not None and RANK.get(a.ladder[a.target_index], 0) > RANK.get(prev.ladder[prev.target], 0))
        if not higher:
            return f"node in cooldown until {(last['finished_at'] or 0) + safety.cooldown:.0f}"
    attempts = conn.execute(f"SELECT COUNT(*) FROM remediation WHERE node=? AND dry_run=? AND started=1 AND "
                            f"created_at>=? AND state IN ({ATTEMPTED_SQL},'DRY_RUN_RECORDED')",
                            (a.node, int(a.dry_run), now - safety.attempts_window)).fetchone()[0]
    if attempts >= safety.max_attempts:
        return f"attempt cap reached ({attempts} in {safety.attempts_window:.0f}s): a human must look"
    return None


def _schedule_undo(conn: sqlite3.Connection, a: AlertIn, now: float, delay: float, actor: str) -> str | None:
    row = conn.execute("SELECT id, node FROM remediation WHERE source_fp=? AND source_starts_at=? AND "
                       "source_labels_hash=? AND state='SUCCEEDED' AND dry_run=0 ORDER BY created_at DESC LIMIT 1",
                       a.key).fetchone()
    if row is None:
        return None
    try:
        conn.execute("UPDATE remediation SET state='HEALTHY_DELAY', not_before=?, reason=?, updated_at=?, "
                     "state_since=? WHERE id=?",
                     (now + delay, "alert resolved; waiting for the healthy delay before undoing our cordon", now,
                      now, row["id"]))
    except sqlite3.IntegrityError:
        audit(conn, now, actor, "undo_skipped", row["id"], row["node"], reason="another remediation is active")
        return None
    audit(conn, now, actor, "undo_scheduled", row["id"], row["node"], due=now + delay)
    return str(row["id"])
