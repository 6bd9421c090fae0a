"""What the engine writes while it drives a remediation: state transitions, step intent and completion rows
(before and after every side effect), the marks that hold the fleet cap, and the settle check of a condition
alert after its rung succeeded."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import RateLimit
from ..policy import RANK
from .rows import MetricEvent, Remediation, audit, get_meta, load, record_history, record_result
from .schema import ACTIVE_SQL, TERMINAL

# Started remediations that hold their node whatever the node shows (the fleet cap counts them).
_IN_FLIGHT_SQL = "'RUNNING','NEEDS_HUMAN','AWAITING_APPROVAL','HEALTHY_DELAY','HELD'"


def runnable(conn: sqlite3.Connection, now: float) -> list[Remediation]:
    rows = conn.execute("SELECT * FROM remediation WHERE state IN ('PLANNED','BLOCKED','RUNNING','HEALTHY_DELAY',"
                        "'HELD') AND not_before<=? ORDER BY created_at", (now,)).fetchall()
    return [Remediation.from_row(r) for r in rows]


def save_identity(conn: sqlite3.Connection, rid: str, uid: str, provider_id: str, created: float | None,
                  now: float) -> None:
    conn.execute("UPDATE remediation SET node_uid=?, provider_id=?, node_created=?, updated_at=? WHERE id=?",
                 (uid, provider_id, created, now, rid))
    audit(conn, now, "engine", "resolved", rid, None, uid=uid, providerID=provider_id, created=created)


def transition(conn: sqlite3.Connection, rid: str, state: str, reason: str, now: float, *,
               expect: Sequence[str] | None = None, actor: str = "engine",
               event: MetricEvent | None = None, not_before: float = 0.0, audit_as: str = "") -> bool:
    """Move an unfinished remediation to `state` (only from `expect` states if given); journals and audits it.
    A finished one (a person cancelled it while the engine was verifying, say) is never moved: False."""
    row = conn.execute("SELECT state, node, reason FROM remediation WHERE id=?", (rid,)).fetchone()
    if row is None or row["state"] in TERMINAL or (expect is not None and row["state"] not in expect):
        return False
    same = row["state"] == state and row["reason"] == reason
    finished = now if state in TERMINAL else None
    conn.execute("UPDATE remediation SET state=?, reason=?, updated_at=?, finished_at=COALESCE(?, finished_at), "
                 "not_before=?, state_since=CASE WHEN state=? THEN state_since ELSE ? END WHERE id=?",
                 (state, reason, now, finished, not_before, state, now, rid))
    if not same:
        audit(conn, now, actor, audit_as or state.lower(), rid, row["node"], reason=reason, previous=row["state"])
    if event is not None:
        record_result(conn, now, event, rid)
    return True


def complete(conn: sqlite3.Connection, rid: str, now: float, settle: float) -> None:
    """Every rung ran. A live remediation of a condition alert (no fault_timestamp) is looked at again `settle`
    seconds on: still firing, it is not fixed (escalation by persistence)."""
    rem = load(conn, rid)
    assert rem is not None
    transition(conn, rid, "DRY_RUN_RECORDED" if rem.dry_run else "SUCCEEDED", "all steps done", now)
    # Only a rung that can fix a fault is expected to end the condition: after a cordon or a drain (nothing
    # fixed, a person's turn) the alert rightly fires on.
    if rem.dry_run or settle <= 0 or RANK.get(rem.ladder[rem.target], 0) < RANK["reset_gpu"]:
        return
    source = conn.execute("SELECT fault_ts FROM occurrence WHERE fingerprint=? AND starts_at=? AND labels_hash=?",
                          (rem.source_fp, rem.source_starts_at, rem.source_labels_hash)).fetchone()
    if source is not None and source["fault_ts"] is None:
        conn.execute("UPDATE remediation SET settle_at=? WHERE id=?", (now + settle, rid))


@dataclass(frozen=True)
class Gates:
    """What begin_step checks atomically with writing the intent row."""

    cordons: bool
    fleet_cap: int
    rate_limit: RateLimit | None


def begin_step(conn: sqlite3.Connection, rid: str, rung: int, action: str, dry_run: bool, gates: Gates,
               now: float) -> int | str:
    """Write the intent row and return its seq, or return why the step may not start now."""
    rem = load(conn, rid)
    if rem is None or rem.state not in ("PLANNED", "BLOCKED", "RUNNING", "HEALTHY_DELAY"):
        return f"remediation is {rem.state if rem else 'gone'}"
    pause = get_meta(conn, "pause")
    if pause is not None:
        return "paused"
    if get_meta(conn, "breaker") is not None and rem.state != "HEALTHY_DELAY":
        return "breaker open"
    if not dry_run:
        if gates.cordons:
            held = cordon_holders(conn)
            if rem.node not in held and len(held) >= gates.fleet_cap:
                return f"fleet cap reached ({len(held)} of {gates.fleet_cap} nodes held by us)"
        if gates.rate_limit is not None:
            used = rate_used(conn, action, now, gates.rate_limit)
            if used >= gates.rate_limit.max:
                return f"rate limit for {action} reached ({used} per {gates.rate_limit.per:.0f}s)"
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM step WHERE remediation_id=?", (rid,)).fetchone()[0]
    conn.execute("INSERT INTO step(remediation_id, seq, rung, action, state, dry_run, started_at) VALUES (?,?,?,?,?,?,?)",
                 (rid, seq, rung, action, "INTENT", int(dry_run), now))
    state = "HEALTHY_DELAY" if rem.state == "HEALTHY_DELAY" else "RUNNING"
    # A step began: a later hold counts its time from now on.
    conn.execute("UPDATE remediation SET state=?, reason='', started=1, updated_at=?, held_at=0, "
                 "state_since=CASE WHEN state=? THEN state_since ELSE ? END WHERE id=?", (state, now, state, now, rid))
    audit(conn, now, "engine", "step_intent", rid, rem.node, seq=seq, action=action, dry_run=dry_run)
    return int(seq)


def finish_step(conn: sqlite3.Connection, rid: str, seq: int, state: str, outcome: str, detail: str,
                calls: Iterable[Mapping[str, Any]], now: float, *, event: MetricEvent | None,
                advance: bool, mark: str | None = None, holds: bool = False) -> None:
    """Complete the intent row; `mark` = 'set' or 'clear' records whether we now hold the node (fleet cap);
    `holds`: the step left a cordon or taint of ours on the node (undoing it is a person's override)."""
    conn.execute("UPDATE step SET state=?, outcome=?, detail=?, calls_json=?, finished_at=? "
                 "WHERE remediation_id=? AND seq=?",
                 (state, outcome, detail[:4000], json.dumps(list(calls), default=str), now, rid, seq))
    row = conn.execute("SELECT node FROM remediation WHERE id=?", (rid,)).fetchone()
    if advance:
        conn.execute("UPDATE remediation SET next_rung=next_rung+1, updated_at=? WHERE id=?", (now, rid))
    if holds:
        conn.execute("UPDATE remediation SET hold_placed=1 WHERE id=?", (rid,))
    if event is not None:
        record_result(conn, now, event, rid)
        started = conn.execute("SELECT started_at FROM step WHERE remediation_id=? AND seq=?", (rid, seq)).fetchone()
        record_history(conn, rid, event, float(started["started_at"]) if started else now, now)
    if mark == "set" and row is not None:
        conn.execute("INSERT INTO node_mark(node, remediation_id, updated_at) VALUES (?,?,?) "
                     "ON CONFLICT(node) DO UPDATE SET remediation_id=excluded.remediation_id, updated_at=excluded.updated_at",
                     (row["node"], rid, now))
    elif mark == "clear" and row is not None:
        conn.execute("DELETE FROM node_mark WHERE node=?", (row["node"],))
    audit(conn, now, "engine", "step_" + state.lower(), rid, row["node"] if row else None, seq=seq,
          outcome=outcome, detail=detail[:1000])


def open_step(conn: sqlite3.Connection, rid: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM step WHERE remediation_id=? AND state='INTENT' ORDER BY seq DESC LIMIT 1",
                        (rid,)).fetchone()


def cordon_holders(conn: sqlite3.Connection) -> set[str]:
    """Nodes whose cordon of ours the last pool refresh saw (marks), plus nodes whose live remediation is in
    flight: in-flight counts."""
    held = {r[0] for r in conn.execute("SELECT node FROM node_mark")}
    held |= {r[0] for r in conn.execute(
        f"SELECT node FROM remediation WHERE dry_run=0 AND started=1 AND state IN ({_IN_FLIGHT_SQL})")}
    return held


def clear_mark(conn: sqlite3.Connection, node: str, now: float, reason: str, actor: str = "engine") -> bool:
    """Give the node's fleet-cap slot back, journaled with who or what freed it."""
    row = conn.execute("SELECT remediation_id FROM node_mark WHERE node=?", (node,)).fetchone()
    if row is None:
        return False
    conn.execute("DELETE FROM node_mark WHERE node=?", (node,))
    audit(conn, now, actor, "mark_cleared", row["remediation_id"], node, reason=reason)
    return True


def marks(conn: sqlite3.Connection) -> dict[str, str]:
    return {r[0]: r[1] for r in conn.execute("SELECT node, remediation_id FROM node_mark")}


def rate_used(conn: sqlite3.Connection, action: str, now: float, limit: RateLimit) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM step WHERE action=? AND dry_run=0 AND started_at>=? "
                            "AND state!='CANCELLED'", (action, now - limit.per)).fetchone()[0])


