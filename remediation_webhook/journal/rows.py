"""Row types and the small writes every part of the journal shares: audit, meta, results and history."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..policy import Evidence

MetricEvent = tuple[str, str, str, str, str]  # node, gpu, uuid, action, result


@dataclass(frozen=True)
class Remediation:
    id: str
    node: str
    gpu: str
    uuid: str
    alertname: str
    rule: str
    ladder: tuple[str, ...]
    target: int
    next_rung: int
    state: str
    reason: str
    dry_run: bool
    approvals: frozenset[int]
    requires_approval: frozenset[str]
    source_fp: str
    source_starts_at: str
    source_labels_hash: str
    starts_ts: float
    node_uid: str | None
    provider_id: str | None
    node_created: float | None
    policy_hash: str
    created_at: float
    updated_at: float
    finished_at: float | None
    not_before: float
    started: bool
    state_since: float
    hold_placed: bool  # a cordon or taint of ours is on the node: undoing it is a person's override
    held_at: float  # when it was first held (HELD) since its last step; 0 if never
    settle_at: float  # a condition alert's rung succeeded: when to look whether it still fires; 0 if not
    source_target: int  # the rung its own alert asked for; higher rungs came from another alert (escalation)
    escalation: tuple[str, str, str] | None  # the occurrence that raised the target, to verify before those rungs
    evidence: Evidence | None  # the history its alert claimed, checked again against the machine's identity

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Remediation:
        return cls(id=row["id"], node=row["node"], gpu=row["gpu"], uuid=row["uuid"], alertname=row["alertname"],
                   rule=row["rule"], ladder=tuple(json.loads(row["ladder_json"])), target=row["target"],
                   next_rung=row["next_rung"], state=row["state"], reason=row["reason"], dry_run=bool(row["dry_run"]),
                   approvals=frozenset(json.loads(row["approvals_json"])),
                   requires_approval=frozenset(json.loads(row["requires_approval_json"])),
                   source_fp=row["source_fp"], source_starts_at=row["source_starts_at"],
                   source_labels_hash=row["source_labels_hash"], starts_ts=row["starts_ts"],
                   node_uid=row["node_uid"], provider_id=row["provider_id"], node_created=row["node_created"],
                   policy_hash=row["policy_hash"], created_at=row["created_at"], updated_at=row["updated_at"],
                   finished_at=row["finished_at"], not_before=row["not_before"], started=bool(row["started"]),
                   state_since=row["state_since"], hold_placed=bool(row["hold_placed"]), held_at=row["held_at"],
                   settle_at=row["settle_at"], source_target=row["source_target"],
                   escalation=(row["escalation_fp"], row["escalation_starts_at"], row["escalation_labels_hash"])
                   if row["escalation_fp"] else None,
                   evidence=Evidence(**json.loads(row["evidence_json"])) if row["evidence_json"] else None)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "node": self.node, "gpu": self.gpu, "uuid": self.uuid, "alertname": self.alertname,
                "rule": self.rule, "ladder": list(self.ladder), "target": self.ladder[self.target],
                "next_rung": self.next_rung, "state": self.state, "reason": self.reason, "dry_run": self.dry_run,
                "requires_approval": sorted(self.requires_approval), "approved_rungs": sorted(self.approvals),
                "source": {"fingerprint": self.source_fp, "startsAt": self.source_starts_at,
                           "labels_hash": self.source_labels_hash},
                "node_identity": {"uid": self.node_uid, "providerID": self.provider_id,
                                  "created": self.node_created},
                "policy_hash": self.policy_hash, "created_at": self.created_at, "updated_at": self.updated_at,
                "finished_at": self.finished_at, "state_since": self.state_since, "hold_placed": self.hold_placed}


def audit(conn: sqlite3.Connection, now: float, actor: str, event: str, remediation_id: str | None = None,
          node: str | None = None, **detail: Any) -> None:
    conn.execute("INSERT INTO audit(ts, actor, event, remediation_id, node, detail_json) VALUES (?,?,?,?,?,?)",
                 (now, actor, event, remediation_id, node, json.dumps(detail, default=str)))


# The node label of a series about a node name the inventory never resolved (a made-up or mistyped name): one
# series for all of them, so a notification naming thousands of unknown nodes cannot make thousands of series.
# Not a valid node name, so it cannot stand for a real one.
OVERFLOW_NODE = "_unresolved"


def known_node(conn: sqlite3.Connection, node: str) -> bool:
    """Did the inventory ever resolve this node for a remediation?"""
    return conn.execute("SELECT 1 FROM known_node WHERE node=?", (node,)).fetchone() is not None


def know_node(conn: sqlite3.Connection, node: str) -> None:
    """The inventory resolved this node: its actions get series of their own from now on."""
    conn.execute("INSERT OR IGNORE INTO known_node(node) VALUES (?)", (node,))


def metric_labels(conn: sqlite3.Connection, event: MetricEvent) -> MetricEvent:
    """The event as its metric series names it: an unresolved node's goes to the overflow series."""
    return event if known_node(conn, event[0]) else (OVERFLOW_NODE, "", "", *event[3:])


def record_result(conn: sqlite3.Connection, now: float, event: MetricEvent, remediation_id: str | None,
                  out: list[MetricEvent] | None = None) -> None:
    """Journal a finished (or refused) action; `out` gets it as its metric series names it."""
    conn.execute("INSERT INTO action_result(ts, node, gpu, uuid, action, result, remediation_id) VALUES (?,?,?,?,?,?,?)",
                 (now, *event, remediation_id))
    if out is not None:
        out.append(metric_labels(conn, event))


def record_history(conn: sqlite3.Connection, rid: str, event: MetricEvent, started_at: float, finished_at: float) -> None:
    """A successful (or dry-run) action, with the machine it was done to: what `already remediated` and the
    escalation evidence are judged against."""
    node, gpu, uuid, action, result = event
    if result not in ("success", "dry_run"):
        return
    row = conn.execute("SELECT node_uid FROM remediation WHERE id=?", (rid,)).fetchone()
    conn.execute("INSERT INTO history(remediation_id, node, node_uid, gpu, uuid, action, dry_run, started_at, "
                 "finished_at) VALUES (?,?,?,?,?,?,?,?,?)",
                 (rid, node, (row["node_uid"] if row else "") or "", gpu, uuid, action, int(result == "dry_run"),
                  started_at, finished_at))


def get_meta(conn: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return json.loads(row[0]) if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: Mapping[str, Any] | None) -> None:
    if value is None:
        conn.execute("DELETE FROM meta WHERE key=?", (key,))
    else:
        conn.execute("INSERT INTO meta(key, value) VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                     (key, json.dumps(value)))


def load(conn: sqlite3.Connection, remediation_id: str) -> Remediation | None:
    row = conn.execute("SELECT * FROM remediation WHERE id=?", (remediation_id,)).fetchone()
    return Remediation.from_row(row) if row else None


def source_occurrence(conn: sqlite3.Connection, rem: Remediation) -> sqlite3.Row | None:
    return occurrence(conn, (rem.source_fp, rem.source_starts_at, rem.source_labels_hash))


def occurrence(conn: sqlite3.Connection, key: tuple[str, str, str]) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM occurrence WHERE fingerprint=? AND starts_at=? AND labels_hash=?",
                        key).fetchone()
