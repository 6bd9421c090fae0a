"""What people do through the admin API (approve, cancel, pause, breaker reset, release a fleet-cap slot) and
what they read (lists, one remediation's record, the breaker, the slots, the state gauges)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from ..config import BreakerConfig
from .accept import skip_cutoff
from .rows import MetricEvent, Remediation, audit, get_meta, load, record_result, set_meta
from .schema import ACTIVE, ACTIVE_SQL
from .steps import clear_mark, cordon_holders


def approve(conn: sqlite3.Connection, rid: str, actor: str, now: float, reason: str) -> str:
    rem = load(conn, rid)
    if rem is None:
        return "not found"
    if rem.state != "AWAITING_APPROVAL":
        return f"remediation is {rem.state}, not AWAITING_APPROVAL"
    approvals = sorted(rem.approvals | {rem.next_rung})
    conn.execute("UPDATE remediation SET approvals_json=?, state='PLANNED', reason='', updated_at=?, state_since=? "
                 "WHERE id=?", (json.dumps(approvals), now, now, rid))
    audit(conn, now, actor, "approved", rid, rem.node, rung=rem.next_rung, action=rem.ladder[rem.next_rung],
          reason=reason)
    return ""


def cancel(conn: sqlite3.Connection, rid: str, actor: str, now: float, reason: str,
           event: MetricEvent | None) -> str:
    rem = load(conn, rid)
    if rem is None:
        return "not found"
    if rem.state not in ACTIVE:
        return f"remediation is already {rem.state}"
    conn.execute("UPDATE remediation SET state='CANCELLED', reason=?, updated_at=?, finished_at=?, state_since=? "
                 "WHERE id=?", (f"cancelled by {actor}: {reason}", now, now, now, rid))
    conn.execute("UPDATE step SET state='CANCELLED', outcome='cancelled', finished_at=? "
                 "WHERE remediation_id=? AND state='INTENT'", (now, rid))
    if event is not None:
        record_result(conn, now, event, rid)
    audit(conn, now, actor, "cancelled", rid, rem.node, reason=reason, previous=rem.state)
    return ""


def set_pause(conn: sqlite3.Connection, paused: bool, actor: str, now: float, reason: str) -> None:
    set_meta(conn, "pause", {"by": actor, "since": now, "reason": reason} if paused else None)
    if not paused:
        conn.execute("UPDATE remediation SET not_before=0 WHERE state='BLOCKED'")  # look again now
    audit(conn, now, actor, "paused" if paused else "resumed", reason=reason)


def reset_breaker(conn: sqlite3.Connection, mode: str, actor: str, now: float, reason: str,
                  blocked_event: Callable[[Remediation], MetricEvent | None]) -> dict[str, Any]:
    """mode resume: the backlog runs (each step still verified); skip-backlog: it is cancelled, and firing alerts
    whose fault came at or before now (the same storm, delivered late, or firing again after a Prometheus restart)
    are refused (`skip_before` in the breaker_reset meta; see storm_skip_reason). A later skip-backlog reset moves
    that cut-off; a resume reset keeps it: resuming one storm's backlog must not un-skip an earlier storm whose
    alerts fire again (the fleet soak saw a skipped storm's node rebooted after a later resume and a restart)."""
    state = get_meta(conn, "breaker")
    earlier = skip_cutoff(get_meta(conn, "breaker_reset"))
    skipped: list[str] = []
    if mode == "skip-backlog":
        for row in conn.execute("SELECT * FROM remediation WHERE state IN ('PLANNED','BLOCKED','HELD')").fetchall():
            rem = Remediation.from_row(row)
            conn.execute("UPDATE remediation SET state='CANCELLED', reason=?, updated_at=?, finished_at=?, "
                         "state_since=? WHERE id=?", ("breaker reset with skip-backlog", now, now, now, rem.id))
            ev = blocked_event(rem)
            if ev is not None:
                record_result(conn, now, ev, rem.id)
            skipped.append(rem.id)
    # Occurrences seen before the reset no longer count towards the next storm.
    set_meta(conn, "breaker", None)
    reset: dict[str, Any] = {"at": now, "by": actor, "mode": mode, "reason": reason}
    if mode == "skip-backlog":
        reset.update(skip_before=now, skip_by=actor)
    elif earlier is not None:
        reset.update(skip_before=earlier["skip_before"], skip_by=earlier.get("skip_by", earlier.get("by")))
    set_meta(conn, "breaker_reset", reset)
    conn.execute("UPDATE remediation SET not_before=0 WHERE state='BLOCKED'")  # look again now
    conn.execute("UPDATE occurrence SET wants='' WHERE first_seen<=? AND status='firing'", (now,))
    audit(conn, now, actor, "breaker_reset", mode=mode, reason=reason, was=state, skipped=skipped,
          skip_before=reset.get("skip_before"))
    return {"was": state, "mode": mode, "skipped": skipped, "skip_before": reset.get("skip_before")}


def slots(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The nodes that hold a slot of the fleet cap: a cordon of ours seen at the last pool refresh (a mark), or a
    remediation in flight."""
    marked = {r["node"]: r for r in conn.execute("SELECT * FROM node_mark")}
    inflight = {r["node"]: r for r in conn.execute(
        f"SELECT node, id, state FROM remediation WHERE state IN ({ACTIVE_SQL})")}
    out = []
    for node in sorted(cordon_holders(conn)):
        mark, active = marked.get(node), inflight.get(node)
        out.append({"node": node, "marked_by": mark["remediation_id"] if mark else None,
                    "marked_at": mark["updated_at"] if mark else None,
                    "active_remediation": active["id"] if active else None,
                    "active_state": active["state"] if active else None})
    return out


def release_slot(conn: sqlite3.Connection, node: str, actor: str, now: float, reason: str) -> str:
    """A person gives a node's slot back by hand ('' on success, else why not). The node is left as it is."""
    active = conn.execute(f"SELECT id, state, started, dry_run FROM remediation WHERE node=? AND state IN "
                          f"({ACTIVE_SQL})", (node,)).fetchone()
    if active is not None and active["started"] and not active["dry_run"]:
        return (f"remediation {active['id']} of {node} is {active['state']} and holds the node; cancel it first "
                f"(POST /v1/remediations/{active['id']}:cancel)")
    if not clear_mark(conn, node, now, f"released by {actor} through the admin API: {reason}" if reason else
                      f"released by {actor} through the admin API", actor=actor):
        return "not found"
    return ""


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in conn.execute(
        f"SELECT state, COUNT(*) FROM remediation WHERE state IN ({ACTIVE_SQL}) GROUP BY state")}


def state_since(conn: sqlite3.Connection) -> dict[str, float]:
    """When the oldest unfinished remediation of each state entered it."""
    return {r[0]: float(r[1]) for r in conn.execute(
        f"SELECT state, MIN(state_since) FROM remediation WHERE state IN ({ACTIVE_SQL}) GROUP BY state")}


def list_remediations(conn: sqlite3.Connection, state: str = "", node: str = "", since: float = 0.0,
                      limit: int = 100) -> list[dict[str, Any]]:
    sql, args = "SELECT * FROM remediation WHERE created_at>=?", [since]
    if state:
        sql += " AND state=?"
        args.append(state)
    if node:
        sql += " AND node=?"
        args.append(node)
    sql += " ORDER BY created_at DESC LIMIT ?"
    args.append(limit)
    return [Remediation.from_row(r).as_dict() for r in conn.execute(sql, args)]


def detail(conn: sqlite3.Connection, rid: str) -> dict[str, Any] | None:
    rem = load(conn, rid)
    if rem is None:
        return None
    steps = [{"seq": r["seq"], "rung": r["rung"], "action": r["action"], "state": r["state"],
              "dry_run": bool(r["dry_run"]), "started_at": r["started_at"], "finished_at": r["finished_at"],
              "outcome": r["outcome"], "detail": r["detail"], "calls": json.loads(r["calls_json"])}
             for r in conn.execute("SELECT * FROM step WHERE remediation_id=? ORDER BY seq", (rid,))]
    trail = [{"ts": r["ts"], "actor": r["actor"], "event": r["event"], "detail": json.loads(r["detail_json"])}
             for r in conn.execute("SELECT * FROM audit WHERE remediation_id=? ORDER BY id", (rid,))]
    occurrences = [{"fingerprint": r["fingerprint"], "startsAt": r["starts_at"], "labels_hash": r["labels_hash"],
                    "status": r["status"], "deliveries": r["deliveries"], "decision": r["decision"],
                    "reason": r["reason"], "fault_timestamp": r["fault_ts"]}
                   for r in conn.execute("SELECT * FROM occurrence WHERE remediation_id=? ORDER BY first_seen",
                                         (rid,))]
    return {**rem.as_dict(), "steps": steps, "audit": trail, "occurrences": occurrences}


def breaker_status(conn: sqlite3.Connection, now: float, breaker: BreakerConfig, pool: int | None) -> dict[str, Any]:
    state = get_meta(conn, "breaker")
    n = conn.execute("SELECT COUNT(DISTINCT node) FROM occurrence WHERE status='firing' AND node IS NOT NULL "
                     "AND wants!='' AND first_seen>=?", (now - breaker.window,)).fetchone()[0]
    backlog = conn.execute("SELECT COUNT(*) FROM remediation WHERE state IN ('PLANNED','BLOCKED','HELD')").fetchone()[0]
    last_reset = get_meta(conn, "breaker_reset")
    skip = skip_cutoff(last_reset)
    return {"open": state is not None, **({"reason": state["reason"], "since": state["since"]} if state else {}),
            "alerting_nodes_in_window": n, "threshold": breaker.threshold(pool), "window_seconds": breaker.window,
            "backlog": backlog, "last_reset": last_reset,
            # firing alerts that began at or before this time belong to the skipped storm and are refused
            "skip_before": skip["skip_before"] if skip else None}


def ping(conn: sqlite3.Connection, now: float) -> None:
    set_meta(conn, "readyz", {"at": now})