def override(conn: sqlite3.Connection, rid: str, now: float, detail: str) -> tuple[bool, bool]:
    """A person undid our step on the node: the remediation stops for good, and the node's slot is free.
    (overridden, slot freed)."""
    rem = load(conn, rid)
    if rem is None or rem.state in TERMINAL:
        return False, False
    conn.execute("UPDATE step SET state='CANCELLED', outcome='overridden', detail=?, finished_at=? "
                 "WHERE remediation_id=? AND state='INTENT'", (detail[:4000], now, rid))
    transition(conn, rid, "OVERRIDDEN", detail, now)
    mark = conn.execute("SELECT remediation_id FROM node_mark WHERE node=?", (rem.node,)).fetchone()
    freed = mark is not None and mark["remediation_id"] == rid and clear_mark(conn, rem.node, now,
                                                                              f"overridden: {detail}")
    return True, bool(freed)


def twins(conn: sqlite3.Connection, rid: str) -> list[sqlite3.Row]:
    """Conflict twins of remediation `rid`'s alert (its fingerprint, other labels) waiting for Alertmanager's
    word: once `rid` ends without acting, one of them may be the real alert."""
    rem = load(conn, rid)
    if rem is None:
        return []
    return conn.execute("SELECT * FROM occurrence WHERE fingerprint=? AND labels_hash!=? AND status='firing' "
                        "AND decision='conflict'", (rem.source_fp, rem.source_labels_hash)).fetchall()


