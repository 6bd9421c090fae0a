"""The journal's tables, its states, and the migration of a journal written by an older version.

Tables: occurrence (one row per alert occurrence: fingerprint + startsAt + labels hash; its last status is a
column), remediation (at most one active per node, enforced by a partial unique index), step (an intent row
written before each side effect, completed after it), action_result (every finished action: the source of the
persistent counters), history (every successful or dry-run action with the node identity it was done to: the
source of "already remediated", escalation evidence and the history gauges), action_total (finished actions
folded by retention), known_node (nodes the inventory resolved: the only ones with metric series of their own),
node_mark (nodes we hold: the fleet cap), audit (append-only), meta (pause switch, breaker, last notification).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

from ..models import labels_hash

VERSION = 2

# Unfinished: the node belongs to this remediation. HELD: its alert resolved before the plan finished; it resumes
# if the same occurrence fires again, and is cancelled after policy.resolved_hold.
ACTIVE = ("PLANNED", "BLOCKED", "AWAITING_APPROVAL", "RUNNING", "NEEDS_HUMAN", "HEALTHY_DELAY", "HELD")
# OVERRIDDEN: a person undid our step (uncordoned the node) in the middle of the remediation; it stops for good.
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "REFUSED", "DRY_RUN_RECORDED", "CLOSED", "OVERRIDDEN")
ACTIVE_SQL = ",".join(f"'{s}'" for s in ACTIVE)
# Remediations that count as an attempt on the node (per-node attempt cap).
ATTEMPTED_SQL = "'RUNNING','NEEDS_HUMAN','HEALTHY_DELAY','SUCCEEDED','FAILED','CLOSED','OVERRIDDEN'"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS occurrence(
  fingerprint TEXT NOT NULL, starts_at TEXT NOT NULL, labels_hash TEXT NOT NULL, status TEXT NOT NULL,
  first_seen REAL NOT NULL, last_seen REAL NOT NULL, deliveries INTEGER NOT NULL DEFAULT 1,
  alertname TEXT NOT NULL, node TEXT, wants TEXT NOT NULL DEFAULT '', labels_json TEXT NOT NULL,
  annotations_json TEXT NOT NULL DEFAULT '{{}}', group_key TEXT NOT NULL, decision TEXT NOT NULL,
  reason TEXT NOT NULL, remediation_id TEXT, fault_ts REAL, starts_ts REAL NOT NULL DEFAULT 0,
  firing_decided INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (fingerprint, starts_at, labels_hash));
CREATE INDEX IF NOT EXISTS occurrence_first_seen ON occurrence(first_seen);
CREATE INDEX IF NOT EXISTS occurrence_node_seen ON occurrence(node, first_seen);
CREATE INDEX IF NOT EXISTS occurrence_fingerprint ON occurrence(fingerprint);
CREATE INDEX IF NOT EXISTS occurrence_remediation ON occurrence(remediation_id) WHERE remediation_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS remediation(
  id TEXT PRIMARY KEY, node TEXT NOT NULL, gpu TEXT NOT NULL, uuid TEXT NOT NULL,
  alertname TEXT NOT NULL, rule TEXT NOT NULL, ladder_json TEXT NOT NULL, target INTEGER NOT NULL,
  next_rung INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
  dry_run INTEGER NOT NULL, approvals_json TEXT NOT NULL DEFAULT '[]', requires_approval_json TEXT NOT NULL,
  source_fp TEXT NOT NULL, source_starts_at TEXT NOT NULL, source_labels_hash TEXT NOT NULL DEFAULT '',
  starts_ts REAL NOT NULL, node_uid TEXT, provider_id TEXT, node_created REAL,
  policy_hash TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL,
  not_before REAL NOT NULL DEFAULT 0, started INTEGER NOT NULL DEFAULT 0,
  state_since REAL NOT NULL DEFAULT 0, hold_placed INTEGER NOT NULL DEFAULT 0, held_at REAL NOT NULL DEFAULT 0,
  settle_at REAL NOT NULL DEFAULT 0, source_target INTEGER NOT NULL DEFAULT -1, escalation_fp TEXT,
  escalation_starts_at TEXT, escalation_labels_hash TEXT, evidence_json TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS remediation_one_active_per_node ON remediation(node) WHERE state IN ({ACTIVE_SQL});
CREATE INDEX IF NOT EXISTS remediation_state ON remediation(state);
CREATE INDEX IF NOT EXISTS remediation_node ON remediation(node, created_at);
CREATE INDEX IF NOT EXISTS remediation_source ON remediation(source_fp, source_starts_at);
CREATE INDEX IF NOT EXISTS remediation_settle ON remediation(settle_at) WHERE settle_at > 0;
CREATE TABLE IF NOT EXISTS step(
  remediation_id TEXT NOT NULL, seq INTEGER NOT NULL, rung INTEGER NOT NULL, action TEXT NOT NULL,
  state TEXT NOT NULL, dry_run INTEGER NOT NULL, started_at REAL NOT NULL, finished_at REAL,
  outcome TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '', calls_json TEXT NOT NULL DEFAULT '[]',
  PRIMARY KEY (remediation_id, seq));
CREATE INDEX IF NOT EXISTS step_action_started ON step(action, started_at);
CREATE TABLE IF NOT EXISTS action_result(
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, node TEXT NOT NULL, gpu TEXT NOT NULL,
  uuid TEXT NOT NULL, action TEXT NOT NULL, result TEXT NOT NULL, remediation_id TEXT);
CREATE TABLE IF NOT EXISTS action_total(
  node TEXT NOT NULL, gpu TEXT NOT NULL, uuid TEXT NOT NULL, action TEXT NOT NULL, result TEXT NOT NULL,
  count INTEGER NOT NULL, last_ts REAL NOT NULL, PRIMARY KEY (node, gpu, uuid, action, result));
CREATE TABLE IF NOT EXISTS history(
  id INTEGER PRIMARY KEY AUTOINCREMENT, remediation_id TEXT NOT NULL, node TEXT NOT NULL,
  node_uid TEXT NOT NULL DEFAULT '', gpu TEXT NOT NULL, uuid TEXT NOT NULL, action TEXT NOT NULL,
  dry_run INTEGER NOT NULL, started_at REAL NOT NULL, finished_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS history_node ON history(node, action, finished_at);
CREATE INDEX IF NOT EXISTS history_live ON history(dry_run, finished_at);
CREATE TABLE IF NOT EXISTS known_node(node TEXT PRIMARY KEY);
INSERT OR IGNORE INTO known_node SELECT DISTINCT node FROM remediation WHERE node_uid IS NOT NULL;
CREATE TABLE IF NOT EXISTS node_mark(node TEXT PRIMARY KEY, remediation_id TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit(
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL, event TEXT NOT NULL,
  remediation_id TEXT, node TEXT, detail_json TEXT NOT NULL DEFAULT '{{}}');
CREATE INDEX IF NOT EXISTS audit_remediation ON audit(remediation_id);
"""


