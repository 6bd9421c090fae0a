"""The remediation history as the journal knows it, which is what decides: is a fault already remediated, does
the history an escalation alert claims exist, and the numbers the webhook publishes for the rules.

Prometheus' view of this history can be late, missing or doubled; these functions read only the journal.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime

from ..policy import GPU_SCOPED, RANK, Evidence
from .rows import OVERFLOW_NODE, MetricEvent

WINDOWS = (("7d", 7 * 86400.0), ("30d", 30 * 86400.0))


def _at(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _runs(dry_run: bool) -> str:
    """Which history a plan is judged against: a live plan, live actions only; a dry-run plan, live actions and
    dry-run records both (so dry-run shows what live would do, live history included)."""
    return "dry_run IN (0, 1)" if dry_run else "dry_run=0"


def _target_clause(uuid: str) -> tuple[str, list[str]]:
    """Node actions of the node, and GPU actions only of the same GPU (by UUID: indexes change across boots)."""
    gpu_actions = ",".join(f"'{a}'" for a in sorted(GPU_SCOPED))
    if uuid:
        return f"(action NOT IN ({gpu_actions}) OR uuid=?)", [uuid]
    return f"action NOT IN ({gpu_actions})", []


@dataclass(frozen=True)
class Fix:
    """The newest successful action that fixes a fault asking for `rung`: that rung or a higher one, on the same
    node (and the same GPU for a GPU action)."""

    remediation_id: str
    action: str
    finished_at: float
    node_uid: str

    def covers(self, fault_ts: float) -> bool:
        return fault_ts <= self.finished_at

    def record(self, fault_ts: float) -> dict[str, object]:
        """Exactly what was compared, for the journal."""
        return {"fault_timestamp": fault_ts, "fixed_by": self.remediation_id, "action": self.action,
                "finished_at": self.finished_at, "node_uid": self.node_uid}

    def reason(self, fault_ts: float) -> str:
        return (f"already remediated: the fault at {_at(fault_ts)} is not newer than the successful {self.action} "
                f"that finished at {_at(self.finished_at)} (remediation {self.remediation_id})")


def last_fix(conn: sqlite3.Connection, node: str, uuid: str, rung: str, dry_run: bool) -> Fix | None:
    fixing = [a for a, r in RANK.items() if r >= RANK.get(rung, 0)]
    clause, args = _target_clause(uuid)
    marks = ",".join("?" for _ in fixing)
    row = conn.execute(f"SELECT remediation_id, action, finished_at, node_uid FROM history WHERE node=? AND "
                       f"{_runs(dry_run)} AND action IN ({marks}) AND {clause} ORDER BY finished_at DESC LIMIT 1",
                       [node, *fixing, *args]).fetchone()
    if row is None:
        return None
    return Fix(row["remediation_id"], row["action"], float(row["finished_at"]), row["node_uid"])


def count_since_replace(conn: sqlite3.Connection, node: str, uuid: str, action: str, window: float, now: float,
                        dry_run: bool, created_after: float | None = None) -> int:
    """Successful `action` on the node (the GPU, for a GPU action) within `window`, after the node's last
    successful replace: a replaced node is another machine, and its history starts again. With `created_after`
    (when the machine now under the name joined), what came before it belongs to an earlier machine too (one
    that someone else recreated under the name)."""
    replaced = conn.execute(f"SELECT MAX(finished_at) FROM history WHERE node=? AND action='replace' AND "
                            f"{_runs(dry_run)}", (node,)).fetchone()[0]
    since = max(now - window, float(replaced) if replaced is not None and action != "replace" else float("-inf"),
                created_after if created_after is not None else float("-inf"))
    sql = f"SELECT COUNT(*) FROM history WHERE node=? AND action=? AND {_runs(dry_run)} AND finished_at>? AND " \
          f"finished_at<=?"
    args: list[object] = [node, action, since, now + 1]
    if action in GPU_SCOPED:
        sql += " AND uuid=?"
        args.append(uuid)
    return int(conn.execute(sql, args).fetchone()[0])


def unconfirmed(conn: sqlite3.Connection, node: str, uuid: str, evidence: Evidence, now: float,
                dry_run: bool, created_after: float | None = None) -> str:
    """Why the journal does not confirm the history an escalation alert claims ("" if it does); with
    `created_after`, counting only what was done since the machine now under the name joined."""
    if evidence.action in GPU_SCOPED and not uuid:
        return f"escalation not confirmed: history of {evidence.action} needs the alert's GPU uuid"
    n = count_since_replace(conn, node, uuid, evidence.action, evidence.window, now, dry_run, created_after)
    if n >= evidence.min_count:
        return ""
    what = f"GPU {uuid} of {node}" if evidence.action in GPU_SCOPED else node
    since = "its last replace" if created_after is None else "its last replace or since this machine joined"
    return (f"escalation not confirmed by the journal: {n} successful {evidence.action} of {what} within "
            f"{evidence.window / 86400:g}d (since {since}), the alert claims at least {evidence.min_count}")


def successful_counts(conn: sqlite3.Connection, now: float) -> dict[tuple[str, str, str, str], dict[str, int]]:
    """The history gauges: live successes per (node, gpu, uuid, action) and window, since the node's last
    replace; only series with a success in the longest window."""
    longest = max(w for _, w in WINDOWS)
    out: dict[tuple[str, str, str, str], dict[str, int]] = {}
    replaced = dict(conn.execute("SELECT node, MAX(finished_at) FROM history WHERE dry_run=0 AND action='replace' "
                                 "GROUP BY node").fetchall())
    rows = conn.execute("SELECT node, gpu, uuid, action, finished_at FROM history WHERE dry_run=0 AND finished_at>?",
                        (now - longest,)).fetchall()
    for node, gpu, uuid, action, finished in rows:
        if action != "replace" and finished <= replaced.get(node, float("-inf")):
            continue
        counts = out.setdefault((node, gpu, uuid, action), {name: 0 for name, _ in WINDOWS})
        for name, window in WINDOWS:
            counts[name] += int(finished > now - window)
    return out


def resolved_nodes(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT node FROM known_node")]


def restore_metrics(conn: sqlite3.Connection) -> tuple[list[tuple[MetricEvent, int]],
                                                       list[tuple[tuple[str, str, str, str, str], float]]]:
    """Counters by (node, gpu, uuid, action, result), and the last time of each (node, gpu, uuid, action) for
    result success and failure: the totals folded by retention plus the rows it kept; nodes never resolved in the
    overflow series."""
    rows = conn.execute(
        "WITH known(node) AS (SELECT node FROM known_node), ev(node, gpu, uuid, action, result, n, last_ts) AS ("
        "  SELECT node, gpu, uuid, action, result, 1, ts FROM action_result "
        "  UNION ALL SELECT node, gpu, uuid, action, result, count, last_ts FROM action_total) "
        "SELECT CASE WHEN node IN (SELECT node FROM known) THEN node ELSE ? END AS n_, "
        "CASE WHEN node IN (SELECT node FROM known) THEN gpu ELSE '' END, "
        "CASE WHEN node IN (SELECT node FROM known) THEN uuid ELSE '' END, action, result, SUM(n), MAX(last_ts) "
        "FROM ev GROUP BY 1, 2, 3, action, result", (OVERFLOW_NODE,)).fetchall()
    counts = [((r[0], r[1], r[2], r[3], r[4]), int(r[5])) for r in rows]
    last = [((r[0], r[1], r[2], r[3], r[4]), float(r[6])) for r in rows if r[4] in ("success", "failure")]
    return counts, last