def merged(conn: sqlite3.Connection, rid: str) -> list[sqlite3.Row]:
    """Firing alerts merged into remediation `rid`: left without an owner when its own alert turns out gone or
    not real."""
    rem = load(conn, rid)
    if rem is None:
        return []
    return conn.execute("SELECT * FROM occurrence WHERE remediation_id=? AND status='firing' AND decision IN "
                        "('merged','escalated') AND NOT (fingerprint=? AND starts_at=? AND labels_hash=?)",
                        (rid, rem.source_fp, rem.source_starts_at, rem.source_labels_hash)).fetchall()


def mark_forged(conn: sqlite3.Connection, rem: Remediation, now: float, reason: str) -> None:
    conn.execute("UPDATE occurrence SET decision='forged', reason=? WHERE fingerprint=? AND starts_at=? AND "
                 "labels_hash=?", (reason[:1000], rem.source_fp, rem.source_starts_at, rem.source_labels_hash))
    audit(conn, now, "engine", "forged", rem.id, rem.node, fingerprint=rem.source_fp, reason=reason)


def settle_due(conn: sqlite3.Connection, now: float) -> list[Remediation]:
    rows = conn.execute("SELECT * FROM remediation WHERE settle_at>0 AND settle_at<=? AND state='SUCCEEDED' "
                        "ORDER BY settle_at", (now,)).fetchall()
    return [Remediation.from_row(r) for r in rows]