def create_or_migrate(conn: sqlite3.Connection) -> None:
    """Bring any journal to VERSION in one transaction: a new one is created, a version-1 one (occurrences keyed
    by fingerprint + startsAt + status, no history table) is migrated in place, keeping every row."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > VERSION:
        raise sqlite3.DatabaseError(f"journal schema version {version} is newer than this webhook's ({VERSION})")
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        # INCREMENTAL, so retention can give pruned pages back to the file system. A file with pages already (WAL
        # mode writes one) needs a VACUUM to take it: a rebuild, seconds for a large journal, once.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            conn.execute("VACUUM")
    conn.execute("BEGIN IMMEDIATE")
    try:
        old = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='occurrence'").fetchone()
        if old is not None and version < 2:
            _from_v1(conn)
        for statement in _statements(SCHEMA):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def _from_v1(conn: sqlite3.Connection) -> None:
    # occurrence: the key loses the status (kept as the last status seen) and gains the labels hash.
    rows = conn.execute("SELECT * FROM occurrence ORDER BY last_seen").fetchall()
    names = [d[0] for d in conn.execute("SELECT * FROM occurrence LIMIT 0").description]
    conn.execute("ALTER TABLE occurrence RENAME TO occurrence_v1")
    conn.execute("DROP INDEX IF EXISTS occurrence_first_seen")
    conn.execute("DROP INDEX IF EXISTS occurrence_node_seen")
    for statement in _statements(SCHEMA):
        if "occurrence" in statement and "remediation(" not in statement:
            conn.execute(statement)
    merged: dict[tuple[str, str, str], dict[str, object]] = {}
    for raw in rows:
        row = dict(zip(names, raw, strict=True))
        try:
            digest = labels_hash(json.loads(str(row["labels_json"])))
        except (ValueError, TypeError, AttributeError):
            digest = ""
        key = (str(row["fingerprint"]), str(row["starts_at"]), digest)
        seen = merged.get(key)
        if seen is None:
            merged[key] = {**row, "labels_hash": digest, "firing_decided": int(row["status"] == "firing")}
            continue
        # The firing row carries the decision; the row seen last carries the status.
        firing = row if row["status"] == "firing" else seen
        merged[key] = {**firing, "labels_hash": digest, "status": row["status"], "last_seen": row["last_seen"],
                       "first_seen": min(float(seen["first_seen"]), float(row["first_seen"])),  # type: ignore[arg-type]
                       "deliveries": int(seen["deliveries"]) + int(row["deliveries"]),  # type: ignore[call-overload]
                       "firing_decided": int(seen.get("firing_decided", 0) or row["status"] == "firing")}  # type: ignore[call-overload]
    for row in merged.values():
        try:
            row["starts_ts"] = datetime.strptime(str(row["starts_at"]), "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=UTC).timestamp()
        except ValueError:
            row["starts_ts"] = 0.0
        # v1 kept the fault time but not the annotations: enough to judge the occurrence again.
        row["annotations_json"] = (json.dumps({"fault_timestamp": f"{float(row['fault_ts']):.0f}"})  # type: ignore[arg-type]
                                   if row.get("fault_ts") is not None else "{}")
        conn.execute("INSERT INTO occurrence(fingerprint, starts_at, labels_hash, status, first_seen, last_seen, "
                     "deliveries, alertname, node, wants, labels_json, group_key, decision, reason, remediation_id, "
                     "fault_ts, firing_decided, starts_ts, annotations_json) "
                     "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     tuple(row.get(k) for k in ("fingerprint", "starts_at", "labels_hash", "status", "first_seen",
                                                "last_seen", "deliveries", "alertname", "node", "wants",
                                                "labels_json", "group_key", "decision", "reason", "remediation_id",
                                                "fault_ts", "firing_decided", "starts_ts", "annotations_json")))
    conn.execute("DROP TABLE occurrence_v1")
    have = _columns(conn, "remediation")
    # v1's one-active-per-node index lists v1's active states; the schema creates it again with HELD.
    conn.execute("DROP INDEX IF EXISTS remediation_one_active_per_node")
    for column, decl in (("source_labels_hash", "TEXT NOT NULL DEFAULT ''"), ("state_since", "REAL NOT NULL DEFAULT 0"),
                         ("hold_placed", "INTEGER NOT NULL DEFAULT 0"), ("held_at", "REAL NOT NULL DEFAULT 0"),
                         ("settle_at", "REAL NOT NULL DEFAULT 0"), ("source_target", "INTEGER NOT NULL DEFAULT -1"),
                         ("escalation_fp", "TEXT"), ("escalation_starts_at", "TEXT"),
                         ("escalation_labels_hash", "TEXT"), ("evidence_json", "TEXT")):
        if column not in have:
            conn.execute(f"ALTER TABLE remediation ADD COLUMN {column} {decl}")
    conn.execute("UPDATE remediation SET state_since=updated_at WHERE state_since=0")
    conn.execute("UPDATE remediation SET source_labels_hash=COALESCE((SELECT o.labels_hash FROM occurrence o "
                 "WHERE o.fingerprint=remediation.source_fp AND o.starts_at=remediation.source_starts_at "
                 "ORDER BY o.first_seen LIMIT 1), '') WHERE source_labels_hash=''")
    # A cordon or taint of ours: the cordon step said so ("cordoned", or ours already).
    conn.execute("UPDATE remediation SET hold_placed=1 WHERE dry_run=0 AND EXISTS (SELECT 1 FROM step s WHERE "
                 "s.remediation_id=remediation.id AND s.state='SUCCEEDED' AND ((s.action='cordon' AND (s.detail='cordoned' "
                 "OR s.detail LIKE 'already cordoned by this remediation%')) OR (s.action='taint' AND "
                 "s.detail LIKE 'tainted %')))")
    conn.execute("UPDATE remediation SET source_target=target WHERE source_target<0")
    # history, from the finished actions (the start of a step is its intent row's time where it is known).
    conn.execute("CREATE TABLE IF NOT EXISTS history(id INTEGER PRIMARY KEY AUTOINCREMENT, remediation_id TEXT NOT "
                 "NULL, node TEXT NOT NULL, node_uid TEXT NOT NULL DEFAULT '', gpu TEXT NOT NULL, uuid TEXT NOT NULL, "
                 "action TEXT NOT NULL, dry_run INTEGER NOT NULL, started_at REAL NOT NULL, finished_at REAL NOT NULL)")
    conn.execute("INSERT INTO history(remediation_id, node, node_uid, gpu, uuid, action, dry_run, started_at, "
                 "finished_at) SELECT a.remediation_id, a.node, COALESCE(r.node_uid, ''), a.gpu, a.uuid, a.action, "
                 "a.result='dry_run', COALESCE((SELECT MAX(s.started_at) FROM step s WHERE "
                 "s.remediation_id=a.remediation_id AND s.action=a.action AND s.started_at<=a.ts), a.ts), a.ts "
                 "FROM action_result a LEFT JOIN remediation r ON r.id=a.remediation_id "
                 "WHERE a.result IN ('success','dry_run') AND a.remediation_id IS NOT NULL ORDER BY a.id")