def settled(conn: sqlite3.Connection, rid: str, now: float, why: str, *, later: float = 0.0) -> None:
    """The settle check is over (`later` = 0) or looks again at `later`."""
    changed = conn.execute("UPDATE remediation SET settle_at=? WHERE id=? AND settle_at>0", (later, rid)).rowcount
    if changed and not later:
        audit(conn, now, "engine", "settled", rid, None, reason=why)


def climb(conn: sqlite3.Connection, rid: str, ladder: tuple[str, ...], now: float, reason: str) -> str:
    """Escalation by persistence: reopen a succeeded remediation at the next rung of its rule (`ladder` ends with
    it), or, with no rung left (ladder unchanged), hand it to a person. '' on success, else why not."""
    rem = load(conn, rid)
    if rem is None or rem.state != "SUCCEEDED":
        return f"remediation is {rem.state if rem else 'gone'}"
    higher = len(ladder) > len(rem.ladder)
    state = "PLANNED" if higher else "NEEDS_HUMAN"
    if higher and get_meta(conn, "breaker") is not None:
        state = "BLOCKED"
    try:
        # The climb is its own alert's (settle verified it): the new rung is no other alert's escalation.
        conn.execute("UPDATE remediation SET state=?, reason=?, ladder_json=?, target=?, finished_at=NULL, "
                     "settle_at=0, not_before=0, updated_at=?, state_since=?, source_target=?, "
                     "escalation_fp=NULL, escalation_starts_at=NULL, escalation_labels_hash=NULL WHERE id=?",
                     (state, reason if state != "BLOCKED" else "breaker open", json.dumps(list(ladder)),
                      len(ladder) - 1, now, now, len(ladder) - 1 if higher else rem.source_target, rid))
    except sqlite3.IntegrityError:
        settled(conn, rid, now, "the condition persists, but another remediation of the node is active")
        return "another remediation of the node is active"
    audit(conn, now, "engine", "escalated_by_persistence" if higher else "needs_human", rid, rem.node,
          reason=reason, to=ladder[-1] if higher else None)
    return ""


def drop_escalation(conn: sqlite3.Connection, rid: str, now: float, why: str) -> None:
    """The alert that raised the target is not confirmed by Alertmanager: back to the rung the remediation's own
    alert asked for."""
    rem = load(conn, rid)
    if rem is None or rem.escalation is None:
        return
    conn.execute("UPDATE remediation SET target=MAX(source_target, next_rung - 1), escalation_fp=NULL, "
                 "escalation_starts_at=NULL, escalation_labels_hash=NULL, updated_at=? WHERE id=?", (now, rid))
    audit(conn, now, "engine", "escalation_dropped", rid, rem.node, reason=why, fingerprint=rem.escalation[0],
          was=rem.ladder[rem.target], to=rem.ladder[max(rem.source_target, rem.next_rung - 1)])


def active_on(conn: sqlite3.Connection, node: str) -> Remediation | None:
    row = conn.execute(f"SELECT * FROM remediation WHERE node=? AND state IN ({ACTIVE_SQL})", (node,)).fetchone()
    return Remediation.from_row(row) if row else None
